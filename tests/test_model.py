"""The model against diffusers' PixArtTransformer2DModel (a reference we did not write), the DiT ->
PixArt re-parameterization, and the model's own contracts."""
from dataclasses import replace

import pytest
import torch

from pixart_fast.checkpoints import from_diffusers, load_state_dict_strict, to_diffusers
from pixart_fast.model import CONFIGS, DiT, PixArt, PixArtConfig, reparameterize, timestep_embedding

TINY = CONFIGS["PixArt-tiny"]


def diffusers_twin(cfg: PixArtConfig, seed=0):
    """A diffusers PixArtTransformer2DModel of cfg's shape with random weights everywhere (zero-initialised
    layers included, so every path is exercised), and our PixArt loaded with the same weights."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    torch.manual_seed(seed)
    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, num_layers=cfg.depth, cross_attention_dim=cfg.hidden_size,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, caption_channels=cfg.caption_channels,
        interpolation_scale=cfg.pe_interpolation, use_additional_conditions=cfg.micro_conditions).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    ours = PixArt(cfg, kernels="torch").eval()
    load_state_dict_strict(ours, from_diffusers(ref.state_dict()), allow_missing=("y_embedder.y_embedding",))
    return ref, ours


def random_inputs(cfg, B=3, H=None, W=None, L=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    H = H or cfg.input_size
    W = W or cfg.input_size
    L = L or cfg.max_tokens
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g).float()
    y = torch.randn(B, L, cfg.caption_channels, generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = 1  # always one length-1 caption
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return x, t, y, mask


CASES = {
    "tiny": TINY,
    "deep-4heads": replace(TINY, depth=3, num_heads=4, hidden_size=64),  # head dim 16
    "headdim-24": replace(TINY, depth=1, num_heads=3, hidden_size=72),
    "no-learn-sigma": replace(TINY, learn_sigma=False),
    "patch-4": replace(TINY, input_size=16, patch_size=4, pe_interpolation=2.0),
    "micro-conditions": CONFIGS["PixArtMS-tiny"],
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("hw", [None, (8, 16)], ids=["square", "non-square"])
def test_equals_diffusers(name, hw):
    cfg = CASES[name]
    ref, ours = diffusers_twin(cfg)
    H, W = hw or (cfg.input_size, cfg.input_size)
    x, t, y, mask = random_inputs(cfg, H=H, W=W)
    kwargs, extra = {}, ()
    if cfg.micro_conditions:
        img_hw = torch.tensor([[256.0, 384.0], [512.0, 512.0], [1024.0, 768.0]])
        ar = img_hw[:, :1] / img_hw[:, 1:]
        kwargs = {"added_cond_kwargs": {"resolution": img_hw, "aspect_ratio": ar}}
        extra = (img_hw, ar)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, **kwargs).sample
        got = ours(x, t, y, mask, *extra)
    assert got.shape == (3, cfg.out_channels, H, W)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not two zeros
    assert (got - expected).abs().max().item() <= 1e-5


def test_official_diffusers_round_trip_is_exact():
    ref, ours = diffusers_twin(CONFIGS["PixArtMS-tiny"])
    d = ref.state_dict()
    back = to_diffusers(from_diffusers(d))
    assert set(back) == set(d) and all(torch.equal(back[k], d[k]) for k in d)
    official = ours.state_dict()
    again = from_diffusers(to_diffusers(official))
    assert set(again) == set(official) - {"y_embedder.y_embedding"}
    assert all(torch.equal(again[k], official[k]) for k in again)


def test_parameter_count_of_pixart_xl_2():
    with torch.device("meta"):
        assert sum(p.numel() for p in PixArt(CONFIGS["PixArt-XL/2-256"]).parameters()) == 610_856_096


def test_reparameterize_matches_dit_modulation_at_t500():
    cfg = replace(TINY, depth=3)
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    with torch.no_grad():  # DiT zero-inits adaLN: give every block its own modulation
        for p in dit.parameters():
            p.normal_(0, 0.1)
    pix = PixArt(cfg, kernels="torch").eval()
    load_state_dict_strict(pix, reparameterize(dit.state_dict(), cfg))
    t = torch.tensor([500.0])
    with torch.no_grad():
        c_dit = dit.t_embedder(t)  # no class embedding
        t_pix = pix.t_embedder(t)
        t0 = pix.t_block(t_pix).reshape(1, 6, -1)
        for i in range(cfg.depth):
            expected = dit.blocks[i].adaLN_modulation(c_dit).reshape(1, 6, -1)
            got = pix.blocks[i].scale_shift_table[None] + t0
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        final = dit.final_layer.adaLN_modulation(c_dit).reshape(1, 2, -1)
        torch.testing.assert_close(pix.final_layer.scale_shift_table[None] + t_pix[:, None], final,
                                   rtol=1e-5, atol=1e-6)
        # Shared weights carried over by name; the new cross-attention starts silent.
        assert torch.equal(pix.blocks[1].attn.qkv.weight, dit.blocks[1].attn.qkv.weight)
        assert torch.equal(pix.x_embedder.proj.weight, dit.x_embedder.proj.weight)
        assert pix.blocks[2].cross_attn.proj.weight.abs().max() == 0
        # Without text, the converted model reproduces the DiT's prediction (null class: the modulation
        # differs only through the class embedding, so compare at a class-free condition).
        x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
        tt = torch.full((2,), 500.0)
        y = torch.randn(2, cfg.max_tokens, cfg.caption_channels)
        out_pix = pix(x, tt, y)
    dit_no_class = dit_forward_without_class(dit, x, tt)
    torch.testing.assert_close(out_pix, dit_no_class, rtol=1e-4, atol=1e-5)


def dit_forward_without_class(dit, x, t):
    """DiT's forward with c = t embedding only (what re-parameterization matches)."""
    with torch.no_grad():
        h = dit.x_embedder(x) + dit.pos_embed
        c = dit.t_embedder(t)
        for block in dit.blocks:
            h = block(h, c)
        h = dit.final_layer(h, c)
        from pixart_fast.kernels.patch_copy import unpatchify
        cfg = dit.config
        return unpatchify(h, cfg.patch_size, cfg.out_channels, x.shape[2], x.shape[3], backend="torch")


def test_reparameterize_refuses_a_dit_of_another_shape():
    dit = DiT(replace(TINY, hidden_size=64))
    with pytest.raises(ValueError, match="shape"):
        reparameterize(dit.state_dict(), TINY)


def test_forward_does_not_mutate_the_module():
    model = PixArt(TINY, kernels="torch").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = set(model.__dict__)
    x, t, y, mask = random_inputs(TINY, H=8, W=16)
    model(x, t, y, mask).sum().backward()
    model.eval()(x, t, y, mask)
    assert attrs == set(model.__dict__)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputation_gives_the_same_gradients(recompute, kernels):
    torch.manual_seed(0)
    a = PixArt(TINY, kernels=kernels)
    torch.nn.init.normal_(a.final_layer.linear.weight, std=0.1)  # non-zero output so every gradient flows
    b = PixArt(TINY, kernels=kernels, recompute=recompute)
    b.load_state_dict(a.state_dict())
    x, t, y, mask = random_inputs(TINY)
    drop = torch.tensor([True, False, False])
    for m in (a, b):
        m(x, t, y, mask, force_drop_ids=drop).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    with pytest.raises(ValueError, match="recompute must be one of"):
        PixArt(TINY, recompute="some")


def test_caption_dropout_uses_the_null_caption_with_all_tokens_valid():
    model = PixArt(TINY, kernels="torch").eval()
    x, t, y, mask = random_inputs(TINY)
    null = model.y_embedder.y_embedding.expand_as(y)
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        dropped = model(x, t, y, mask, force_drop_ids=drop)
        direct = model(x, t, torch.where(drop[:, None, None], null, y), torch.where(drop[:, None], 1, mask))
    torch.testing.assert_close(dropped, direct, rtol=0, atol=0)


def test_forward_with_cfg_is_the_guided_combination():
    torch.manual_seed(0)
    model = PixArt(TINY, kernels="torch").eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.2)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)
    x, t, y, mask = random_inputs(TINY)
    with torch.no_grad():
        cond = model(x, t, y, mask)
        uncond = model(x, t, model.y_embedder.y_embedding.expand_as(y), None)
        got = model.forward_with_cfg(x, t, y, mask, cfg_scale=4.5)
    C = TINY.in_channels
    torch.testing.assert_close(got[:, :C], uncond[:, :C] + 4.5 * (cond[:, :C] - uncond[:, :C]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, C:], cond[:, C:])


def test_timestep_embedding_is_cos_then_sin():
    e = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(e[1, 0], torch.cos(torch.tensor(3.0)))


@pytest.mark.parametrize("bad, match", [
    (lambda x, t, y, m: (x[:, :2], t, y, m), "input must be"),
    (lambda x, t, y, m: (x[..., :7], t, y, m), "divisible"),
    (lambda x, t, y, m: (x, t, y[..., :5], m), "captions must be"),
    (lambda x, t, y, m: (x, t, y, m[:, :3]), "mask shape"),
])
def test_bad_inputs_name_the_offending_shape(bad, match):
    model = PixArt(TINY, kernels="torch")
    with pytest.raises(ValueError, match=match):
        model(*bad(*random_inputs(TINY)))


def test_micro_condition_model_asks_for_its_conditions():
    cfg = CONFIGS["PixArtMS-tiny"]
    with pytest.raises(ValueError, match="img_hw"):
        PixArt(cfg, kernels="torch")(*random_inputs(cfg))


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        PixArtConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="kernels"):
        PixArt(TINY, kernels="cuda")


@pytest.mark.parametrize("name", ["PixArt-tiny", "PixArtMS-tiny"])
def test_triton_kernels_equal_torch_in_the_whole_model(name):
    """Every block through the Triton kernels (CPU interpreter) against the PyTorch path: outputs and every
    parameter gradient, by the kernel rule in fp32 (torch's own fp32 error is 0, so this is atol-tight)."""
    from tolerance import assert_kernel_close
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ref = PixArt(cfg, kernels="torch")
    with torch.no_grad():  # no zero-initialised layer, so every gradient is non-trivial
        for p in ref.parameters():
            p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    tri = PixArt(cfg, kernels="triton")
    tri.load_state_dict(ref.state_dict())
    x, t, y, mask = random_inputs(cfg, B=2, H=8, W=12)
    extra = (torch.tensor([[64.0, 96.0]] * 2), torch.tensor([[2 / 3]] * 2)) if cfg.micro_conditions else ()
    drop = torch.tensor([False, True])
    outs = []
    for m in (ref, tri):
        out = m(x, t, y, mask, *extra, force_drop_ids=drop)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
    assert_kernel_close(outs[1], outs[0], outs[0], torch.float32, "output")
    for (n, a), b in zip(ref.named_parameters(), tri.parameters()):
        assert_kernel_close(b.grad, a.grad, a.grad, torch.float32, n)


PIXEL = replace(TINY, in_channels=3, input_size=16, patch_size=4, pe_interpolation=2.0)  # pixel space, 16 tokens


def test_a_new_pixel_decoder_changes_nothing_until_it_trains():
    """Its last convolution starts at zero: the model predicts what the same weights without a decoder do, and
    the first backward pass reaches that convolution; once it is non-zero the decoder adds a correction."""
    torch.manual_seed(0)
    model = PixArt(replace(PIXEL, pixel_decoder=8), kernels="torch")
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    plain = PixArt(PIXEL, kernels="torch")
    load_state_dict_strict(plain, {k: v for k, v in model.state_dict().items() if not k.startswith("pixel_decoder.")})
    x, t, y, mask = random_inputs(PIXEL)
    out = model(x, t, y, mask)
    torch.testing.assert_close(out, plain(x, t, y, mask), rtol=0, atol=0)
    out.square().mean().backward()
    assert model.pixel_decoder.conv3.weight.grad.abs().sum() > 0
    torch.nn.init.normal_(model.pixel_decoder.conv3.weight, std=0.1)
    with torch.no_grad():
        diff = model(x, t, y, mask) - plain(x, t, y, mask)
    C = PIXEL.in_channels
    assert (diff[:, :C].abs().flatten(1).amax(dim=1) > 0).all()  # every sample's prediction corrected
    assert torch.equal(diff[:, C:], torch.zeros_like(diff[:, C:]))  # the variance channels are the final layer's


def test_a_pixel_decoder_refuses_token_masking_and_diffusers_export(tmp_path):
    from pixart_fast.cli import UserError
    from pixart_fast.export import write_diffusers
    from pixart_fast.model import keep_patches

    cfg = replace(PIXEL, pixel_decoder=8)
    model = PixArt(cfg, kernels="torch")
    x, t, y, mask = random_inputs(cfg)
    keep = torch.arange(8).expand(3, -1)
    with pytest.raises(ValueError, match="pixel_decoder 8"):
        model(keep_patches(x, keep, 4), t, y, mask, keep=keep, grid=(4, 4))
    with pytest.raises(UserError, match="no pixel decoder"):
        write_diffusers(model.state_dict(), cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
