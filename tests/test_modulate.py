"""Fused adaLN-single modulation kernels (kernels/modulation.py) against their PyTorch references.

Triton runs through the CPU interpreter (tests/conftest.py). Every output and every gradient is held to the rule
of tests/tolerance.py: kernel vs an fp32 reference, PyTorch in the same dtype vs the same reference.
"""
import pytest
import torch
from tolerance import assert_kernel_close

from pixart_fast.kernels.modulation import (
    aot_specs,
    gated_residual,
    gated_residual_modulate,
    modulate,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# PixArt-XL/2's D = 1152 (not a power of two) with a few tokens; odd token counts with small D. At T = 77 the
# kernels split the tokens over four programs (3 x 20 + 17), each walking its rows in the pipelined loop, so the
# fp32 partial sums and a short last block are exercised.
SHAPES = [(2, 5, 1152), (2, 7, 96), (1, 77, 40)]


def _data(B, T, D, seed=0):
    """fp32 test data: residual stream x (non-zero mean), branch output y, the (B, 6, D) adaLN table
    (table + t0 in a block), upstream gradients dh, dm."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": 2 * torch.randn(B, T, D, generator=g) + 0.5,
        "y": torch.randn(B, T, D, generator=g),
        "table": 0.5 * torch.randn(B, 6, D, generator=g),
        "dh": torch.randn(B, T, D, generator=g),
        "dm": torch.randn(B, T, D, generator=g),
    }


def _leaves(data, dtype, compute_dtype):
    """Inputs rounded to `dtype`, then held in `compute_dtype` (the fp32 reference sees the same values).
    shift / scale / gate are (B, D) views of the (B, 6, D) table with row stride 6 * D, as chunk(6, 1) gives."""
    table = data["table"].to(dtype).to(compute_dtype)
    leaves = {"x": data["x"].to(dtype).to(compute_dtype), "y": data["y"].to(dtype).to(compute_dtype)}
    leaves |= {name: table[:, i] for i, name in enumerate(("shift", "scale", "gate"))}
    return {k: v.detach().requires_grad_() for k, v in leaves.items()}


def _check_all(names, run, dtype):
    """run(dtype_of_values, compute_dtype, backend) -> list of tensors; compare the kernel to the rule."""
    got = run(dtype, dtype, "triton")
    same = run(dtype, dtype, "torch")
    ref = run(dtype, torch.float32, "torch")
    for name, g, s, r in zip(names, got, same, ref, strict=True):
        assert g.dtype == s.dtype, f"{name}: dtype {g.dtype}, PyTorch gives {s.dtype}"
        assert_kernel_close(g, s, r, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_modulate(shape, dtype):
    data = _data(*shape)

    def run(dtype, compute_dtype, backend):
        v = _leaves(data, dtype, compute_dtype)
        m = modulate(v["x"], v["shift"], v["scale"], backend=backend)
        grads = torch.autograd.grad(m, (v["x"], v["shift"], v["scale"]), data["dm"].to(m.dtype))
        return [m, *grads]

    _check_all(["m", "dx", "dshift", "dscale"], run, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual(shape, dtype):
    data = _data(*shape)

    def run(dtype, compute_dtype, backend):
        v = _leaves(data, dtype, compute_dtype)
        out = gated_residual(v["x"], v["gate"], v["y"], backend=backend)
        grads = torch.autograd.grad(out, (v["x"], v["gate"], v["y"]), data["dh"].to(out.dtype))
        return [out, *grads]

    _check_all(["out", "dx", "dgate", "dy"], run, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_modulate(shape, dtype):
    data = _data(*shape)

    def run(dtype, compute_dtype, backend):
        v = _leaves(data, dtype, compute_dtype)
        h, m = gated_residual_modulate(v["x"], v["gate"], v["y"], v["shift"], v["scale"], backend=backend)
        inputs = (v["x"], v["gate"], v["y"], v["shift"], v["scale"])
        grads = torch.autograd.grad((h, m), inputs, (data["dh"].to(h.dtype), data["dm"].to(m.dtype)))
        return [h, m, *grads]

    _check_all(["h", "m", "dx", "dgate", "dy", "dshift", "dscale"], run, dtype)


def test_gated_residual_modulate_single_output_grads():
    """Gradients through m alone and through h alone (the other output's gradient is absent, not zero-filled
    by the caller)."""
    v = _leaves(_data(2, 7, 96), torch.float32, torch.float32)
    inputs = (v["x"], v["gate"], v["y"], v["shift"], v["scale"])
    for pick in (0, 1):
        got = gated_residual_modulate(*inputs, backend="triton")[pick]
        ref = gated_residual_modulate(*inputs, backend="torch")[pick]
        w = torch.randn_like(ref)
        got_grads = torch.autograd.grad((got * w).sum(), inputs, allow_unused=True)
        ref_grads = torch.autograd.grad((ref * w).sum(), inputs, allow_unused=True)
        names = ("dx", "dgate", "dy", "dshift", "dscale")
        for name, inp, g, r in zip(names, inputs, got_grads, ref_grads, strict=True):
            # Through h alone PyTorch leaves dshift / dscale unset; the kernel returns zeros.
            g, r = (torch.zeros_like(inp) if t is None else t for t in (g, r))
            assert_kernel_close(g, r, r, torch.float32, f"output {pick}: {name}")


def test_mixed_dtypes_follow_type_promotion():
    """bf16 activations with fp32 modulation vectors (autocast: table fp32 + t0 bf16): outputs promote like
    PyTorch's expression, gradients keep each input's dtype."""
    data = _data(2, 7, 96)

    def run(backend, upcast):
        act = torch.float32 if upcast else torch.bfloat16
        x = data["x"].to(torch.bfloat16).to(act).requires_grad_()
        y = data["y"].to(torch.bfloat16).to(act).requires_grad_()
        gate, shift, scale = (data["table"][:, i].clone().requires_grad_() for i in range(3))
        h, m = gated_residual_modulate(x, gate, y, shift, scale, backend=backend)
        grads = torch.autograd.grad((h, m), (x, gate, y, shift, scale), (data["dh"], data["dm"]))
        return [h, m, *grads]

    got, same, ref = run("triton", False), run("torch", False), run("torch", True)
    for name, g, s, r in zip(["h", "m", "dx", "dgate", "dy", "dshift", "dscale"], got, same, ref, strict=True):
        assert g.dtype == s.dtype, f"{name}: dtype {g.dtype}, PyTorch gives {s.dtype}"
        assert_kernel_close(g, s, r, torch.bfloat16, name)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_outputs_in_the_next_linears_dtype(low):
    """Autocast's dtype contract: fp32 residual stream and vectors, branch outputs in `low`; the modulated output
    (out_dtype) and the residual's copy (copy_dtype) written in `low`, their gradients arriving in `low`. A gate of
    None is a plain residual add. Kernel vs the PyTorch path (which casts) vs fp32, by the tolerance rule."""
    data = _data(2, 7, 96)
    names = ("x", "gate", "y", "shift", "scale")

    def run(backend, fp32):
        act = torch.float32 if fp32 else low
        x = data["x"].clone().requires_grad_()
        y = data["y"].to(low).to(act).requires_grad_()
        gate, shift, scale = (data["table"][:, i].clone().requires_grad_() for i in range(3))
        out_dtype = None if fp32 else low
        dlow = lambda t: t.to(low).to(act)  # noqa: E731  a Linear's input gradient: in its dtype
        m = modulate(x, shift, scale, backend=backend, out_dtype=out_dtype)
        h, h_copy = gated_residual(x, gate, y, backend=backend, copy_dtype=out_dtype or torch.float32)
        h1, m1 = gated_residual_modulate(x, None, y, shift, scale, backend=backend, out_dtype=out_dtype)
        h2, m2 = gated_residual_modulate(x, gate, y, shift, scale, backend=backend, out_dtype=out_dtype)
        outs = (m, h, h_copy, h1, m1, h2, m2)
        grads = (dlow(data["dm"]), data["dh"], dlow(data["dm"].flip(1)), data["dh"].flip(2), dlow(data["dm"]),
                 data["dh"], dlow(data["dm"].flip(2)))
        return [*outs, *torch.autograd.grad(outs, [x, gate, y, shift, scale], grads)]

    got, same, ref = run("triton", False), run("torch", False), run("torch", True)
    labels = ["m", "h", "h_copy", "h (gate 1)", "m (gate 1)", "h", "m"] + [f"d{n}" for n in names]
    for name, g, s, r in zip(labels, got, same, ref, strict=True):
        assert g.dtype == s.dtype, f"{name}: dtype {g.dtype}, PyTorch gives {s.dtype}"
        assert_kernel_close(g, s, r, low, name)
    assert [t.dtype for t in got[:7]] == [low, torch.float32, low, torch.float32, low, torch.float32, low]


def test_non_contiguous_activations_and_grads():
    """Token-strided x, a y whose D axis is not unit-stride, contiguous vectors, non-contiguous upstream grads.
    T = 21 also gives each of the two samples two backward programs (11 + 10 tokens)."""
    B, T, D = 2, 21, 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 2 * T, D, generator=g)[:, ::2].requires_grad_()
    y = torch.randn(B, D, T, generator=g).transpose(1, 2).requires_grad_()
    gate, shift, scale = (torch.randn(B, D, generator=g).requires_grad_() for _ in range(3))
    dh = torch.randn(B, T, 3 * D, generator=g)[..., :D]
    dm = torch.randn(B, D, T, generator=g).transpose(1, 2)
    assert not (x.is_contiguous() or y.is_contiguous() or dh.is_contiguous() or dm.is_contiguous())
    inputs = (x, gate, y, shift, scale)

    def fused(backend):
        h, m = gated_residual_modulate(*inputs, backend=backend)
        return [h, m, *torch.autograd.grad((h, m), inputs, (dh, dm))]

    def separate(backend):
        out = gated_residual(x, gate, y, backend=backend)
        m = modulate(x, shift, scale, backend=backend)
        return [out, m, *torch.autograd.grad((out, m), inputs, (dh, dm))]

    for run in (fused, separate):
        for name, got, ref in zip(["h", "m", "dx", "dgate", "dy", "dshift", "dscale"], run("triton"), run("torch")):
            assert_kernel_close(got, ref, ref, torch.float32, f"{run.__name__}: {name}")


def test_widest_row():
    """D = 8192, the widest row the kernels take."""
    v = _leaves(_data(1, 2, 8192), torch.float32, torch.float32)
    inputs = (v["x"], v["gate"], v["y"], v["shift"], v["scale"])
    got, ref = (gated_residual_modulate(*inputs, backend=b) for b in ("triton", "torch"))
    w = torch.randn_like(ref[1])
    got_grads = torch.autograd.grad(got[0].sum() + (got[1] * w).sum(), inputs)
    ref_grads = torch.autograd.grad(ref[0].sum() + (ref[1] * w).sum(), inputs)
    for name, g, r in zip(["h", "m", "dx", "dgate", "dy", "dshift", "dscale"], [*got, *got_grads], [*ref, *ref_grads]):
        assert_kernel_close(g, r, r, torch.float32, name)


def test_custom_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and the autograd wiring seen by torch.compile."""
    v = {k: t.detach() for k, t in _leaves(_data(2, 3, 40), torch.float32, torch.float32).items()}
    x, y, gate, shift, scale = v["x"], v["y"], v["gate"], v["shift"], v["scale"]
    ops = torch.ops.pixart_fast
    f32, bf16 = torch.float32, torch.bfloat16
    m, mean, rstd = ops.modulate_fwd(x, shift, scale, 1e-6, f32)
    dm = torch.randn_like(m)
    cases = [
        (ops.modulate_fwd, (x, shift, scale, 1e-6, f32)),
        (ops.modulate_fwd, (x, shift, scale, 1e-6, bf16)),
        (ops.modulate_bwd, (dm, x, scale, mean, rstd, f32)),
        (ops.gated_residual_fwd, (x, gate, y, None)),
        (ops.gated_residual_fwd, (x, gate, y, bf16)),
        (ops.gated_residual_bwd, (dm, None, gate, y, f32)),
        (ops.gated_residual_bwd, (dm, dm.to(bf16), gate, y, f32)),
        (ops.gated_residual_modulate_fwd, (x, gate, y, shift, scale, 1e-6, f32)),
        (ops.gated_residual_modulate_fwd, (x, None, y, shift, scale, 1e-6, bf16)),
        (ops.gated_residual_modulate_bwd, (dm, dm, x, gate, y, scale, mean, rstd, f32)),
        (ops.gated_residual_modulate_bwd, (dm, dm.to(bf16), x, None, y, scale, mean, rstd, f32)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 40)
    v = torch.randn(2, 40)
    with pytest.raises(ValueError, match=r"x must be \(B, T, D\), got shape \(3, 40\)"):
        modulate(x[0], v, v, backend="triton")
    with pytest.raises(ValueError, match=r"shift must be \(B, D\) = \(2, 40\) .* got \(2, 1, 40\)"):
        modulate(x, v[:, None], v, backend="triton")
    with pytest.raises(ValueError, match=r"gate must be \(B, D\) = \(2, 40\) .* got \(2, 39\)"):
        gated_residual(x, v[:, :39], x, backend="triton")
    with pytest.raises(ValueError, match=r"y must have x's shape \(2, 3, 40\), got \(2, 4, 40\)"):
        gated_residual_modulate(x, v, torch.randn(2, 4, 40), v, v, backend="triton")
    with pytest.raises(ValueError, match=r"scale is on meta but x is on cpu"):
        modulate(x, v, v.to("meta"), backend="triton")
    with pytest.raises(ValueError, match=r"D <= 8192 .* got D = 8200"):
        modulate(torch.randn(1, 1, 8200), torch.randn(1, 8200), torch.randn(1, 8200), backend="triton")
    with pytest.raises(TypeError, match=r"torch.float64"):
        gated_residual(x.double(), v.double(), x.double(), backend="triton")
    with pytest.raises(ValueError, match=r"at least one token, got x of shape \(2, 0, 40\)"):
        modulate(x[:, :0], v, v, backend="triton")


def test_aot_specs_record_every_launch_of_the_model():
    """aot_specs() records the launches the launchers make at XL shapes: every kernel and residual variant, in
    every precision and token count, each with its real arguments and launch configuration."""
    specs = aot_specs()
    assert {s["name"] for s in specs} == {
        "modulate_fwd", "modulate_fwd_residual", "modulate_fwd_add", "modulate_bwd", "modulate_bwd_residual",
        "modulate_bwd_add", "gated_residual_fwd", "gated_residual_bwd", "gated_residual_fwd_copy",
        "gated_residual_bwd_copy"}
    assert {s["call"].rsplit(" B=", 1)[0] for s in specs} == {"bf16 autocast", "fp16 autocast", "fp32"}
    for s in specs:
        assert len(s["args"]) + len(s["kwargs"]) - 2 == len(s["fn"].arg_names), s["name"]  # num_warps/stages extra
        assert s["kwargs"]["BLOCK_D"] == 2048 and s["kwargs"]["num_warps"] in (8, 16), s["name"]
    for s in specs:  # the dtype contract: what feeds a Linear (and its gradient) low, the residual stream fp32
        args = dict(zip(s["fn"].arg_names, s["args"]))
        low = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s["call"].split()[0]]
        assert {n: args[n].dtype for n in ("M", "COPY", "DM", "DCOPY") if args.get(n) is not None} == \
               {n: low for n in ("M", "COPY", "DM", "DCOPY") if args.get(n) is not None}, s["name"]
        assert all(args[n].dtype == torch.float32 for n in ("X", "H", "DX", "DOUT", "DH") if args.get(n) is not None)
