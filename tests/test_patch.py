"""pixart_fast.patch: the fused kernels swapped into models we did not write -- diffusers' PixArtTransformer2DModel
(alpha- and Sigma-like configs), a bare BasicTransformerBlock, diffusers' DiTTransformer2DModel, a
facebookresearch/DiT-style model written below -- and into our stage-1 DiT.

Patched against unpatched: outputs and every parameter gradient by the kernel rule (tests/tolerance.py), the
Triton kernels running through the CPU interpreter (tests/conftest.py). The calls of pixart_fast's ops are counted,
so a patch that silently ran the original code could not pass.
"""
import collections
import copy
import math
import pathlib
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tolerance import assert_kernel_close
from torch.utils._python_dispatch import TorchDispatchMode

import pixart_fast.model
from pixart_fast.patcher import ATTR, patch, unpatch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use the kernels in your own DiT"


# ----------------------------------------------------------------------------------------------------------
# A DiT written like facebookresearch/DiT's models.py (timm-style PatchEmbed, Attention, Mlp), independent of
# pixart_fast.model: the patch must find its parts by structure alone.
# ----------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.frequency_embedding_size // 2
        args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                 num_classes=5):
        super().__init__()
        self.out_channels = in_channels * 2  # learn sigma
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # + the null class
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))  # (N, out_channels, H, W)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


class KernelCalls(TorchDispatchMode):
    """Counts the calls of pixart_fast's custom ops (forward and backward kernels) while active."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pixart_fast":
            self.calls[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def randomize(model, seed=0):
    """Every parameter random (zero-initialised gates and output layers would make gradients trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def forward_backward(model, inputs):
    """Output of model(**inputs) and every parameter's gradient after backward of a fixed weighting of it."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out = out[0] if isinstance(out, tuple) else out
    (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def check_patched_equals_unpatched(model, inputs, ops):
    """Patch a copy of model; both run forward and backward on inputs. Outputs and every parameter gradient
    agree by the kernel rule in fp32, and the patched run calls each pixart_fast op in `ops`. Returns the report."""
    patched = copy.deepcopy(model)
    report = patch(patched)
    out_ref, grads_ref = forward_backward(model, inputs)
    with KernelCalls() as counter:
        out, grads = forward_backward(patched, inputs)
    assert set(ops) <= set(counter.calls), f"expected calls of {sorted(ops)}, got {dict(counter.calls)}\n{report}"
    assert_kernel_close(out, out_ref, out_ref, torch.float32, "output")
    assert grads.keys() == grads_ref.keys()
    for name, g_ref in grads_ref.items():
        assert g_ref is not None and grads[name] is not None, f"{name} got no gradient"
        assert_kernel_close(grads[name], g_ref, g_ref, torch.float32, name)
    return report


MODULATE_OPS = {"modulate_fwd", "modulate_bwd", "gated_residual_fwd", "gated_residual_bwd"}
FUSED_OPS = {"gated_residual_modulate_fwd", "gated_residual_modulate_bwd"}
CROSS_ATTN_OPS = {"cross_attn_fwd", "cross_attn_bwd"}
PATCHIFY_OPS = {"image_to_tokens"}  # patchify's forward; its backward runs only for inputs that need a gradient

# PixArt-alpha 1024-MS-like: micro-conditions (resolution, aspect ratio). Sigma-like: the same class without
# micro-conditions and with positions interpolated by 2, fed a non-square input. Both tiny: D = 48 (micro-
# conditions need a multiple of 3), 2 heads of 24.
PIXART_CONFIGS = {
    "alpha": dict(use_additional_conditions=True, interpolation_scale=1),
    "sigma": dict(use_additional_conditions=False, interpolation_scale=2),
}


def diffusers_pixart(variant, seed=0):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    torch.manual_seed(seed)
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                               out_channels=8, num_layers=2, cross_attention_dim=48, sample_size=8,
                                               patch_size=2, caption_channels=24, **PIXART_CONFIGS[variant])
    return randomize(model, seed)


def pixart_inputs(variant, W=8, seed=1):
    """Batch 2, 8 x W latents, captions of 6 tokens of which 6 and 2 are real (the 2-D 0/1 mask diffusers takes)."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, W, generator=g), timestep=torch.tensor([3, 700]),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]]), return_dict=False)
    if PIXART_CONFIGS[variant]["use_additional_conditions"]:
        inputs["added_cond_kwargs"] = {"resolution": torch.tensor([[64.0, 64.0], [64.0, 96.0]]),
                                       "aspect_ratio": torch.tensor([[1.0], [1.5]])}
    return inputs


def ada_norm_single_block(**overrides):
    pytest.importorskip("diffusers", reason="diffusers not installed")
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    config = dict(dim=32, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=24,
                  activation_fn="gelu-approximate", num_embeds_ada_norm=1000, attention_bias=False,
                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return randomize(BasicTransformerBlock(**(config | overrides)))


def block_inputs(dtype=torch.float32, seed=1):
    """16 image tokens; captions of 6 tokens as diffusers' additive (B, 1, L) bias: 4 and 1 tokens kept."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.tensor([[0.0] * 4 + [-10000.0] * 2, [0.0] + [-10000.0] * 5])[:, None]
    inputs = dict(hidden_states=torch.randn(2, 16, 32, generator=g), timestep=torch.randn(2, 6 * 32, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g), encoder_attention_mask=bias)
    return {k: v.to(dtype) for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------------------------
# Patched equals unpatched
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, W", [("alpha", 8), ("sigma", 12)])
def test_diffusers_pixart_patched_equals_unpatched(variant, W):
    report = check_patched_equals_unpatched(diffusers_pixart(variant), pixart_inputs(variant, W),
                                            MODULATE_OPS | CROSS_ATTN_OPS | PATCHIFY_OPS)
    assert {path for path, _ in report.swapped} == {
        "pos_embed.proj", "transformer_blocks.0", "transformer_blocks.0.attn2",
        "transformer_blocks.1", "transformer_blocks.1.attn2"}
    assert report.skipped == []


def test_ada_norm_single_block_patched_equals_unpatched():
    report = check_patched_equals_unpatched(ada_norm_single_block(), block_inputs(), MODULATE_OPS | CROSS_ATTN_OPS)
    assert [path for path, _ in report.swapped] == ["", "attn2"]


def test_caption_with_every_token_masked_attends_to_all_as_diffusers_does():
    """Under an all -10000 bias diffusers' softmax sees every score shifted alike, i.e. attends to all keys; the
    patch does the same, exactly, where diffusers loses ~1e-3 to the shift (fp32 spacing at 10000). Reference:
    the unpatched block without a mask."""
    ref = ada_norm_single_block()
    patched = copy.deepcopy(ref)
    patch(patched)
    inputs = block_inputs()
    masked = inputs | {"encoder_attention_mask": torch.full((2, 1, 6), -10000.0)}
    with torch.no_grad():
        exact = ref(**(inputs | {"encoder_attention_mask": None}))
        assert_kernel_close(patched(**masked), ref(**masked), exact, torch.float32, "output")


def test_ada_norm_single_block_in_bf16():
    """bf16 weights and inputs: the patched block's output and parameter gradients against an fp32 reference
    with the same (bf16-representable) values, no worse than twice diffusers' own bf16 error."""
    ref = ada_norm_single_block()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    inputs = block_inputs(torch.bfloat16)
    out_ref, grads_ref = forward_backward(ref, {k: v.float() for k, v in inputs.items()})
    torch_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    patched = copy.deepcopy(torch_bf16)
    patch(patched)
    out_torch, grads_torch = forward_backward(torch_bf16, inputs)
    with KernelCalls() as counter:
        out, grads = forward_backward(patched, inputs)
    assert MODULATE_OPS | CROSS_ATTN_OPS <= set(counter.calls)
    assert out.dtype == torch.bfloat16
    assert_kernel_close(out, out_torch, out_ref, torch.bfloat16, "output")
    for name, g_ref in grads_ref.items():
        assert grads[name].dtype == torch.bfloat16
        assert_kernel_close(grads[name], grads_torch[name], g_ref, torch.bfloat16, name)


def test_ada_norm_single_block_under_bf16_autocast_feeds_its_linears_without_casts():
    """fp32 weights under bf16 autocast (the trainer's GPU setting): the patched block's kernels write the modulated
    copies in bf16, so the Linears after them read them as they are; output and gradients within the kernel rule
    of diffusers' own block under the same autocast, against fp32."""
    ref = ada_norm_single_block()
    inputs = block_inputs()
    out_ref, grads_ref = forward_backward(ref, inputs)
    patched = copy.deepcopy(ref)
    patch(patched)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_torch, grads_torch = forward_backward(ref, inputs)
        seen = []
        hook = patched.attn1.to_q.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        out, grads = forward_backward(patched, inputs)
        hook.remove()
    assert seen == [torch.bfloat16]  # the modulated input arrives in the autocast dtype
    assert_kernel_close(out.float(), out_torch.float(), out_ref, torch.bfloat16, "output")
    for name, g_ref in grads_ref.items():
        assert_kernel_close(grads[name], grads_torch[name], g_ref, torch.bfloat16, name)


def test_diffusers_dit_patched_equals_unpatched():
    """diffusers' DiTTransformer2DModel: BasicTransformerBlocks with norm_type 'ada_norm_zero', no cross-attention."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    torch.manual_seed(0)
    model = randomize(diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                      out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                      num_embeds_ada_norm=10))
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([3, 700]),
                  class_labels=torch.tensor([1, 4]), return_dict=False)
    report = check_patched_equals_unpatched(model, inputs, MODULATE_OPS | FUSED_OPS | PATCHIFY_OPS)
    assert {path for path, _ in report.swapped} == {"pos_embed.proj", "transformer_blocks.0", "transformer_blocks.1"}


def test_our_stage1_dit_patched_equals_unpatched():
    model = randomize(pixart_fast.model.DiT(pixart_fast.model.CONFIGS["PixArt-tiny"]))
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([3.0, 700.0]),
                  labels=torch.tensor([1, 4]), force_drop_ids=torch.tensor([False, True]))
    report = check_patched_equals_unpatched(model, inputs, MODULATE_OPS | FUSED_OPS)
    assert {path for path, _ in report.swapped} == {"blocks.0", "blocks.1", "final_layer"}
    # Its patch embedding is pixart_fast's own, which picks its kernels at construction: said, not swapped.
    assert [path for path, _ in report.skipped] == ["x_embedder"]


def test_facebookresearch_style_dit_patched_equals_unpatched():
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([3, 700]), y=torch.tensor([1, 5]))
    report = check_patched_equals_unpatched(randomize(DiT()), inputs, MODULATE_OPS | FUSED_OPS | PATCHIFY_OPS)
    assert {path for path, _ in report.swapped} == {"x_embedder.proj", "blocks.0", "blocks.1", "final_layer"}


# ----------------------------------------------------------------------------------------------------------
# State dicts, unpatch, training
# ----------------------------------------------------------------------------------------------------------


def test_state_dict_unchanged_and_unpatch_restores_the_original_exactly():
    model = diffusers_pixart("sigma")
    inputs = pixart_inputs("sigma")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = [name for name, _ in model.named_buffers()]
    processors = model.attn_processors
    with torch.no_grad():
        before = model(**inputs)[0]

    def assert_state_unchanged():
        now = model.state_dict()
        assert list(now) == list(state) and [name for name, _ in model.named_buffers()] == buffers
        assert all(torch.equal(now[k], v) for k, v in state.items())

    report = patch(model)
    assert getattr(model, ATTR) is report and "transformer_blocks.0" in str(report)
    assert_state_unchanged()
    model.load_state_dict(state)  # loads into the patched model unchanged (strict)
    with pytest.raises(ValueError, match="already patched"):
        patch(model)

    unpatch(model)
    assert_state_unchanged()
    assert not hasattr(model, ATTR)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(model.attn_processors[k] is v for k, v in processors.items())
    with torch.no_grad(), KernelCalls() as counter:
        after = model(**inputs)[0]
    assert torch.equal(after, before) and not counter.calls
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)
    patch(model)  # and it can be patched again; a deep copy (an EMA model, say) is patched alike, undone alone
    twin = copy.deepcopy(model)
    assert "forward" in twin.transformer_blocks[0].__dict__
    unpatch(twin)
    assert all("forward" not in m.__dict__ for m in twin.modules())
    assert "forward" in model.transformer_blocks[0].__dict__
    unpatch(model)


def test_training_step_of_patched_diffusers_model_matches():
    """One training step -- train mode, diffusers' gradient checkpointing, MSE loss, AdamW -- patched against
    unpatched: the loss, every gradient and every parameter after the step agree by the kernel rule.

    AdamW's eps is 1e-3 so that the step is a smooth function of the gradient (|d step / d grad| <= lr / eps = 1).
    With the default 1e-8 the first step is about lr * sign(grad), and the key biases have a true gradient of 0
    (softmax ignores a shift shared by all keys): their fp32 gradients are rounding noise, whose sign two
    implementations need not share."""
    ref = diffusers_pixart("alpha").train()
    ref.enable_gradient_checkpointing()
    patched = copy.deepcopy(ref)
    patch(patched)
    ref_before = {name: p.detach().clone() for name, p in ref.named_parameters()}
    inputs = pixart_inputs("alpha")
    target = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (ref, patched):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.03, eps=1e-3)
        with KernelCalls() as counter:
            loss = F.mse_loss(model(**inputs)[0], target)
            loss.backward()
        assert bool(counter.calls) == (model is patched)
        losses.append(loss.detach())
        if model is patched:
            for (name, p_ref), p in zip(ref.named_parameters(), patched.parameters()):
                assert_kernel_close(p.grad, p_ref.grad, p_ref.grad, torch.float32, name + " grad")
        opt.step()
    assert_kernel_close(losses[1], losses[0], losses[0], torch.float32, "loss")
    for (name, p_ref), p in zip(ref.named_parameters(), patched.parameters()):
        assert_kernel_close(p.detach(), p_ref.detach(), p_ref.detach(), torch.float32, name)
        assert not torch.equal(p_ref.detach(), ref_before[name]), f"{name} did not move"


# ----------------------------------------------------------------------------------------------------------
# What cannot be patched says why
# ----------------------------------------------------------------------------------------------------------


def test_nothing_to_patch_lists_what_was_looked_for():
    plain = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="found nothing to patch in Sequential") as err:
        patch(plain)
    for looked_for in ("ada_norm_single", "DiT block", "DiT final layer", "cross-attention", "Conv2d named proj"):
        assert looked_for in str(err.value)

    class Net(nn.Module):  # a Conv2d called proj that is no patch embedding: recognised, and said why not
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(4, 8, 3, padding=1)

    with pytest.raises(ValueError, match=r"(?s)patch embedding: a Conv2d.*proj: Conv2d\(kernel_size=\(3, 3\)"):
        patch(Net(), modulate=False, cross_attention=False)
    with pytest.raises(ValueError, match="chooses its kernels itself"):  # our PixArt runs the kernels already
        patch(pixart_fast.model.PixArt(pixart_fast.model.CONFIGS["PixArt-tiny"]))
    with pytest.raises(ValueError, match="nothing to look for"):
        patch(plain, modulate=False, cross_attention=False, patchify=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        patch(DiT(), backend="cuda")


def test_unsupported_parts_are_reported_and_left_alone():
    pytest.importorskip("diffusers", reason="diffusers not installed")
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MyProcessor(AttnProcessor2_0):
        pass

    block = ada_norm_single_block()
    block.attn2.set_processor(MyProcessor())
    report = patch(block)
    assert report.swapped[0][0] == "" and report.skipped == [("attn2", report.skipped[0][1])]
    assert "MyProcessor is not diffusers' default" in report.skipped[0][1]
    assert isinstance(block.attn2.processor, MyProcessor)

    affine = ada_norm_single_block(norm_elementwise_affine=True)
    with pytest.raises(ValueError, match="affine weights"):
        patch(affine, cross_attention=False)


def test_calls_the_patch_cannot_serve_run_diffusers_own_forward():
    """A chunked feed-forward (set after patching) makes the patched block run diffusers' forward: bit-identical
    to the unpatched block, no kernel called."""
    ref = ada_norm_single_block()
    patched = copy.deepcopy(ref)
    patch(patched, cross_attention=False)
    for block in (ref, patched):
        block.set_chunk_feed_forward(4, dim=1)
    inputs = block_inputs()
    with torch.no_grad(), KernelCalls() as counter:
        out = patched(**inputs)
    assert torch.equal(out, ref(**inputs)) and not counter.calls


def test_readme_section_example_runs_and_prints_what_it_shows(capsys):
    """The README section's ```python block, executed as written there; it prints the ```text block shown there."""
    pytest.importorskip("diffusers", reason="diffusers not installed")  # the example patches diffusers' PixArt
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    text = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    shown = re.findall(r"```text\n(.*?)```", text, flags=re.S)
    assert len(code) == 1 and len(shown) == 1, f"{SECTION}: expected one python and one text block"
    namespace = {}
    with KernelCalls() as counter:
        exec(compile(code[0], f"README.md ({SECTION})", "exec"), namespace)
    assert capsys.readouterr().out == shown[0]
    assert MODULATE_OPS | CROSS_ATTN_OPS | {"image_to_tokens"} <= set(counter.calls)
    assert not hasattr(namespace["model"], ATTR)  # the example ends unpatched
