"""Test-wide environment: no hub access, Triton kernels through the CPU interpreter, one CPU thread.

Both variables must be set before torch/triton/transformers are imported: `@triton.jit` decides at
decoration time whether a kernel is compiled or interpreted.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# The tests' tensors are tiny: one thread avoids OpenMP start-up and contention costs (several-fold faster on 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _version(module) -> tuple[int, int]:
    return tuple(int(part) for part in module.__version__.split(".")[:2])


def _interpreter_index_fix() -> bool:
    """Triton < 3.7's interpreter turns a runtime loop bound (`range` over a kernel argument or a computed bound)
    into an int with int() of a 1-element array, which numpy >= 2.4 refuses. Triton 3.7's own fix (squeeze first),
    applied to the older interpreter; False where its hook is not the one this wraps."""
    import inspect

    from triton.runtime import interpreter
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or list(inspect.signature(patch).parameters) != ["tensor", "scope"]:
        return False

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched
    return True


def pytest_configure(config):
    import numpy
    import pytest
    try:
        import triton
    except ImportError:  # not a Linux machine: no Triton, no interpreter
        return
    if _version(triton) < (3, 7) and _version(numpy) >= (2, 4) and not _interpreter_index_fix():
        raise pytest.UsageError(f"Triton {triton.__version__}'s interpreter needs numpy < 2.4 "
                                f"(numpy {numpy.__version__} is installed): pip install 'numpy<2.4'")
