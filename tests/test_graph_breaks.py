"""torch.compile sees the whole model as one graph: no graph break in fp32 or under autocast, with either kernel
backend (the Triton kernels run through the interpreter here)."""
import pytest
import torch

from pixart_fast.model import CONFIGS, PixArt


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["PixArt-tiny", "PixArtMS-tiny"])
def test_the_model_compiles_to_one_graph(name, dtype, kernels):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PixArt(CONFIGS[name], kernels=kernels).eval()
    c = model.config
    B = 2
    x = torch.randn(B, c.in_channels, c.input_size, c.input_size)
    y, mask = torch.randn(B, c.max_tokens, c.caption_channels), torch.rand(B, c.max_tokens) < 0.7
    extra = {"img_hw": torch.tensor([[64.0, 64.0]] * B), "aspect_ratio": torch.ones(B)} if c.micro_conditions else {}
    with torch.no_grad(), torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
        explained = torch._dynamo.explain(model)(x, torch.tensor([3, 500]), y, mask, **extra)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
