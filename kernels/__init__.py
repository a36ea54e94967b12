"""Triton kernels for PixArt-alpha blocks, imported as `pixart_fast.kernels`: the functional front door.

    from pixart_fast.kernels import modulate, gated_residual, gated_residual_modulate, cross_attention
    from pixart_fast.kernels import patchify, unpatchify

Each takes `backend="auto" | "triton" | "torch"` (kernels/backend.py) and has a Triton backward pass. The files
behind them: modulation.py (adaLN-single modulation and the gated residuals), cross_attn.py (cross-attention over
padded caption tokens), patch_copy.py (patchify / unpatchify), aot.py (the ahead-of-time compile report).
Without Triton installed they run their PyTorch references.
"""
from .cross_attn import cross_attention
from .modulation import gated_residual, gated_residual_modulate, modulate
from .patch_copy import patchify, unpatchify

__all__ = ["modulate", "gated_residual", "gated_residual_modulate", "cross_attention", "patchify", "unpatchify"]
