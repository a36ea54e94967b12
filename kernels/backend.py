"""Which implementation a kernel call runs: Triton, or the pure-PyTorch reference beside it.

backend="auto":   CUDA tensors -> Triton; CPU tensors -> the reference, unless TRITON_INTERPRET=1 is set
                  (then Triton runs through its CPU interpreter: that is how the tests run the kernels).
                  Where Triton is not installed: always the reference.
backend="triton": always Triton (on a CPU tensor this needs TRITON_INTERPRET=1).
backend="torch":  always the reference.

Triton is optional: the model with kernels="torch", the trainer on a CPU and the planner need none. Where it is not
installed, `triton` and `tl` below are stand-ins that let the kernel files import (their `@triton.jit` functions
are kept as plain, never-launched Python functions, and `tl.constexpr` annotations evaluate); `use_triton`
then never picks Triton, and backend="triton" is refused with a message.
"""
import inspect
import os

import torch


class _NoTriton:
    """Stand-in for `triton` and `triton.language` where Triton is not installed (see the module docstring)."""

    def jit(self, fn=None, **options):
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name: str) -> "_NoTriton":  # tl.constexpr, tl.float32, ...
        return self

    def __call__(self, *args, **kwargs) -> None:  # tl.constexpr(value) at module level
        return None


try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except ImportError as error:  # not installed (or not importable on this platform)
    triton = tl = _NoTriton()
    TRITON_IMPORT_ERROR = error

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_problem() -> str | None:
    """Triton < 3.7's interpreter turns a runtime loop bound (a `range` over a kernel argument or a bound computed
    in the kernel) into an int with int() of a 1-element array, which numpy >= 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"). Triton 3.7 squeezes the array first: the same is applied here to
    the older interpreter. Returns what to install where that interpreter is not the one this patches, else None."""
    if TRITON_IMPORT_ERROR is not None or not interpreting():
        return None
    import numpy

    def version(module) -> tuple[int, ...]:
        return tuple(int(part) for part in module.__version__.split(".")[:2])

    if version(triton) >= (3, 7) or version(numpy) < (2, 4):
        return None
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or list(inspect.signature(patch).parameters) != ["tensor", "scope"]:
        return (f"Triton {triton.__version__}'s interpreter needs numpy < 2.4 (numpy {numpy.__version__} is "
                "installed): pip install 'numpy<2.4'")

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched
    return None


INTERPRETER_PROBLEM = _interpreter_problem()


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Decide for one call from the backend name and the tensor it runs on."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if TRITON_IMPORT_ERROR is not None:
        if backend == "triton":
            raise ModuleNotFoundError(f"backend='triton' needs Triton, which cannot be imported here "
                                      f"({TRITON_IMPORT_ERROR}); install it (pip install triton) or use "
                                      "backend='torch' or 'auto'")
        return False
    if not x.is_cuda and interpreting() and INTERPRETER_PROBLEM:
        raise RuntimeError(INTERPRETER_PROBLEM)
    if backend == "triton":
        if not x.is_cuda and not interpreting():
            raise RuntimeError(
                f"backend='triton' on a {x.device} tensor needs TRITON_INTERPRET=1 (set before importing "
                "pixart_fast), or use backend='auto'"
            )
        return True
    return x.is_cuda or interpreting()
