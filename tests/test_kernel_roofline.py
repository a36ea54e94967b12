"""The bytes-and-FLOPs model of kernels/roofline.py against independent counts: the sizes
of the PyTorch references' input, output and gradient tensors at the same shapes and dtypes (meta tensors), and
PyTorch's FlopCounterMode on the reference attention."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pixart_fast.kernels.cross_attn import cross_attention_ref
from pixart_fast.kernels.modulation import gated_residual_modulate_ref, gated_residual_ref, modulate_ref
from pixart_fast.kernels.patch_copy import patchify_ref, unpatchify_ref
from pixart_fast.kernels.roofline import TOKENS_PER_CALL, roofline_rows
from pixart_fast.gpus import GPUS

D, H, DH, L, T = 1152, 16, 72, 120, 256
B = TOKENS_PER_CALL // T
F32, BF16 = torch.float32, torch.bfloat16


def _size(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _t(*shape, dtype=F32):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)


def _reference_bytes() -> dict:
    """Per launch, the bytes of the op's own tensors under bf16 autocast: forward, its inputs and outputs; backward,
    the output gradients (in the outputs' dtypes), what it reads again, and the gradients of its inputs (the (B, D)
    vector gradients leave the kernels as fp32 partial sums, counted as private; at 256 tokens the cross-attention
    backward runs one program per (batch, head) and writes dk / dv in bf16)."""
    x, y, q = _t(B, T, D), _t(B, T, D, dtype=BF16), _t(B, T, H, DH, dtype=BF16)
    shift, scale, gate = _t(B, D), _t(B, D), _t(B, D)
    k, v, mask = _t(B, L, H, DH, dtype=BF16), _t(B, L, H, DH, dtype=BF16), torch.empty(B, L, dtype=torch.bool,
                                                                                        device="meta")
    m = modulate_ref(x, shift, scale, out_dtype=BF16)
    h, h_copy = gated_residual_ref(x, gate, y, BF16)
    h1, m1 = gated_residual_modulate_ref(x, None, y, shift, scale, out_dtype=BF16)
    h2, m2 = gated_residual_modulate_ref(x, gate, y, shift, scale, out_dtype=BF16)
    o = cross_attention_ref(q, k, v, mask)
    side = 2 * int(T ** 0.5)
    latents, tokens = _t(B, 4, side, side), _t(B, T, 2 * 2 * 8, dtype=BF16)
    image = unpatchify_ref(tokens, 2, 8, side, side)
    return {
        "modulate_fwd": _size(x, shift, scale, m),
        "modulate_bwd": _size(m, x, scale, x),  # dm; x, scale; dx
        "gated_residual_fwd_copy": _size(x, gate, y, h, h_copy),
        "gated_residual_bwd_copy": _size(h, h_copy, gate, y, x, y),  # dout, dcopy; gate, y; dx, dy
        "modulate_fwd_add": _size(x, y, shift, scale, h1, m1),
        "modulate_bwd_add": _size(h1, m1, x, y, scale, x, y),  # dh, dm; x, y, scale; dx, dy
        "modulate_fwd_residual": _size(x, gate, y, shift, scale, h2, m2),
        "modulate_bwd_residual": _size(h2, m2, x, gate, y, scale, x, y),
        "cross_attn_fwd": _size(q, k, v, mask, o),
        "cross_attn_bwd": _size(o, q, k, v, mask, q, k, v),  # do; q, k, v, mask (not o); dq, dk, dv (one split)
        "patchify_fwd": _size(latents, patchify_ref(latents, 2)),
        "unpatchify_fwd": _size(tokens, image),
        "unpatchify_bwd": _size(image, tokens),
    }


def test_bytes_per_launch_are_the_references_tensors_plus_the_kernels_private_ones():
    rows = {r["kernel"]: r for r in roofline_rows(tokens=(T,), gpus={"H100": "sm_90"})}
    expected = _reference_bytes()
    assert set(rows) == set(expected)
    for name, nbytes in expected.items():
        assert rows[name]["bytes"] - rows[name]["private_bytes"] == nbytes, name
    # The private bytes: fp32 LayerNorm statistics (8 bytes a token) and logsumexp (4 bytes a token and head) ...
    assert rows["modulate_fwd"]["private_bytes"] == 8 * B * T
    assert rows["cross_attn_fwd"]["private_bytes"] == 4 * B * H * T
    # ... and fp32 partial sums; the cross-attention backward at 256 tokens has none (one split: dk, dv in bf16).
    assert rows["cross_attn_bwd"]["private_bytes"] == 4 * B * H * T
    assert rows["modulate_bwd"]["private_bytes"] > 8 * B * T  # the (B, n_blocks, D) dshift / dscale partials


def test_flops_are_flopcountermodes_on_the_reference_attention():
    q, k, v = _t(B, T, H, DH, dtype=BF16), _t(B, L, H, DH, dtype=BF16), _t(B, L, H, DH, dtype=BF16)
    counter = FlopCounterMode(display=False)
    with counter:
        out = cross_attention_ref(q, k, v)
    forward = counter.get_total_flops()
    with counter:
        torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
    backward = counter.get_total_flops()
    rows = {r["kernel"]: r for r in roofline_rows(tokens=(T,), gpus={"H100": "sm_90"})}
    assert rows["cross_attn_fwd"]["flops"] == forward == 4 * B * T * L * D
    # The kernel's backward recomputes q k^T: PyTorch's four backward products plus one forward product.
    assert rows["cross_attn_bwd"]["flops"] == backward + forward // 2
    assert all(r["flops"] == 0 for r in rows.values() if not r["kernel"].startswith("cross_attn"))


@pytest.mark.parametrize("gpu", ["A100-80GB", "H100", "H200"])
def test_roofline_time_reads_the_gpu_table(gpu):
    target = "sm_80" if gpu.startswith("A100") else "sm_90"
    for r in roofline_rows(tokens=(T,), gpus={gpu: target}):
        memory_s, compute_s = r["bytes"] / (GPUS[gpu].bandwidth_gbs * 1e9), r["flops"] / (GPUS[gpu].tflops * 1e12)
        assert r["roofline_us"] == pytest.approx(max(memory_s, compute_s) * 1e6, rel=1e-12), r
        assert r["bound"] == "memory"  # every kernel at XL shapes: even attention over 120 keys
