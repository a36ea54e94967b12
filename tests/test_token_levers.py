"""Token masking and token routing (pixart_fast.model's token levers): with nothing dropped or skipped they equal the
full forward exactly; routing equals a hand-built reference in values and gradients; the draws keep
round((1 - r) T) tokens and are functions of (seed, step); the levered forward compiles to one graph; the FLOP count
follows the tokens the model runs; and the trainer trains with each."""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from pixart_fast.cli import UserError
from pixart_fast.flops import flops_per_image, forward_flops
from pixart_fast.kernels import modulate, unpatchify
from pixart_fast.model import CONFIGS, PixArt, draw_tokens, keep_patches, kept_count
from pixart_fast.train.loop import token_levers, train
from pixart_fast.train.recipes import RECIPES

KERNELS = ["torch", "triton"]  # Triton through the interpreter here (tests/conftest.py)
TINY3 = replace(CONFIGS["PixArt-tiny"], depth=3)  # a first, a middle and a last block: 16 tokens


def model_and_inputs(config=TINY3, kernels="torch", B=2, seed=0):
    """A model whose zero-initialised layers (cross-attention outputs, final layer) are random, so every weight
    reaches the output, and inputs for it: x, t, captions, mask, no caption dropped."""
    torch.manual_seed(seed)
    model = PixArt(config, kernels=kernels)
    for block in model.blocks:
        nn.init.normal_(block.cross_attn.proj.weight, std=0.2)
    nn.init.normal_(model.final_layer.linear.weight, std=0.2)
    c = config
    x = torch.randn(B, c.in_channels, c.input_size, c.input_size)
    t = torch.randint(0, 1000, (B,))
    y = torch.randn(B, c.max_tokens, c.caption_channels)
    mask = torch.rand(B, c.max_tokens) < 0.8
    mask[:, 0] = True
    return model, dict(x=x, t=t, y=y, mask=mask, force_drop_ids=torch.zeros(B, dtype=torch.bool))


def grid_of(config):
    side = config.input_size // config.patch_size
    return side, side


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_masked_forward_keeping_every_token_equals_the_full_forward(kernels):
    model, a = model_and_inputs(kernels=kernels)
    T, p, B = 16, 2, 2
    keep = torch.arange(T).expand(B, T)
    full = model(**a)
    masked = model(**{**a, "x": keep_patches(a["x"], keep, p)}, keep=keep, grid=grid_of(TINY3))
    assert masked.shape == (B, TINY3.out_channels, p, T * p)
    assert torch.equal(masked, keep_patches(full, keep, p))


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_routed_forward_routing_every_token_equals_the_full_forward(kernels):
    model, a = model_and_inputs(kernels=kernels)
    everything = torch.arange(16).expand(2, 16)
    full = model(**a)
    for blocks in [(0, 3), (1, 2), (0, 1), (2, 3)]:
        assert torch.equal(model(**a, route=everything, route_blocks=blocks), full), blocks


def reference(model, x, t, y, mask, keep=None, route=None, blocks=(0, 0)):
    """The levered forward written plainly: tokens picked and put back by advanced indexing, one block at a time
    (each routed block takes its subset out of the stream and writes it back), every modulated copy made from the
    stream by the unfused PyTorch modulate. Returns the output tokens (B, K, p*p*out)."""
    B = x.shape[0]
    rows = torch.arange(B)[:, None]
    h = model.x_embedder(x) + model.pos_embed  # (B, T, D)
    if keep is not None:
        h = h[rows, keep]
    temb = model.t_embedder(t)
    t0 = model.t_block(temb)
    yy = model.y_embedder(y)
    depth = len(model.blocks)
    for i, block in enumerate(model.blocks):
        shift, scale = block.modulation(t0)[:2]
        nxt = model.blocks[i + 1].modulation(t0)[:2] if i + 1 < depth else model.final_layer.modulation(temb)
        if blocks[0] <= i < blocks[1]:
            sub = h[rows, route]
            out, _ = block(sub, modulate(sub, shift, scale, backend="torch"), yy, t0, mask, *nxt)
            h = h.index_put((rows.expand_as(route), route), out)
        else:
            h, _ = block(h, modulate(h, shift, scale, backend="torch"), yy, t0, mask, *nxt)
    return model.final_layer(modulate(h, *model.final_layer.modulation(temb), backend="torch"))


@pytest.mark.parametrize("kernels", KERNELS)
def test_routing_matches_the_hand_built_reference_and_both_paths_get_gradients(kernels):
    model, a = model_and_inputs(kernels=kernels)
    x = a["x"].requires_grad_()
    route = draw_tokens(2, 16, 0.5, torch.Generator().manual_seed(3))  # 8 of 16 tokens run block 1
    out = model(**a, route=route, route_blocks=(1, 2))
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    got_x = x.grad.clone()
    model.zero_grad()
    x.grad = None
    tokens = reference(model, x, a["t"], a["y"], a["mask"], route=route, blocks=(1, 2))
    ref = unpatchify(tokens, 2, TINY3.out_channels, 8, 8, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(got_x, x.grad, rtol=1e-4, atol=1e-5)
    # the routed block learns (its tokens' path), and every input patch, routed or skipping, gets a gradient
    assert all(got[n].abs().sum() > 0 for n in got if n.startswith("blocks.1."))
    per_patch = got_x.abs().reshape(2, 4, 4, 2, 4, 2).sum(dim=(1, 3, 5)).flatten(1)  # (B, 16 tokens)
    assert (per_patch > 0).all()


def test_skipping_tokens_rejoin_unchanged():
    model, a = model_and_inputs()
    route = draw_tokens(2, 16, 0.5, torch.Generator().manual_seed(4))
    skipping = torch.ones(2, 16, dtype=torch.bool).scatter(1, route, False)
    with torch.no_grad():
        routed = model(**a, route=route, route_blocks=(2, 3))  # the last block: routed tokens only
        model.blocks[2].mlp.fc2.weight.add_(1.0)  # the routed block's weights change...
        after = model(**a, route=route, route_blocks=(2, 3))
    tokens = lambda img: img.reshape(2, -1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, -1)  # noqa: E731
    assert torch.equal(tokens(after)[skipping], tokens(routed)[skipping])  # ...the skipping tokens' outputs do not
    assert not torch.allclose(tokens(after)[~skipping], tokens(routed)[~skipping])


@pytest.mark.parametrize("kernels", KERNELS)
def test_masking_and_routing_together_match_the_reference(kernels):
    model, a = model_and_inputs(kernels=kernels)
    g = torch.Generator().manual_seed(5)
    keep = draw_tokens(2, 16, 0.5, g)  # 8 tokens enter
    route = draw_tokens(2, 8, 0.25, g)  # 6 of them run blocks 0 and 1
    out = model(**{**a, "x": keep_patches(a["x"], keep, 2)}, keep=keep, grid=(4, 4), route=route,
                route_blocks=(0, 2))
    tokens = reference(model, a["x"], a["t"], a["y"], a["mask"], keep=keep, route=route, blocks=(0, 2))
    torch.testing.assert_close(out, unpatchify(tokens, 2, TINY3.out_channels, 2, 16, backend="torch"),
                               rtol=1e-5, atol=1e-5)


def test_keep_patches_lays_the_kept_patches_side_by_side():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)  # a 2 x 3 grid of 2 x 2 patches
    keep = torch.tensor([[1, 5], [0, 3]])
    out = keep_patches(x, keep, 2)
    assert out.shape == (2, 3, 2, 4)
    assert torch.equal(out[0, :, :, :2], x[0, :, 0:2, 2:4]) and torch.equal(out[0, :, :, 2:], x[0, :, 2:4, 4:6])
    assert torch.equal(out[1, :, :, :2], x[1, :, 0:2, 0:2]) and torch.equal(out[1, :, :, 2:], x[1, :, 2:4, 0:2])


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7, 0.95])
def test_masking_keeps_round_1_minus_r_of_the_tokens_reproducibly(ratio):
    T = 64
    keep = draw_tokens(5, T, ratio, torch.Generator().manual_seed(1))
    assert keep.shape == (5, round((1 - ratio) * T)) == (5, kept_count(T, ratio))
    assert keep.dtype == torch.int64 and bool((keep >= 0).all() and (keep < T).all())
    assert bool((keep.diff(dim=1) > 0).all())  # ascending, no repeats
    assert torch.equal(keep, draw_tokens(5, T, ratio, torch.Generator().manual_seed(1)))
    if 0 < ratio:
        assert not torch.equal(keep, draw_tokens(5, T, ratio, torch.Generator().manual_seed(2)))


def test_the_trainers_draws_are_functions_of_seed_and_step():
    cfg = replace(RECIPES[2], model="PixArt-pixel-tiny", steps=10, batch_size=4, mask_ratio=0.5, unmasked_steps=3,
                  route_ratio=0.5, route_start=1, route_end=0)
    shape, everyone = (4, 3, 16, 16), slice(0, 4)
    one = token_levers(cfg, 2, shape, 2, 4, "cpu", everyone)
    assert one["keep"].shape == (4, 32) and one["grid"] == (8, 8) and one["route"].shape == (4, 16)
    assert one["route_blocks"] == (1, 3)  # --route-end 0: the last block sees every token
    again = token_levers(cfg, 2, shape, 2, 4, "cpu", everyone)
    assert all(torch.equal(one[k], again[k]) for k in ("keep", "route"))
    assert not torch.equal(one["keep"], token_levers(cfg, 3, shape, 2, 4, "cpu", everyone)["keep"])
    assert not torch.equal(one["keep"], token_levers(replace(cfg, seed=1), 2, shape, 2, 4, "cpu", everyone)["keep"])
    # a rank's slice is its part of the global batch's draw
    assert torch.equal(token_levers(cfg, 2, shape, 2, 4, "cpu", slice(2, 4))["keep"], one["keep"][2:])
    # the unmasked finishing phase: the last 3 of 10 steps keep every token (routing goes on)
    assert "keep" in token_levers(cfg, 6, shape, 2, 4, "cpu", everyone)
    assert "keep" not in token_levers(cfg, 7, shape, 2, 4, "cpu", everyone)
    assert token_levers(replace(cfg, mask_ratio=0.0, route_ratio=0.0), 2, shape, 2, 4, "cpu", everyone) == {}


@pytest.mark.parametrize("kernels", KERNELS)
def test_the_levered_training_forward_compiles_to_one_graph(kernels):
    torch._dynamo.reset()
    model, a = model_and_inputs(kernels=kernels)
    g = torch.Generator().manual_seed(0)
    keep, route = draw_tokens(2, 16, 0.5, g), draw_tokens(2, 8, 0.5, g)
    args = {**a, "x": keep_patches(a["x"], keep, 2)}
    explained = torch._dynamo.explain(model)(**args, keep=keep, grid=(4, 4), route=route, route_blocks=(1, 2))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_torch_compile_runs_the_levered_training_step():
    torch._dynamo.reset()
    model, a = model_and_inputs()
    g = torch.Generator().manual_seed(0)
    keep, route = draw_tokens(2, 16, 0.5, g), draw_tokens(2, 8, 0.5, g)
    args = dict(**{**a, "x": keep_patches(a["x"], keep, 2)}, keep=keep, grid=(4, 4), route=route, route_blocks=(1, 2))
    eager = model(**args)
    eager.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(**args)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)


def counted_flops(model, *args, **kwargs):
    with FlopCounterMode(display=False) as fwd:
        out = model(*args, **kwargs)
    with FlopCounterMode(display=False) as bwd:
        out.float().square().mean().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("name, mask_ratio, route_ratio, blocks", [
    ("PixArt-tiny", 0.5, 0.0, None),
    ("PixArt-tiny", 0.0, 0.5, (1, 2)),
    ("PixArt-tiny", 0.25, 0.5, (0, 1)),
    ("PixArt-XL/2-256", 0.5, 0.5, (2, 26)),
    ("PixArt-pixel-32-pd", 0.0, 0.5, (1, 3)),  # with the pixel decoder's convolutions
])
def test_the_flop_count_follows_masking_and_routing(name, mask_ratio, route_ratio, blocks):
    cfg, B = CONFIGS[name], 2
    side = cfg.input_size // cfg.patch_size
    T = kept_count(side * side, mask_ratio)
    R = kept_count(T, route_ratio)
    with torch.device("meta"):
        model = PixArt(cfg, kernels="torch")
        kw = {}
        x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size)
        if mask_ratio:
            keep = torch.empty(B, T, dtype=torch.long)
            x, kw = torch.randn(B, cfg.in_channels, cfg.patch_size, T * cfg.patch_size), dict(keep=keep, grid=(side, side))
        if route_ratio:
            kw.update(route=torch.empty(B, R, dtype=torch.long), route_blocks=blocks)
        y = torch.randn(B, cfg.max_tokens, cfg.caption_channels)
        fwd, bwd = counted_flops(model, x, torch.randint(0, 1000, (B,)), y,
                                 torch.ones(B, cfg.max_tokens, dtype=torch.bool), **kw)
    parts = forward_flops(cfg, vae_downsample=8, mask_ratio=mask_ratio, route_ratio=route_ratio, route_blocks=blocks)
    assert fwd == B * sum(parts.values())  # every forward product, exactly
    train_flops = flops_per_image(cfg, mask_ratio=mask_ratio, route_ratio=route_ratio, route_blocks=blocks)
    # the backward: 2 x forward, less the input gradients autograd skips (patch embedding of the T tokens that
    # run, the timestep and caption MLPs' first layers)
    D, p = cfg.hidden_size, cfg.patch_size
    skipped = 2 * T * cfg.in_channels * p * p * D + 2 * 256 * D + 2 * cfg.max_tokens * cfg.caption_channels * D
    assert fwd + bwd == B * (train_flops - skipped)
    full = sum(forward_flops(cfg).values())
    assert sum(parts.values()) < full


def test_the_flop_count_without_levers_is_unchanged():
    cfg = CONFIGS["PixArt-XL/2-256"]
    assert forward_flops(cfg, route_blocks=(2, 26)) == forward_flops(cfg)  # route_ratio 0: no routing
    assert forward_flops(cfg, mask_ratio=0.0) == forward_flops(cfg)


FAST = dict(model="PixArt-pixel-tiny", batch_size=2, num_val=2, sample_steps=2, sample_every=0, kernels="torch",
            t5_train_steps=0, steps=4, route_end=2)


@pytest.mark.parametrize("levers", [dict(mask_ratio=0.5, unmasked_steps=2),
                                    dict(route_ratio=0.5, route_start=0, route_end=1)],
                         ids=["mask", "route"])
def test_the_trainer_trains_with_each_lever(levers, tmp_path):
    summary = train(replace(RECIPES[2], **{**FAST, **levers}, out=str(tmp_path)), progress=False)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0 and summary["final_loss"] > 0


def test_the_stage2_recipe_routes_nine_tenths_of_the_tokens_past_all_but_the_first_block(tmp_path, capsys):
    assert RECIPES[2].route_ratio == 0.9 and RECIPES[1].route_ratio == RECIPES[3].route_ratio == 0.0
    assert RECIPES[2].routing(0, CONFIGS[RECIPES[2].model].depth) == (0.9, (1, 4))  # the embedded default: blocks 1-3
    assert RECIPES[2].routing(0, 28) == (0.9, (1, 4))  # sized for the 4-block network: on PixArt-XL/2 too
    with pytest.raises(UserError, match=r"--route-start 1 --route-end 4: .* <= 2 \(the model's depth"):
        RECIPES[2].routing(0, 2)  # a two-block model has no block 3: the user picks the blocks
    old = replace(RECIPES[2], route_start=0, route_end=0)  # the route-0.9-pd arm's: every block but the last
    assert old.routing(0, 4) == (0.9, (0, 3)) and old.routing(0, 28) == (0.9, (0, 27))
    assert replace(RECIPES[2], route_ratio=0.5, route_end=0).routing(0, 4) == (0.5, (1, 3))  # the route-0.5 arm's
    assert replace(RECIPES[2], route_ratio=0.0).routing(0, 2) is None
    # from block 1 to the default end, a two-block model has no middle block: nothing is routed, and the run says so
    cfg = replace(RECIPES[2], route_end=0)
    assert cfg.routing(0, 2) is None
    summary = train(replace(cfg, **{**FAST, "steps": 1, "route_end": 0}, log_every=1, out=str(tmp_path)),
                    progress=False)
    assert "PixArt-pixel-tiny has 2 blocks" in capsys.readouterr().out and summary["skipped_steps"] == 0
    assert token_levers(cfg, 0, (2, 3, 16, 16), 2, 2, "cpu", slice(None)) == {}


def test_a_routing_schedule_routes_more_in_its_early_steps():
    cfg = replace(RECIPES[2], early_route_steps=3, early_route_ratio=0.75, early_route_start=0, route_ratio=0.25,
                  route_start=1, route_end=0)
    assert [cfg.routing(step, 4) for step in (0, 2, 3, 9)] == [(0.75, (0, 3))] * 2 + [(0.25, (1, 3))] * 2
    assert replace(cfg, route_ratio=0.0).routing(3, 4) is None  # heavy routing first, then none
    assert replace(cfg, early_route_ratio=0.0).routing(0, 4) is None
    # the draws follow the phase: 3/4 of 16 tokens routed, then 1/4
    shape, everyone = (4, 3, 16, 16), slice(0, 4)
    early, late = (token_levers(cfg, step, shape, 4, 4, "cpu", everyone) for step in (2, 3))
    assert early["route"].shape == (4, 4) and early["route_blocks"] == (0, 3)
    assert late["route"].shape == (4, 12) and late["route_blocks"] == (1, 3)
    # the ablation's FLOPs cost each phase at its own steps'
    from pixart_fast.train.ablate import image_flops, step_flops

    cfg = replace(cfg, model="PixArt-pixel-32", batch_size=2)
    assert image_flops(cfg, 0) < image_flops(cfg, 3) < image_flops(replace(cfg, route_ratio=0.0), 3)
    assert step_flops(cfg, 2) == 2 * 2 * image_flops(cfg, 0)
    assert step_flops(cfg, 10) == 2 * (3 * image_flops(cfg, 0) + 7 * image_flops(cfg, 3))
    # the ablation's arm: route-0.9's routing for the first third of its steps, then route-0.5's
    from pixart_fast.train.ablate import ARMS, stage2_config

    arm = stage2_config(next(a for a in ARMS if a.name == "route-early"), 0, 900, 300, 8, {})
    assert arm.early_route_steps == 300 and arm.routing(299, 4) == (0.9, (0, 3))
    assert arm.routing(300, 4) == (0.5, (1, 3))  # then route-0.5's


@pytest.mark.parametrize("cfg, expected", [
    (dict(stage=1, mask_ratio=0.5), "stages 2 and 3"),
    (dict(route_ratio=0.5, route_start=1, route_end=1), "--route-start 1 --route-end 1"),
    (dict(route_ratio=0.5, route_end=5), "<= 2"),
    (dict(early_route_steps=2, early_route_start=2, route_end=2), "--early-route-start 2 --route-end 2"),
    (dict(stage=1, early_route_steps=2), "stages 2 and 3"),
])
def test_bad_lever_settings_fail_before_training(cfg, expected, tmp_path):
    with pytest.raises(UserError, match=expected):
        train(replace(RECIPES[cfg.get("stage", 2)], **{**FAST, **cfg}, out=str(tmp_path)), progress=False)


def test_a_levered_steady_state_step_reads_nothing_back_to_the_host(tmp_path, monkeypatch):
    from test_gpu_path import CountSyncs

    from pixart_fast import distributed
    from pixart_fast.train.loop import batch_indices, setup, train_step

    cfg = replace(RECIPES[2], model="PixArt-pixel-tiny", batch_size=4, kernels="torch", out=str(tmp_path),
                  mask_ratio=0.5, route_ratio=0.5, route_start=0, route_end=0, t5_train_steps=0)
    run = setup(cfg, distributed.Dist(), log=lambda *a: None)
    train_step(run, 0, False)
    ready = {}
    for step in range(1, 3):
        indices = batch_indices(run.data, step, cfg.batch_size, cfg.seed)
        ready[tuple(indices)] = run.data.batch(indices)
    monkeypatch.setattr(run.data, "batch", lambda indices, pin_memory=False: ready[tuple(indices)])
    counter = CountSyncs(monkeypatch)
    records = [train_step(run, step, False) for step in range(1, 3)]
    monkeypatch.undo()
    assert counter.calls == []
    assert all(bool(torch.isfinite(r[:4]).all()) for r in records)
