"""The dtype contract of the fused kernels in the model: under bf16 / fp16 autocast the
residual stream stays fp32 and what feeds a Linear is written in the autocast dtype by the kernel that makes it,
so no separate cast pass is left around a fused kernel, forward or backward. Counted with the dispatcher."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pixart_fast.model import CONFIGS, PixArt

CASTS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.copy.default}
LOW = [torch.bfloat16, torch.float16]


class CountCasts(TorchDispatchMode):
    """Records every cast of an image-token activation (shape (B, T, ...)) that reaches the dispatcher. Ops inside
    a custom op's implementation run below the mode and are not seen. Casts of weights (autocast's, per Linear)
    and of the (B, 6, D) modulation vectors' gradient (t0 in the autocast dtype + the fp32 table) are not
    activations: 6 / T of one activation's traffic."""

    def __init__(self, tokens: tuple[int, int]):
        super().__init__()
        self.tokens, self.casts = tokens, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in CASTS and tuple(out.shape[:2]) == self.tokens:
            self.casts.append(f"{func} {args[0].dtype} -> {out.dtype} {tuple(out.shape)}")
        return out


def _model(kernels: str) -> PixArt:
    torch.manual_seed(0)
    model = PixArt(CONFIGS["PixArt-tiny"], kernels=kernels)
    with torch.no_grad():  # no zero-initialised layer, so every gradient is non-trivial
        for p in model.parameters():
            p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    return model


def _inputs(cfg, B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randn(B, cfg.max_tokens, cfg.caption_channels, generator=g)
    mask = torch.arange(cfg.max_tokens)[None] < torch.tensor([[3], [cfg.max_tokens]])
    return x, torch.tensor([3.0, 500.0]), y, mask


def _block_inputs(model: PixArt, dtype: torch.dtype) -> tuple:
    """The first block's arguments as the model hands them under autocast, as fresh leaves that require grad."""
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        model(*_inputs(model.config))
    hook.remove()
    return tuple(a.detach().requires_grad_(a.is_floating_point()) for a in seen[0])


@pytest.mark.parametrize("dtype", LOW)
def test_no_cast_pass_around_the_fused_kernels_in_a_block(dtype):
    """One PixArtBlock forward + backward under autocast with the Triton kernels (interpreter): no image-token
    activation is cast by a separate op (unfused, there would be 8 per block: 3 Linear inputs cast forward and
    their gradients back, and the cross-attention output's gradient). The residual stream comes out fp32, the modulated
    copy (the next Linear's input) in the autocast dtype."""
    model = _model("triton")
    block = model.blocks[0]
    args = _block_inputs(model, dtype)
    x_in, x_mod_in = args[0], args[1]
    assert x_in.dtype == torch.float32 and x_mod_in.dtype == dtype  # as the model's own first modulate gives them
    counter = CountCasts(tuple(x_in.shape[:2]))
    with counter, torch.autocast("cpu", dtype=dtype):
        x, x_mod = block(*args)
        torch.autograd.grad((x, x_mod), [a for a in args if a.requires_grad],
                            (torch.randn_like(x), torch.randn_like(x_mod)))
    assert (x.dtype, x_mod.dtype) == (torch.float32, dtype)
    assert counter.casts == []


@pytest.mark.parametrize("dtype", LOW)
def test_the_model_with_kernels_equals_the_torch_path_under_autocast(dtype):
    """The whole model under autocast, Triton kernels (interpreter) against the PyTorch path in the same autocast,
    both against the fp32 model: output and every parameter gradient by the kernel rule (tests/tolerance.py)."""
    from tolerance import assert_kernel_close
    ref = _model("torch")
    tri = _model("triton")
    inputs = _inputs(ref.config)
    results = []
    for model, autocast in ((tri, True), (ref, True), (ref, False)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(*inputs, force_drop_ids=torch.tensor([False, True]))
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach().float()] + [p.grad.clone() for p in model.parameters()])
    names = ["output"] + [n for n, _ in ref.named_parameters()]
    for name, got, same, fp32 in zip(names, *results, strict=True):
        assert_kernel_close(got, same, fp32, dtype, name)
