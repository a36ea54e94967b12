"""Triton kernels for PixArt-alpha blocks, imported as `pixart_fast.kernels`: the functional front door.

    from pixart_fast.kernels import modulate, gated_residual, gated_residual_modulate, cross_attention
    from pixart_fast.kernels import patchify, unpatchify

Each takes `backend="auto" | "triton" | "torch"` (kernels/backend.py) and has a Triton backward pass. The files
behind them: modulation.py (adaLN-single modulation and the gated residuals), cross_attn.py (cross-attention over
padded caption tokens), patch_copy.py (patchify / unpatchify), aot.py (the ahead-of-time compile report).
Without Triton installed they run their PyTorch references.
"""
if __name__ == "kernels":
    # Python met this folder as a top-level `kernels`: the repository root is on sys.path (`python -m` or
    # `python -m pytest` started there, a build run from it). That name belongs to Hugging Face's package, which
    # transformers imports: load that one in this module's place, or fail as if this folder were not here.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_module)
else:
    from .cross_attn import cross_attention
    from .modulation import gated_residual, gated_residual_modulate, modulate
    from .patch_copy import patchify, unpatchify

__all__ = ["modulate", "gated_residual", "gated_residual_modulate", "cross_attention", "patchify", "unpatchify"]
