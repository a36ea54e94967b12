"""PixArt-Sigma (arXiv 2403.04692): the released XL/2 models' configs (512, 1024, 2K px; 300 T5 tokens; no
micro-conditions; position interpolation 1 / 2 / 4) against the official configs and diffusers' conversion script,
the model against diffusers' PixArtTransformer2DModel built with Sigma's settings (tiny networks, 300-token captions,
Sigma's interpolation scales) to 1e-5 in fp32, and Sigma checkpoints (official .pth names, diffusers folders)
through the same loaders as PixArt-alpha's. Export and extraction: tests/test_export.py and tests/test_extract.py."""
from dataclasses import replace

import pytest
import torch

from pixart_fast.checkpoints import CheckpointMismatch, load_any, load_pixart, to_diffusers
from pixart_fast.export import diffusers_config
from pixart_fast.model import CONFIGS, PixArt, pos_embed_2d
from test_model import diffusers_twin

SIGMA = {512: "PixArt-Sigma-XL/2-512", 1024: "PixArt-Sigma-XL/2-1024", 2048: "PixArt-Sigma-XL/2-2K"}
TINY = CONFIGS["PixArt-Sigma-tiny"]  # 300 tokens, interpolation 2 (Sigma's 1024-px scale)
# Tiny networks with Sigma's three scales: the latent side grows with the interpolation scale as 512 -> 1024 -> 2K
# (64 -> 128 -> 256 latent pixels), so every scale spans the same position range.
CASES = {
    "scale-1": replace(TINY, input_size=8, pe_interpolation=1.0),
    "scale-2": TINY,
    "scale-4": replace(TINY, input_size=32, pe_interpolation=4.0),
    "scale-4-deep": replace(TINY, input_size=32, pe_interpolation=4.0, depth=3, num_heads=4, hidden_size=64),
}


def conversion_script_config(px: int) -> dict:
    """The PixArtTransformer2DModel arguments diffusers' scripts/convert_pixart_sigma_to_diffusers.py passes for the
    released Sigma checkpoints (--image_size px, no --micro_condition, no --qk_norm)."""
    interpolation_scale = {256: 0.5, 512: 1, 1024: 2, 2048: 4}  # the script's table
    return dict(sample_size=px // 8, num_layers=28, attention_head_dim=72, in_channels=4, out_channels=8, patch_size=2,
                attention_bias=True, num_attention_heads=16, cross_attention_dim=1152, activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                caption_channels=4096, interpolation_scale=interpolation_scale[px], use_additional_conditions=False)


@pytest.mark.parametrize("px", list(SIGMA))
def test_sigma_configs_are_the_released_models(px):
    cfg = CONFIGS[SIGMA[px]]
    # official configs/pixart_sigma_config/PixArt_sigma_xl2_img{512,1024,2K}_*.py: PixArtMS_XL_2, model_max_length
    # 300, pe_interpolation 1 / 2 / 4, micro_condition False (the base config's), 4-channel (SDXL) VAE latents at px / 8
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.in_channels, cfg.out_channels) == (
        28, 1152, 16, 2, 4, 8)
    assert (cfg.input_size, cfg.max_tokens, cfg.pe_interpolation, cfg.micro_conditions, cfg.caption_channels) == (
        px // 8, 300, {512: 1.0, 1024: 2.0, 2048: 4.0}[px], False, 4096)
    # what we export is what diffusers' conversion script builds
    script = conversion_script_config(px)
    ours = diffusers_config(cfg)
    assert {k: ours[k] for k in script} == script
    # and diffusers' own default for the interpolation scale agrees: max(sample_size // 64, 1)
    assert max(script["sample_size"] // 64, 1) == cfg.pe_interpolation


@pytest.mark.parametrize("px", list(SIGMA))
def test_sigma_xl_has_diffusers_names_and_shapes(px):
    """The full-size networks, built on the meta device (no memory): 610,856,096 parameters as PixArt-XL/2 (no size
    embedders), a (300, 4096) null caption, and exactly the parameters of the diffusers model the conversion script
    builds, name for name and shape for shape."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    cfg = CONFIGS[SIGMA[px]]
    with torch.device("meta"):
        ours = PixArt(cfg, kernels="torch")
        ref = diffusers.PixArtTransformer2DModel(**conversion_script_config(px))
    assert sum(p.numel() for p in ours.parameters()) == 610_856_096
    assert ours.y_embedder.y_embedding.shape == (300, 4096)
    converted, expected = to_diffusers(ours.state_dict()), ref.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)


@pytest.mark.parametrize("grid", [(128, 128), (64, 256), (96, 160)], ids=["2K-square", "2K-1:4", "2K-3:5"])
def test_position_embedding_of_the_2k_model_equals_diffusers(grid):
    """At full size: PixArt-Sigma-XL/2-2K's positions (base grid 128, interpolation 4) on the square grid and on
    aspect-ratio buckets, against diffusers' function (float32 there, float64 then rounded here)."""
    pytest.importorskip("diffusers", reason="diffusers not installed")
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    cfg = CONFIGS[SIGMA[2048]]
    base = cfg.input_size // cfg.patch_size
    ours = pos_embed_2d(cfg.hidden_size, *grid, base, cfg.pe_interpolation)
    ref = get_2d_sincos_pos_embed(cfg.hidden_size, grid, base_size=base, interpolation_scale=cfg.pe_interpolation)
    assert ours.shape == ref.shape == (grid[0] * grid[1], cfg.hidden_size)
    assert (ours - ref).abs().max().item() <= 1e-5


def sigma_inputs(cfg, H, W, B=3, seed=1):
    """x, t, 300-token captions y and a mask with caption lengths 1, 300 (every token valid) and one in between."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.max_tokens
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    t = torch.tensor([999.0, 0.0, 417.0])[:B]
    y = torch.randn(B, L, cfg.caption_channels, generator=g)
    lengths = torch.tensor([1, L, 173])[:B]
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return x, t, y, mask


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", ["square", "wide", "tall"])
def test_sigma_equals_diffusers(name, shape):
    cfg = CASES[name]
    assert cfg.max_tokens == 300 and not cfg.micro_conditions
    ref, ours = diffusers_twin(cfg)
    assert ref.pos_embed.interpolation_scale == cfg.pe_interpolation and not ref.use_additional_conditions
    S = cfg.input_size
    H, W = {"square": (S, S), "wide": (S // 2, S), "tall": (S, S // 4)}[shape]
    x, t, y, mask = sigma_inputs(cfg, H, W)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
        got = ours(x, t, y, mask)
    assert got.shape == expected.shape == (3, cfg.out_channels, H, W)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not two zeros
    assert (got - expected).abs().max().item() <= 1e-5


def test_sigma_null_caption_has_300_tokens_and_equals_diffusers_given_it():
    """Caption dropout and guidance swap in the (300, E) null caption with every token valid; diffusers, which keeps
    no null caption, computes the same when handed it."""
    ref, ours = diffusers_twin(TINY)
    null = ours.y_embedder.y_embedding
    assert null.shape == (300, TINY.caption_channels)
    x, t, y, mask = sigma_inputs(TINY, 16, 16)
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        got = ours(x, t, y, mask, force_drop_ids=drop)
        y_ref = torch.where(drop[:, None, None], null.expand_as(y), y)
        mask_ref = torch.where(drop[:, None], 1, mask)
        expected = ref(x, encoder_hidden_states=y_ref, timestep=t, encoder_attention_mask=mask_ref).sample
    assert (got - expected).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"captions must be \(B, 300, 24\)"):
        ours(x, t, y[:, :120], mask[:, :120], force_drop_ids=drop)  # a 120-token caption has no null caption here


def outputs_agree(model, ref, cfg):
    x, t, y, mask = sigma_inputs(cfg, cfg.input_size, cfg.input_size // 2, seed=7)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
        got = model.eval()(x, t, y, mask)
    return (got - expected).abs().max().item() <= 1e-5


def test_diffusers_sigma_folder_loads(tmp_path):
    """A diffusers Sigma transformer folder (save_pretrained, as the conversion script writes it; also inside a
    pipeline folder) loads through load_any / load_pixart and computes what diffusers computes."""
    ref, _ = diffusers_twin(TINY)
    ref.save_pretrained(tmp_path / "pipeline" / "transformer")
    for folder in (tmp_path / "pipeline" / "transformer", tmp_path / "pipeline"):
        kind, sd = load_any(folder)
        assert kind == "diffusers" and "y_embedder.y_embedding" not in sd
        model = load_pixart(folder, "PixArt-Sigma-tiny", kernels="torch")
        assert model.y_embedder.y_embedding.shape == (300, TINY.caption_channels)  # the model's own, kept
        assert outputs_agree(model, ref, TINY)


def test_official_sigma_pth_loads(tmp_path):
    """An official Sigma .pth ({"state_dict": ...} in the official names, with the persistent pos_embed buffer and the
    (300, E) y_embedding) loads through load_any / load_pixart, null caption included; a PixArt-alpha-length one
    (120-token null caption) is refused by name and shape."""
    ref, ours = diffusers_twin(TINY)
    with torch.no_grad():
        ours.y_embedder.y_embedding.normal_()
    T = (TINY.input_size // TINY.patch_size) ** 2
    sd = dict(ours.state_dict(), pos_embed=torch.zeros(1, T, TINY.hidden_size))
    torch.save({"state_dict": sd}, tmp_path / "PixArt-Sigma-tiny.pth")
    kind, loaded = load_any(tmp_path / "PixArt-Sigma-tiny.pth")
    assert kind == "official" and "pos_embed" not in loaded
    model = load_pixart(tmp_path / "PixArt-Sigma-tiny.pth", "PixArt-Sigma-tiny", kernels="torch")
    assert torch.equal(model.y_embedder.y_embedding, ours.y_embedder.y_embedding)
    assert outputs_agree(model, ref, TINY)

    alpha = dict(sd, **{"y_embedder.y_embedding": torch.zeros(120, TINY.caption_channels)})
    torch.save({"state_dict": alpha}, tmp_path / "alpha-length.pth")
    with pytest.raises(CheckpointMismatch, match=r"y_embedding: checkpoint \(120, 24\) vs model \(300, 24\)"):
        load_pixart(tmp_path / "alpha-length.pth", "PixArt-Sigma-tiny", kernels="torch")


def test_text_encoder_pads_to_sigmas_300_tokens(tmp_path):
    """TextEncoder(max_length=300) pads and masks to 300 tokens, keeps the tokens a 120-token encoder gives, and
    its feature cache (keyed by the encoder's name) is not mistaken for a 120-token encoder's."""
    from pixart_fast.text import TextEncoder
    short, long = TextEncoder.embedded(), TextEncoder.embedded(max_length=300)
    caption = "a small blue square at center and a large green diamond at right, " * 2  # 133 tokens with EOS
    with pytest.warns(UserWarning, match="exceed 120 tokens"):
        f120, m120 = short.encode([caption, "a red circle"])
    f300, m300 = long.encode([caption, "a red circle"])
    assert f300.shape == (2, 300, 64) and m300.sum(1).tolist() == [133, 13] and m120.sum(1).tolist() == [120, 13]
    torch.testing.assert_close(f300[1, :13], f120[1, :13], rtol=1e-5, atol=1e-5)
    assert long.name != short.name and short.truncated == 1 and long.truncated == 0
    long.encode_cached(["a red circle"])
    long.save_cache(tmp_path / "cache.safetensors")
    with pytest.raises(ValueError, match="was written by encoder"):
        short.load_cache(tmp_path / "cache.safetensors")


def test_sigma_captions_longer_than_the_triton_kernel_holds_run_on_auto():
    """300 caption tokens exceed the cross-attention kernel's one key block (128): kernels="auto" runs PyTorch's
    attention for them (so a Sigma model trains on a GPU as it is) and equals the torch path; "triton" refuses."""
    cfg = CONFIGS["PixArt-Sigma-tiny"]
    torch.manual_seed(0)
    auto = PixArt(cfg, kernels="auto").eval()  # the interpreter stands in for a GPU here (tests/conftest.py)
    reference = PixArt(cfg, kernels="torch").eval()
    reference.load_state_dict(auto.state_dict())
    x, t, y, mask = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 900.0]), torch.randn(2, 300, 24), torch.ones(2, 300)
    with torch.no_grad():
        torch.testing.assert_close(auto(x, t, y, mask), reference(x, t, y, mask), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="300 keys, the Triton kernel holds 1 to 128"):
            PixArt(cfg, kernels="triton")(x, t, y, mask)
