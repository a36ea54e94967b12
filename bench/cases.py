"""The kernel benchmark cases: each Triton kernel of pixart_fast.kernels at PixArt-XL/2 shapes, its PyTorch
reference, and the bytes and FLOPs one call must move and compute.

Shapes are PixArt-XL/2's: D = 1152, 16 heads of Dh = 72, L = 120 caption tokens, T = 256 / 1024 / 4096 image
tokens (256 / 512 / 1024 px), with B * T = 32768 tokens per call (B = 128 / 32 / 8), so every (B, T, D)
tensor (75 MB in bf16) is larger than any GPU's L2 cache. Dtypes are what the model sees under bf16 autocast:
the residual stream and the modulation vectors are fp32 (the fp32 position embedding and scale_shift_table
promote them), the branch outputs of the linear layers and the attention operands bf16, the latents fp32; what
feeds a Linear (the modulated output, the residual's copy for the cross-attention) is written in bf16, as
pixart_fast/model.py asks the kernels to.

Bytes (the traffic a roofline divides by bandwidth): every tensor the computation must touch, once. Forward:
its inputs and outputs. Backward: the output gradients, the inputs it reads (`bwd_reads`), and a gradient
for every differentiable input. Kernel-private statistics (LayerNorm mean
and rstd, the attention logsumexp) are left out: they are under 1 % of the traffic.
"""
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from pixart_fast.kernels.cross_attn import cross_attention, cross_attention_ref
from pixart_fast.kernels.modulation import (gated_residual, gated_residual_modulate, gated_residual_modulate_ref,
                                          gated_residual_ref, modulate, modulate_ref)
from pixart_fast.kernels.patch_copy import patchify, patchify_ref, unpatchify, unpatchify_ref
from pixart_fast.kernels.roofline import ROOFLINE_GPUS, roofline_rows

D, HEADS, HEAD_DIM, CAPTION_TOKENS, PATCH = 1152, 16, 72, 120, 2
TOKENS = (256, 1024, 4096)
TOKENS_PER_CALL = 32768
F32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class KernelCase:
    kernel: str
    tokens: int  # image tokens per image
    inputs: Callable[[torch.device], dict]  # device -> {name: tensor}, float tensors with requires_grad
    triton: Callable  # (**inputs) -> tensor or tuple: the Triton kernel
    ref: Callable  # (**inputs) -> the same: the PyTorch reference
    bwd_reads: tuple[str, ...] = ()  # inputs the backward reads besides the output gradients
    fwd_flops_per_token: int = 0  # matrix-product FLOPs per image token (cross-attention only)
    launches: tuple[str, ...] = ()  # kernels/roofline.py's launch names: the forward's, then the backward's

    @property
    def batch(self) -> int:
        return TOKENS_PER_CALL // self.tokens

    @property
    def name(self) -> str:
        return f"{self.kernel}-T{self.tokens}"

    def flops(self, backward: bool) -> int:
        """Forward FLOPs of one call, or the backward's: 2.5 x forward for attention (q k^T recomputed, then
        dv, dp, dq, dk: five products for the forward's two), FlopCounterMode's convention."""
        fwd = self.fwd_flops_per_token * self.batch * self.tokens
        return int(2.5 * fwd) if backward else fwd

    def bytes(self, backward: bool) -> int:
        """Bytes one forward (or one backward) call reads and writes at least once; see the module docstring."""
        with torch.device("meta"):
            inputs = self.inputs(torch.device("meta"))
            out = self.ref(**inputs)
        outs = out if isinstance(out, tuple) else (out,)
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        if not backward:
            return sum(size(t) for t in inputs.values()) + sum(size(t) for t in outs)
        reads = [inputs[name] for name in self.bwd_reads]
        grads = [t for t in inputs.values() if t.requires_grad]
        return sum(size(t) for t in outs) + sum(size(t) for t in reads) + sum(size(t) for t in grads)


def roofline_target(gpu_key: str | None) -> str | None:
    """The compile target (kernels/targets.py) whose grids stand for a GPUS key: kernels/roofline.py's own table,
    else by family (every H100 and H200 board sm_90, A100s sm_80); None for any other GPU."""
    if gpu_key in ROOFLINE_GPUS:
        return ROOFLINE_GPUS[gpu_key]
    return "sm_90" if str(gpu_key).startswith(("H100", "H200")) else "sm_80" if str(gpu_key).startswith("A100") \
        else None


@functools.lru_cache(maxsize=None)
def _roofline_us(tokens: int, gpu_key: str) -> dict:
    rows = roofline_rows(tokens=(tokens,), gpus={gpu_key: roofline_target(gpu_key)})
    return {r["kernel"]: r["roofline_us"] for r in rows}


def roofline_seconds(case: KernelCase, backward: bool, gpu_key: str | None) -> float | None:
    """kernels/roofline.py's roofline time of the case's launches (forward, or forward and backward) on a GPU of
    pixart_fast.gpus.GPUS, at PixArt-XL/2 shapes; None for a GPU without a compile target."""
    if roofline_target(gpu_key) is None or len(case.launches) < (2 if backward else 1):
        return None  # another GPU, or a backward the model never launches (patchify's: latents need no gradient)
    us = _roofline_us(case.tokens, gpu_key)
    return sum(us[name] for name in case.launches[:2 if backward else 1]) / 1e6


def _rand(device, *shape, dtype, grad=True):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _rows(B, T):
    """Residual stream (fp32), branch output (bf16) and per-sample vectors (fp32) of a PixArt block."""
    return lambda dev, *names: {n: (_rand(dev, B, T, D, dtype=F32) if n == "x" else
                                    _rand(dev, B, T, D, dtype=BF16) if n == "y" else _rand(dev, B, D, dtype=F32))
                                for n in names}


def _cross_inputs(B, T):
    def make(device):
        kv = torch.randn(B, CAPTION_TOKENS, 2, HEADS, HEAD_DIM, device=device, dtype=BF16)
        lengths = torch.arange(B, device=device) % CAPTION_TOKENS + 1  # every caption length up to L
        return {"q": _rand(device, B, T, HEADS, HEAD_DIM, dtype=BF16),
                # k and v are views of one kv_linear output, as the model passes them
                "k": kv[:, :, 0].requires_grad_(), "v": kv[:, :, 1].requires_grad_(),
                "kv_mask": torch.arange(CAPTION_TOKENS, device=device)[None] < lengths[:, None]}
    return make


def _side(T):
    return int(T**0.5) * PATCH  # latent side


def cases() -> list[KernelCase]:
    out = []
    for T in TOKENS:
        B, rows, S = TOKENS_PER_CALL // T, _rows(TOKENS_PER_CALL // T, T), _side(T)
        out += [
            KernelCase("modulate", T, lambda d, r=rows: r(d, "x", "shift", "scale"),
                       lambda x, shift, scale: modulate(x, shift, scale, backend="triton", out_dtype=BF16),
                       lambda x, shift, scale: modulate_ref(x, shift, scale, out_dtype=BF16),
                       bwd_reads=("x", "scale"), launches=("modulate_fwd", "modulate_bwd")),
            KernelCase("gated_residual", T, lambda d, r=rows: r(d, "x", "gate", "y"),
                       lambda x, gate, y: gated_residual(x, gate, y, backend="triton", copy_dtype=BF16),
                       lambda x, gate, y: gated_residual_ref(x, gate, y, BF16),
                       bwd_reads=("gate", "y"), launches=("gated_residual_fwd_copy", "gated_residual_bwd_copy")),
            KernelCase("gated_residual_modulate", T, lambda d, r=rows: r(d, "x", "gate", "y", "shift", "scale"),
                       lambda **a: gated_residual_modulate(**a, backend="triton", out_dtype=BF16),
                       lambda **a: gated_residual_modulate_ref(**a, out_dtype=BF16),
                       bwd_reads=("x", "gate", "y", "scale"),
                       launches=("modulate_fwd_residual", "modulate_bwd_residual")),
            KernelCase("cross_attention", T, _cross_inputs(B, T),
                       lambda **a: cross_attention(**a, backend="triton"), cross_attention_ref,
                       bwd_reads=("q", "k", "v"), fwd_flops_per_token=2 * 2 * CAPTION_TOKENS * D,
                       launches=("cross_attn_fwd", "cross_attn_bwd")),
            KernelCase("patchify", T, lambda d, B=B, S=S: {"x": _rand(d, B, 4, S, S, dtype=F32)},
                       lambda x: patchify(x, PATCH, backend="triton"), lambda x: patchify_ref(x, PATCH),
                       launches=("patchify_fwd",)),
            KernelCase("unpatchify", T, lambda d, B=B, T=T: {"x": _rand(d, B, T, PATCH * PATCH * 8, dtype=BF16)},
                       lambda x, S=S: unpatchify(x, PATCH, 8, S, S, backend="triton"),
                       lambda x, S=S: unpatchify_ref(x, PATCH, 8, S, S), launches=("unpatchify_fwd", "unpatchify_bwd")),
        ]
    return out


def kernel_call(fn, inputs: dict, backward: bool):
    """One call of fn on inputs, as a callable; with backward, the gradients of every differentiable input too."""
    differentiable = [t for t in inputs.values() if t.requires_grad]
    grads = None

    def call():
        nonlocal grads
        out = fn(**inputs)
        if backward:
            outs = out if isinstance(out, tuple) else (out,)
            grads = grads or [torch.randn_like(o) for o in outs]
            torch.autograd.grad(outs, differentiable, grads)
    return call
