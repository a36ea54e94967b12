"""Cross-attention kernels (kernels/cross_attn.py) through the Triton CPU interpreter against the PyTorch reference.

Shapes stay small (B <= 2, H <= 2, N <= 77): the interpreter runs one program at a time. Keys and values are
always the model's non-contiguous views `kv.view(B, L, 2, H, Dh).unbind(2)`, so every test also covers them.
"""
import math

import pytest
import torch
from tolerance import assert_kernel_close

from pixart_fast.kernels import cross_attn
from pixart_fast.kernels.cross_attn import aot_specs, cross_attention, cross_attention_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, N, L, H, Dh, seed=0):
    """q (B, N, H, Dh), kv (B, L, 2, H, Dh) as kv_linear(y).view(...) gives it, a random mask, an output gradient."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, Dh, generator=g)
    kv = torch.randn(B, L, 2, H, Dh, generator=g)
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[:, 0] = True  # a non-empty caption; the empty one has its own test
    dout = torch.randn(B, N, H, Dh, generator=g)
    return q, kv, mask, dout


def run(fn, q, kv, mask, dout, dtype):
    """Forward and backward of fn(q, k, v, mask) in `dtype`; returns out, dq, dk, dv."""
    q = q.to(dtype, copy=True).requires_grad_()  # copy: fresh leaves, no gradient accumulates across runs
    kv = kv.to(dtype, copy=True).requires_grad_()
    k, v = kv.unbind(2)  # (B, L, H, Dh) views with strides of a (B, L, 2, H, Dh) tensor
    out = fn(q, k, v, mask)
    out.backward(dout.to(dtype))
    return out.detach(), q.grad, kv.grad[:, :, 0], kv.grad[:, :, 1]


def check_against_reference(q, kv, mask, dout, dtype):
    got = run(lambda *a: cross_attention(*a, backend="triton"), q, kv, mask, dout, dtype)
    torch_same = run(cross_attention_ref, q, kv, mask, dout, dtype)
    ref = run(cross_attention_ref, q, kv, mask, dout, torch.float32)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, torch_same, ref):
        assert a.dtype == dtype, f"{name} has dtype {a.dtype}, expected {dtype}"
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        assert_kernel_close(a, b, c, dtype, name)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N, L, Dh",
    [(77, 120, 72), (7, 7, 72), (33, 1, 72), (7, 7, 8), (7, 120, 128), (7, 7, 96)],
    ids=["model-L120", "L7", "L1", "Dh8", "Dh128", "Dh96"],
)
def test_matches_reference(N, L, Dh, dtype):
    check_against_reference(*make_inputs(2, N, L, 2, Dh, seed=N + L + Dh), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_caption_gives_zeros(dtype):
    q, kv, mask, dout = make_inputs(2, 7, 7, 2, 72, seed=1)
    mask[1] = False  # sample 1: a caption of length 0
    out, dq, dk, dv = check_against_reference(q, kv, mask, dout, dtype)
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert (x[1] == 0).all(), f"{name} of the empty caption is not zero"
    assert out[0].abs().max() > 0 and dk[0].abs().max() > 0  # the other sample still attends


def test_reference_empty_caption_is_zero_not_nan():
    q, kv, mask, dout = make_inputs(2, 7, 7, 2, 72, seed=2)
    mask[0] = False
    out, dq, dk, dv = run(cross_attention_ref, q, kv, mask, dout, torch.float32)
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(x).all(), f"reference {name} has NaN/inf"
        assert (x[0] == 0).all(), f"reference {name} of the empty caption is not zero"


def test_lse_is_the_masked_logsumexp():
    q, kv, mask, _ = make_inputs(2, 7, 7, 2, 72, seed=3)
    mask[1] = False
    k, v = kv.unbind(2)
    _, lse = torch.ops.pixart_fast.cross_attn_fwd(q, k, v, mask)
    scores = torch.einsum("bnhd,blhd->bhnl", q, k) / math.sqrt(72)
    expected = scores.masked_fill(~mask[:, None, None, :], float("-inf")).logsumexp(-1)  # (B, H, N)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 7)
    torch.testing.assert_close(lse[0], expected[0], rtol=1e-5, atol=1e-5)
    assert (lse[1] == float("-inf")).all()  # log of an empty sum


def test_mask_as_numbers_and_none():
    q, kv, mask, _ = make_inputs(2, 7, 7, 2, 72, seed=4)
    k, v = kv.unbind(2)
    expected = cross_attention(q, k, v, mask, backend="triton")
    for as_numbers in (mask.int(), mask.float()):
        torch.testing.assert_close(cross_attention(q, k, v, as_numbers, backend="triton"), expected, rtol=0, atol=0)
    full = torch.ones_like(mask)
    torch.testing.assert_close(
        cross_attention(q, k, v, None, backend="triton"), cross_attention(q, k, v, full, backend="triton"),
        rtol=0, atol=0,
    )


def test_strided_views_are_read_in_place():
    # Model layout (unbind of a (B, L, 2, H, Dh) tensor) and a query slice: passed to the kernel as they are.
    q_wide = torch.randn(2, 7, 2, 80)[..., :72]  # (B, N, H, Dh), row stride 80
    k, v = torch.randn(2, 5, 2, 2, 72).unbind(2)
    for x in (q_wide, k, v):
        assert not x.is_contiguous() and cross_attn._aligned(x) is x
    # A transposed head dim cannot be loaded as rows: copied, same numbers.
    k_t = torch.randn(72, 2, 5, 2).permute(1, 2, 3, 0)
    assert k_t.stride(-1) != 1 and cross_attn._aligned(k_t) is not k_t
    torch.testing.assert_close(cross_attn._aligned(k_t), k_t, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_query_head_dim_and_expanded_gradient(dtype):
    B, N, L, H, Dh = 2, 7, 7, 2, 72
    g = torch.Generator().manual_seed(5)
    q_base = torch.randn(Dh, B, N, H, generator=g)
    v_base = torch.randn(B, L, H, Dh + 8, generator=g)
    k_base = torch.randn(B, L, H, Dh, generator=g)
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[:, 0] = True

    def grads(fn, dt):
        qb, kb, vb = (x.to(dt, copy=True).requires_grad_() for x in (q_base, k_base, v_base))
        q = qb.permute(1, 2, 3, 0)  # head dim not unit-stride: the launcher copies it
        v = vb[..., :Dh]  # row stride Dh + 8: read in place
        out = fn(q, kb, v, mask)
        out.sum().backward()  # an expanded, stride-0 output gradient
        return out.detach(), qb.grad.permute(1, 2, 3, 0), kb.grad, vb.grad[..., :Dh]

    got = grads(lambda *a: cross_attention(*a, backend="triton"), dtype)
    torch_same = grads(cross_attention_ref, dtype)
    ref = grads(cross_attention_ref, torch.float32)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, torch_same, ref):
        assert_kernel_close(a, b, c, dtype, name)


@pytest.mark.parametrize("splits", [2, 3])
def test_backward_split_over_queries(splits):
    # N = 77 is 5 query blocks of 16: 2 splits walk 3 + 2 blocks, 3 splits 2 + 2 + 1; dk/dv partials are summed.
    q, kv, mask, dout = make_inputs(2, 77, 7, 2, 72, seed=6)
    k, v = kv.unbind(2)
    out, lse = torch.ops.pixart_fast.cross_attn_fwd(q, k, v, mask)
    one = cross_attn._launch_cross_attention_bwd(dout, q, k, v, lse, mask, splits=1)
    many = cross_attn._launch_cross_attention_bwd(dout, q, k, v, lse, mask, splits=splits)
    for name, a, b in zip(("dq", "dk", "dv"), many, one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_backend_torch_is_the_reference():
    q, kv, mask, _ = make_inputs(1, 7, 7, 1, 72, seed=7)
    k, v = kv.unbind(2)
    torch.testing.assert_close(cross_attention(q, k, v, mask, backend="torch"), cross_attention_ref(q, k, v, mask))


def test_custom_ops_pass_opcheck():
    q, kv, mask, dout = make_inputs(1, 7, 7, 1, 8, seed=8)
    k, v = kv.unbind(2)
    torch.library.opcheck(torch.ops.pixart_fast.cross_attn_fwd.default, (q, k, v, mask))
    out, lse = torch.ops.pixart_fast.cross_attn_fwd(q, k, v, mask)
    torch.library.opcheck(torch.ops.pixart_fast.cross_attn_bwd.default, (dout, q, k, v, lse, mask))


def _tensors(B=1, N=7, L=7, H=1, Dh=72):
    return torch.randn(B, N, H, Dh), torch.randn(B, L, H, Dh), torch.randn(B, L, H, Dh)


@pytest.mark.parametrize("Dh", [12, 136])
def test_unsupported_head_dim(Dh):
    q, k, v = _tensors(Dh=Dh)
    with pytest.raises(ValueError, match=f"head dim {Dh} is not supported"):
        cross_attention(q, k, v, backend="triton")


def test_too_many_keys():
    q, k, v = _tensors(L=129)
    with pytest.raises(ValueError, match="129 keys"):
        cross_attention(q, k, v, backend="triton")


def test_shape_errors():
    q, k, v = _tensors()
    with pytest.raises(ValueError, match="q must be 4-D"):
        cross_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k \(1, 7, 2, 72\)"):
        cross_attention(q, torch.randn(1, 7, 2, 72), torch.randn(1, 7, 2, 72))  # heads differ from q's
    with pytest.raises(ValueError, match=r"v \(1, 6, 1, 72\)"):
        cross_attention(q, k, torch.randn(1, 6, 1, 72))
    with pytest.raises(ValueError, match=r"kv_mask must have shape \(B, L\) = \(1, 7\), got \(1, 8\)"):
        cross_attention(q, k, v, torch.ones(1, 8, dtype=torch.bool))


def test_dtype_and_device_errors():
    q, k, v = _tensors()
    with pytest.raises(TypeError, match="share one dtype"):
        cross_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="different devices"):
        cross_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="backend must be one of"):
        cross_attention(q, k, v, backend="cuda")


def test_aot_specs_match_the_launch_configuration():
    """aot_specs() records the launchers' own launches at XL shapes (Dh 72, L 120) under bf16 and fp16 autocast
    (in fp32 the model's calls run PyTorch's attention on a GPU), as on sm_90: the head dim split, not padded."""
    specs = aot_specs()
    assert {s["name"] for s in specs} == {"cross_attn_fwd", "cross_attn_bwd"}
    assert {s["call"].rsplit(" B=", 1)[0] for s in specs} == {"bf16 autocast", "fp16 autocast"}
    for spec in specs:
        kind = "fwd" if spec["name"].endswith("fwd") else "bwd"
        kwargs = dict(spec["kwargs"])
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[spec["call"].split()[0]]
        cfg = cross_attn._config(kind, 72, 120, dtype, kwargs["DOT_FP32"], 90)  # the launchers' at Dh 72, L 120
        assert (kwargs.pop("num_warps"), kwargs.pop("num_stages")) == (cfg["num_warps"], cfg["num_stages"])
        assert kwargs == cfg["constexprs"]
        assert kwargs["BLOCK_L"] == 128 and (kwargs["BLOCK_D0"], kwargs["BLOCK_D1"]) == (64, 16)
        assert kwargs["NUM_STAGES"] == 2 and kwargs["BLOCK_N"] == 64


def test_fp32_on_a_gpu_runs_pytorch_attention_under_auto(monkeypatch):
    """The kernels are for 16-bit tensor cores (their fp32 tiles spill): "auto" gives fp32 on a GPU to PyTorch's
    attention, 16 bits to the kernels; "triton" runs fp32 through them."""
    q, kv, mask, _ = make_inputs(1, 7, 7, 1, 72, seed=9)
    k, v = kv.unbind(2)
    launched = []
    monkeypatch.setattr(cross_attn, "interpreting", lambda: False)  # as on a GPU
    monkeypatch.setattr(cross_attn.CrossAttentionFunction, "apply", lambda *a: launched.append(a[0].dtype))
    torch.testing.assert_close(cross_attention(q, k, v, mask), cross_attention_ref(q, k, v, mask))
    cross_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    cross_attention(q, k, v, mask, backend="triton")
    assert launched == [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_split_over_queries(dtype, monkeypatch):
    """One program per (batch, head) walks all query blocks (keys and values loaded once); several share them when
    the batch is small. N = 150: 3 blocks of 64, the last one partial."""
    q, kv, mask, _ = make_inputs(1, 150, 7, 1, 72, seed=10)
    q, k, v = q.to(dtype), *kv.to(dtype).unbind(2)
    results = {}
    for splits in (1, 2, 3):
        monkeypatch.setattr(cross_attn, "_forward_splits", lambda n_blocks, bh, device, s=splits: s)
        results[splits] = cross_attn._launch_cross_attention_fwd(q, k, v, mask)
    for splits in (2, 3):
        for a, b in zip(results[splits], results[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_kernel_close(results[1][0], cross_attention_ref(q, k, v, mask),
                        cross_attention_ref(q.float(), k.float(), v.float(), mask), dtype, "out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N, L, Dh", [(77, 120, 72), (33, 1, 72), (7, 7, 8)], ids=["model-L120", "L1", "Dh8"])
def test_the_hopper_backward_matches_reference(N, L, Dh, dtype, monkeypatch):
    """The backward's (keys, queries) form, which the launcher picks for 16-bit inputs on compute capability 9.0
    and later."""
    monkeypatch.setattr(cross_attn, "compute_capability", lambda device: 90)
    assert cross_attn._config("bwd", Dh, L, dtype, False, cross_attn.compute_capability(None))["constexprs"][
        "KEYS_MAJOR"]
    check_against_reference(*make_inputs(2, N, L, 2, Dh, seed=N + L + Dh), dtype)


@pytest.mark.parametrize("head_dim, blocks", [(72, (64, 16)), (8, (16, 0)), (24, (16, 16)), (64, (64, 0)),
                                              (96, (64, 32)), (120, (64, 64)), (128, (128, 0))])
def test_head_dim_blocks_cover_the_head_dim_in_two_dots(head_dim, blocks):
    assert cross_attn.head_dim_blocks(head_dim) == blocks