"""Representation alignment (pixart_fast.align): the projector and loss, the hidden states the model returns (masked,
routed, compiled), the gradients the loss sends, the targets (the EMA's deeper blocks; a tiny DINOv2 from a local
folder; the scenes' per-pixel truth) at the kept tokens, a second aligned depth (inside a routed run: the routed
tokens only), the trainer with it (weight 0 changes nothing, resume is exact, alignment ends after --repa-steps,
checkpoints' weights files stay the model's), the FLOP count against FlopCounterMode, and the flags' errors."""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pixart_fast import align
from pixart_fast.align import (PROJECTOR, SECOND_PROJECTOR, Alignment, FrozenEncoder, alignment_loss, projector,
                               truth_targets, truth_width)
from pixart_fast.checkpoints import load_pixart, load_safetensors
from pixart_fast.cli import UserError
from pixart_fast.data import TRUTH_CLASSES, ShapeScenes, pixel_truth
from pixart_fast.flops import alignment_flops, flops_per_image
from pixart_fast.model import draw_tokens, keep_patches, kept_count, take_tokens
from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES

from test_token_levers import TINY3, model_and_inputs
from test_train import assert_resume_is_bit_identical

FAST = dict(model="PixArt-pixel-tiny", batch_size=2, num_val=2, sample_steps=2, sample_every=0, kernels="torch",
            t5_train_steps=0, steps=3, log_every=1, save_every=2, route_end=2)
SELF = dict(repa_depth=1, repa_target_depth=2)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    """A tiny random DINOv2 saved as a transformers folder: patch 2, 24 wide, 2 layers."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dinov2")
    config = Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, patch_size=2, image_size=16)
    Dinov2Model(config).save_pretrained(path)
    return str(path)


def test_projector_and_loss_shapes():
    head = projector(48, 192, 24)
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.SiLU, torch.nn.Linear, torch.nn.SiLU, torch.nn.Linear]
    z = head(torch.randn(2, 16, 48))
    assert z.shape == (2, 16, 24)
    loss = alignment_loss(z, torch.randn(2, 16, 24))
    assert loss.shape == (2,) and loss.dtype == torch.float32 and bool((loss.abs() <= 1).all())


def test_the_loss_is_the_mean_negative_cosine_over_tokens():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 7, generator=g, dtype=torch.float64), torch.randn(2, 5, 7, generator=g)
    hand = [-sum(float(pred[b, i] @ target[b, i].double()) / float(pred[b, i].norm() * target[b, i].double().norm())
                 for i in range(5)) / 5 for b in range(2)]
    torch.testing.assert_close(alignment_loss(pred, target), torch.tensor(hand, dtype=torch.float32))
    assert torch.allclose(alignment_loss(target, 3 * target), torch.tensor(-1.0))  # aligned: -1, whatever the scale


def test_hidden_states_are_the_stream_after_n_blocks_masked_or_not():
    model, a = model_and_inputs()
    out, hidden = model(**a, hidden_depth=2)
    assert torch.equal(out, model(**a))
    assert torch.equal(model(**a, hidden_depth=2, hidden_only=True), hidden) and hidden.shape == (2, 16, 48)
    keep = torch.arange(16).expand(2, 16)  # masking that keeps every token: the same states
    masked = model(**{**a, "x": keep_patches(a["x"], keep, 2)}, keep=keep, grid=(4, 4), hidden_depth=2)[1]
    assert torch.equal(masked, hidden)
    with pytest.raises(ValueError, match="hidden_depth"):
        model(**a, hidden_depth=4)
    with pytest.raises(ValueError, match="hidden_depth"):
        model(**a, hidden_depth=(1, 2), hidden_only=True)
    with pytest.raises(ValueError, match="hidden_depth"):
        model(**a, hidden_only=True)


def test_a_tuple_of_depths_returns_each_depths_states_in_its_order():
    model, a = model_and_inputs()
    route = torch.tensor([[0, 3, 5, 9, 10, 12, 14, 15]] * 2)
    levers = dict(route=route, route_blocks=(0, 2))
    out, (last, first) = model(**a, **levers, hidden_depth=(3, 1))
    assert torch.equal(out, model(**a, **levers))
    assert torch.equal(last, model(**a, **levers, hidden_depth=3)[1])
    assert torch.equal(first, model(**a, **levers, hidden_depth=1)[1])
    with pytest.raises(ValueError, match="hidden_depth"):
        model(**a, hidden_depth=(1, 4))


def test_routed_hidden_states_are_taken_after_re_insertion():
    """Inside the routed run the skipping tokens are as they entered it; after it, the stream is whole again."""
    model, a = model_and_inputs()
    route = torch.tensor([[0, 3, 5, 9, 10, 12, 14, 15]] * 2)
    skip = torch.tensor([[i for i in range(16) if i not in route[0]]] * 2)
    entered = model(**a, hidden_depth=1)[1]  # the routed run is blocks 1 and 2
    inside = model(**a, route=route, route_blocks=(1, 3), hidden_depth=2)[1]
    assert inside.shape == (2, 16, 48)
    assert torch.equal(take_tokens(inside, skip), take_tokens(entered, skip))
    assert not torch.equal(take_tokens(inside, route), take_tokens(entered, route))
    everyone = torch.arange(16).expand(2, 16)
    routing_everyone = model(**a, route=everyone, route_blocks=(1, 3), hidden_depth=2)[1]
    assert torch.equal(routing_everyone, model(**a, hidden_depth=2)[1])


def test_after_the_last_block_every_token_has_run_it():
    """Routed past every block but the last (the stage-2 recipe's routing), the states after the last block are
    every token's: the skipping ones have left their patch embeddings, and routing every token changes nothing."""
    model, a = model_and_inputs()
    depth = len(model.blocks)
    route = torch.tensor([[0, 3, 5, 9, 10, 12, 14, 15]] * 2)
    skip = torch.tensor([[i for i in range(16) if i not in route[0]]] * 2)
    entered = model(**a, route=route, route_blocks=(0, depth - 1), hidden_depth=1)[1]  # skipping: as embedded
    last = model(**a, route=route, route_blocks=(0, depth - 1), hidden_depth=depth)[1]
    assert last.shape == (2, 16, 48)
    assert not torch.isclose(take_tokens(last, skip), take_tokens(entered, skip)).all(-1).any()
    everyone = torch.arange(16).expand(2, 16)
    routing_everyone = model(**a, route=everyone, route_blocks=(0, depth - 1), hidden_depth=depth)[1]
    assert torch.equal(routing_everyone, model(**a, hidden_depth=depth)[1])


def test_the_truth_last_arm_aligns_the_block_every_token_runs():
    from pixart_fast.model import CONFIGS
    from pixart_fast.train.ablate import ARMS, stage2_config

    cfg = stage2_config(next(a for a in ARMS if a.name == "repa-truth-last"), 0, 800, 200, 8, {})
    depth = CONFIGS[cfg.model].depth
    ratio, (start, end) = cfg.routing(0, depth)
    assert (ratio, start, end) == (0.9, 0, depth - 1)  # route-0.9-pd's routing: the last block runs every token
    assert cfg.repa_depth == depth and cfg.repa_truth


def test_the_hidden_state_forward_compiles_to_one_graph_with_the_same_gradients():
    torch._dynamo.reset()
    model, a = model_and_inputs()
    g = torch.Generator().manual_seed(0)
    keep, route = draw_tokens(2, 16, 0.5, g), draw_tokens(2, 8, 0.5, g)
    args = dict(**{**a, "x": keep_patches(a["x"], keep, 2)}, keep=keep, grid=(4, 4), route=route, route_blocks=(1, 3))
    for extra in (dict(hidden_depth=2), dict(hidden_depth=3, hidden_only=True)):
        explained = torch._dynamo.explain(model)(**args, **extra)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    out, hidden = model(**args, hidden_depth=2)
    (out.square().mean() + hidden.square().mean()).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled_out, compiled_hidden = torch.compile(model, backend="aot_eager", fullgraph=True)(**args, hidden_depth=2)
    (compiled_out.square().mean() + compiled_hidden.square().mean()).backward()
    torch.testing.assert_close(compiled_hidden, hidden)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)


def aligned_step(encoder=None, levers=None, depth=1, target_depth=3, device="cpu", teacher=None, scenes=None,
                 second_depth=0):
    """A tiny model, its EMA copy, a projector (with second_depth, the second depth's projector too, as the
    model's SECOND_PROJECTOR) and one step's model_fn run; returns them, the inputs and (out, losses). scenes: the
    truth is the target. device "meta": shapes only (FlopCounterMode counts CPU attention only there)."""
    model, a = model_and_inputs()
    torch.manual_seed(1)
    width = encoder.config.hidden_size if encoder else truth_width(TINY3.patch_size) if scenes else 48
    head = projector(48, 96, width)
    if second_depth:
        model.add_module(SECOND_PROJECTOR, projector(48, 96, width))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    model, head, images = model.to(device), head.to(device), images.to(device)
    a = {k: v.to(device) for k, v in a.items()}
    levers = {k: v.to(device) if torch.is_tensor(v) else v for k, v in (levers or {}).items()}
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    alignment = Alignment(depth, 0 if encoder or scenes else target_depth, encoder and encoder.to(device),
                          TINY3.patch_size, truth=scenes is not None, second_depth=second_depth)
    x = keep_patches(a["x"], levers["keep"], 2) if "keep" in levers else a["x"]
    net = lambda *args, **kw: model(*args, **kw, **levers)  # noqa: E731
    truth = truth_targets(scenes, TINY3.patch_size).to(device) if scenes else None
    heads = (head, getattr(model, SECOND_PROJECTOR)) if second_depth else (head,)
    model_fn, losses = alignment.wrap(net, ema, heads, levers, images, teacher, truth)
    out = model_fn(x, a["t"], a["y"], a["mask"], force_drop_ids=a["force_drop_ids"])
    return model, ema, head, images, a, x, out, losses


def test_the_alignment_loss_trains_the_projector_and_the_blocks_up_to_its_depth_only():
    model, ema, head, *_, out, losses = aligned_step(depth=2)
    losses["align"].mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    for i, block in enumerate(model.blocks):
        grads = [p.grad for p in block.parameters()]
        if i < 2:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), i
        else:
            assert all(g is None for g in grads), i
    assert all(p.grad is None for p in model.final_layer.parameters())
    assert all(p.grad is None for p in ema.parameters())


def test_self_alignment_targets_are_the_emas_deeper_states_on_the_same_masked_input(monkeypatch):
    seen = []
    monkeypatch.setattr(align, "alignment_loss", lambda pred, target: seen.append((pred, target)) or pred.sum((1, 2)))
    keep = draw_tokens(2, 16, 0.5, torch.Generator().manual_seed(3))
    model, ema, head, _, a, x, _, _ = aligned_step(levers=dict(keep=keep, grid=(4, 4)))
    pred, target = seen[0]
    kw = dict(force_drop_ids=a["force_drop_ids"], keep=keep, grid=(4, 4))
    assert pred.shape == target.shape == (2, 8, 48)
    assert torch.equal(target, ema(x, a["t"], a["y"], a["mask"], **kw, hidden_depth=3, hidden_only=True))
    assert torch.equal(pred, head(model(x, a["t"], a["y"], a["mask"], **kw, hidden_depth=1)[1]))


def test_a_self_alignment_teacher_input_replaces_the_students_for_the_target_only(monkeypatch):
    seen = []
    monkeypatch.setattr(align, "alignment_loss", lambda pred, target: seen.append((pred, target)) or pred.sum((1, 2)))
    keep = draw_tokens(2, 16, 0.5, torch.Generator().manual_seed(3))
    x_teacher = keep_patches(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), keep, 2)
    t_teacher = torch.tensor([0, 7])
    model, ema, head, _, a, x, _, _ = aligned_step(levers=dict(keep=keep, grid=(4, 4)), teacher=(x_teacher, t_teacher))
    pred, target = seen[0]
    kw = dict(force_drop_ids=a["force_drop_ids"], keep=keep, grid=(4, 4))
    assert torch.equal(target, ema(x_teacher, t_teacher, a["y"], a["mask"], **kw, hidden_depth=3, hidden_only=True))
    assert not torch.equal(target, ema(x, a["t"], a["y"], a["mask"], **kw, hidden_depth=3, hidden_only=True))
    assert torch.equal(pred, head(model(x, a["t"], a["y"], a["mask"], **kw, hidden_depth=1)[1]))


@pytest.mark.parametrize("prediction", ["v", "flow"])
def test_the_trainer_gives_the_teacher_the_same_image_and_noise_up_to_the_offset_less_noisy(prediction, tmp_path,
                                                                                             monkeypatch):
    from pixart_fast.diffusion import Diffusion

    calls = {"student": [], "teacher": []}
    losses, noised = Diffusion.training_losses, Diffusion.noised
    monkeypatch.setattr(Diffusion, "training_losses", lambda self, fn, x0, t, noise=None, perturb=None: (
        calls["student"].append((x0, t, noise)) or losses(self, fn, x0, t, noise, perturb)))
    monkeypatch.setattr(Diffusion, "noised", lambda self, x0, t, noise: (
        calls["teacher"].append((x0, t, noise)) or noised(self, x0, t, noise)))
    cfg = replace(RECIPES[2], **{**FAST, "steps": 2}, **SELF, prediction=prediction,
                  min_snr_gamma=5.0 if prediction == "v" else 0.0, repa_target_offset=200)
    train(replace(cfg, out=str(tmp_path / "a")), progress=False)
    teacher = calls["teacher"][:2] if prediction == "v" else calls["teacher"][0::2]  # flow: the student's own too
    assert len(calls["student"]) == len(teacher) == 2
    for (x0, t, noise), (tx0, tt, tnoise) in zip(calls["student"], teacher):
        assert tx0 is x0 and tnoise is noise and tt.dtype == t.dtype
        assert bool(((t - tt) >= 0).all() and ((t - tt) <= 200).all() and (tt >= 0).all()) and not torch.equal(t, tt)
    with_offset = list(calls["student"])
    calls["student"].clear()
    train(replace(cfg, repa_target_offset=0, out=str(tmp_path / "b")), progress=False)  # the other draws unchanged
    assert len(calls["student"]) == 2
    for (_, t, noise), (_, t0, noise0) in zip(with_offset, calls["student"]):
        assert torch.equal(t, t0) and torch.equal(noise, noise0)


def test_repa_targets_are_the_encoders_patch_features_gathered_at_the_kept_tokens(dinov2, monkeypatch):
    encoder = FrozenEncoder(dinov2)
    seen = []
    monkeypatch.setattr(align, "alignment_loss", lambda pred, target: seen.append((pred, target)) or pred.sum((1, 2)))
    keep = draw_tokens(2, 16, 0.5, torch.Generator().manual_seed(3))
    *_, images, _, _, _, _ = aligned_step(encoder, levers=dict(keep=keep, grid=(4, 4)))
    full = encoder(images, (4, 4))  # 4 x 4 tokens of the model: the image at 8 x 8 px, the encoder's 4 x 4 patches
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (F.interpolate((images + 1) / 2, size=(8, 8), mode="bicubic") - mean) / std  # ImageNet's normalisation
    assert torch.equal(full, encoder.encoder(pixel_values=x).last_hidden_state[:, 1:])
    assert seen[0][1].shape == (2, 8, 24)
    assert torch.equal(seen[0][1], take_tokens(full, keep))


def test_truth_targets_are_each_pixels_one_hot_classes_token_by_token():
    scenes = [ShapeScenes(length=2, seed=s, size=32)[0]["truth"] for s in (0, 1)]
    targets = truth_targets(scenes, 4)
    assert targets.shape == (2, 64, truth_width(4)) == (2, 64, 16 * sum(TRUTH_CLASSES.values()))
    offsets = [0, *torch.tensor(list(TRUTH_CLASSES.values())).cumsum(0)[:-1].tolist()]
    for b, scene in enumerate(scenes):
        truth = pixel_truth(scene)
        assert (truth[0] > 0).any()  # the scene draws something
        for y in range(32):
            for x in range(32):
                want = torch.zeros(sum(TRUTH_CLASSES.values()))
                want[[o + int(c) for o, c in zip(offsets, truth[:, y, x])]] = 1
                token, pixel = (y // 4) * 8 + x // 4, (y % 4) * 4 + x % 4
                got = targets[b, token].view(16, -1)[pixel]
                assert torch.equal(got, want), (b, y, x)


def test_truth_targets_are_gathered_at_the_kept_tokens(monkeypatch):
    scenes = [ShapeScenes(length=2, seed=s, size=8)[0]["truth"] for s in (0, 1)]  # TINY3's 4 x 4 tokens of 2 px
    seen = []
    monkeypatch.setattr(align, "alignment_loss", lambda pred, target: seen.append((pred, target)) or pred.sum((1, 2)))
    keep = draw_tokens(2, 16, 0.5, torch.Generator().manual_seed(3))
    aligned_step(levers=dict(keep=keep, grid=(4, 4)), scenes=scenes)
    assert seen[0][0].shape == seen[0][1].shape == (2, 8, truth_width(2))
    assert torch.equal(seen[0][1], take_tokens(truth_targets(scenes, 2), keep))


def test_a_second_depth_inside_the_routed_run_aligns_the_routed_tokens_through_its_own_projector(monkeypatch):
    scenes = [ShapeScenes(length=2, seed=s, size=8)[0]["truth"] for s in (0, 1)]
    seen = []
    monkeypatch.setattr(align, "alignment_loss", lambda pred, target: seen.append((pred, target)) or pred.sum((1, 2)))
    route = torch.tensor([[0, 3, 5, 9, 10, 12, 14, 15]] * 2)
    levers = dict(route=route, route_blocks=(0, 2))  # block 0 and 1 run the routed tokens only
    model, _, head, _, a, x, _, losses = aligned_step(levers=levers, depth=3, second_depth=1, scenes=scenes)
    truth = truth_targets(scenes, 2)
    kw = dict(force_drop_ids=a["force_drop_ids"], **levers)
    (pred, target), (second_pred, second_target) = seen
    assert torch.equal(target, truth) and torch.equal(pred, head(model(x, a["t"], a["y"], a["mask"], **kw,
                                                                        hidden_depth=3)[1]))
    first = model(x, a["t"], a["y"], a["mask"], **kw, hidden_depth=1)[1]
    assert torch.equal(second_target, take_tokens(truth, route)) and second_pred.shape == (2, 8, truth_width(2))
    assert torch.equal(second_pred, getattr(model, SECOND_PROJECTOR)(take_tokens(first, route)))
    assert torch.equal(losses["align"], pred.sum((1, 2)) + second_pred.sum((1, 2)))
    seen.clear()  # before the routed run (blocks 1 and 2 routed), block 0 ran every token: all are aligned
    aligned_step(levers=dict(route=route, route_blocks=(1, 3)), depth=3, second_depth=1, scenes=scenes)
    assert seen[1][0].shape == (2, 16, truth_width(2)) and torch.equal(seen[1][1], truth)


def test_inside_the_routed_run_the_second_depths_loss_reaches_the_routed_tokens_pixels_only(monkeypatch):
    scenes = [ShapeScenes(length=2, seed=s, size=8)[0]["truth"] for s in (0, 1)]
    seen = []
    monkeypatch.setattr(align, "alignment_loss", lambda pred, target: seen.append(pred) or pred.sum((1, 2)))
    model, a = model_and_inputs()
    route = torch.tensor([[0, 3, 5, 9, 10, 12, 14, 15]] * 2)
    levers = dict(route=route, route_blocks=(0, 2))  # blocks 0 and 1 run the routed tokens only
    heads = (projector(48, 96, truth_width(2)), projector(48, 96, truth_width(2)))
    alignment = Alignment(3, 0, None, TINY3.patch_size, truth=True, second_depth=1)
    net = lambda *args, **kw: model(*args, **kw, **levers)  # noqa: E731
    model_fn, _ = alignment.wrap(net, None, heads, levers, None, None, truth_targets(scenes, 2))
    x = a["x"].clone().requires_grad_()
    model_fn(x, a["t"], a["y"], a["mask"], force_drop_ids=a["force_drop_ids"])
    grad = torch.autograd.grad(seen[1].sum(), x)[0]  # the second depth's loss only: (B, C, 8, 8)
    per_token = grad.abs().sum(1).view(2, 4, 2, 4, 2).sum((2, 4)).flatten(1)  # (B, 16): TINY3's 2 x 2 px tokens
    routed = torch.zeros(2, 16, dtype=torch.bool).scatter(1, route, True)
    assert (per_token[~routed] == 0).all() and (per_token[routed] > 0).all()


def test_two_aligned_depths_train_and_resume_bit_identically_and_stay_out_of_the_weights_files(tmp_path):
    import json

    cfg = replace(RECIPES[2], **FAST, repa_depth=2, repa_second_depth=1, repa_truth=True, route_ratio=0.5,
                  route_start=0)
    assert_resume_is_bit_identical(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "a/stage2/metrics.jsonl").read_text().splitlines()]
    aligns = [m["align"] for m in lines if "loss" in m]
    assert len(aligns) == 4 and all(-2 <= a < 0 for a in aligns)
    folder = tmp_path / "a/stage2/checkpoints/step-0000004"
    trainer = torch.load(folder / "trainer.pt", weights_only=True)
    patch = load_pixart(folder / "ema.safetensors").config.patch_size
    for name in (PROJECTOR, SECOND_PROJECTOR):
        assert trainer["projector"]["ema"][f"{name}.4.weight"].shape[0] == truth_width(patch)
    for name in ("model.safetensors", "ema.safetensors"):
        assert not any(k.startswith(PROJECTOR) for k in load_safetensors(folder / name))


def test_the_truth_first_arm_aligns_the_one_block_every_token_runs_at_the_truth_last_arms_cost():
    from pixart_fast.model import CONFIGS
    from pixart_fast.train.ablate import ARMS, image_flops, stage2_config

    first, last = (stage2_config(next(a for a in ARMS if a.name == n), 0, 800, 200, 8, {})
                   for n in ("repa-truth-first", "repa-truth-last"))
    depth = CONFIGS[first.model].depth
    ratio, (start, end) = first.routing(0, depth)
    assert ratio == RECIPES[2].route_ratio and (start, end) == (1, depth) and first.repa_depth == 1 <= start
    assert first.repa_truth and image_flops(first, 0) == image_flops(last, 0)


def test_the_truth_both_arm_aligns_two_blocks_that_every_token_runs():
    from pixart_fast.model import CONFIGS
    from pixart_fast.train.ablate import ARMS, image_flops, stage2_config

    first, last, both = (stage2_config(next(a for a in ARMS if a.name == n), 0, 800, 200, 8, {})
                         for n in ("repa-truth", "repa-truth-last", "repa-truth-both"))
    depth = CONFIGS[both.model].depth
    _, (start, end) = both.routing(0, depth)
    assert both.repa_second_depth <= start and both.repa_depth == depth >= end  # neither inside the routed run
    assert replace(both, repa_depth=1, repa_second_depth=0) == replace(first, repa_projector_dim=64)
    assert replace(both, route_start=last.route_start, repa_second_depth=0) == last
    assert image_flops(replace(first, repa_projector_dim=64), 0) < image_flops(both, 0)


def test_alignment_to_the_truth_trains_and_resumes_bit_identically(tmp_path):
    import json

    cfg = replace(RECIPES[2], **FAST, repa_depth=1, repa_truth=True, mask_ratio=0.5)
    assert_resume_is_bit_identical(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "a/stage2/metrics.jsonl").read_text().splitlines()]
    aligns = [m["align"] for m in lines if "loss" in m]
    assert len(aligns) == 4 and all(-1 <= a < 0 for a in aligns)
    trainer = torch.load(tmp_path / "a/stage2/checkpoints/step-0000004/trainer.pt", weights_only=True)
    patch = load_pixart(tmp_path / "a/stage2/checkpoints/step-0000004/ema.safetensors").config.patch_size
    assert trainer["projector"]["model"][f"{PROJECTOR}.4.weight"].shape[0] == truth_width(patch)


def test_weight_zero_trains_bit_identically_to_no_alignment(tmp_path):
    # without clipping: the global gradient norm also sums the projector's (zero) gradients, in another grouping,
    # and can round one ulp apart, which moves every clipped gradient by about 1e-8
    base = replace(RECIPES[2], **FAST, mask_ratio=0.5, grad_clip=1e9)  # routed on two blocks too
    train(replace(base, out=str(tmp_path / "off")), progress=False)
    train(replace(base, **SELF, repa_weight=0.0, out=str(tmp_path / "zero")), progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        off = load_safetensors(tmp_path / "off/stage2/checkpoints/step-0000003" / name)
        zero = load_safetensors(tmp_path / "zero/stage2/checkpoints/step-0000003" / name)
        assert off.keys() == zero.keys() and all(torch.equal(off[k], zero[k]) for k in off), name


def test_resume_with_self_alignment_is_bit_identical(tmp_path):
    cfg = replace(RECIPES[2], **FAST, **SELF, repa_target_offset=100, mask_ratio=0.5, route_ratio=0.5)
    assert_resume_is_bit_identical(cfg, tmp_path)
    trainer = torch.load(tmp_path / "b/stage2/checkpoints/step-0000004/trainer.pt", weights_only=True)
    assert set(trainer["projector"]) == {"model", "ema"}


def test_alignment_ends_after_repa_steps_and_resumes_across_the_end_bit_identically(tmp_path, monkeypatch):
    import json

    wrapped = []
    wrap = Alignment.wrap
    monkeypatch.setattr(Alignment, "wrap", lambda self, *a, **k: wrapped.append(1) or wrap(self, *a, **k))
    cfg = replace(RECIPES[2], **FAST, **SELF, repa_steps=3, repa_target_offset=100)
    assert_resume_is_bit_identical(cfg, tmp_path)  # the end (after step 3) falls after the resume (step 2)
    assert len(wrapped) == 3 + 2 + 1  # straight to 4, then to 2 and on to 4: aligned in steps 1-3 only
    lines = [json.loads(line) for line in (tmp_path / "a/stage2/metrics.jsonl").read_text().splitlines()]
    aligns = [m["align"] for m in lines if "loss" in m]
    assert len(aligns) == 4 and all(-1 <= a <= 1 and a != 0 for a in aligns[:3]) and aligns[3] == 0
    # the ablation costs the aligned steps with the teacher's forward and the projector, the rest without
    from pixart_fast.train.ablate import image_flops, step_flops

    cfg = replace(cfg, model="PixArt-pixel-32", repa_target_depth=3, steps=10)
    unaligned = image_flops(replace(cfg, repa_depth=0, repa_target_depth=0, repa_target_offset=0, repa_steps=0), 0)
    assert image_flops(cfg, 3) == unaligned < image_flops(cfg, 2) == image_flops(replace(cfg, repa_steps=0), 3)
    assert step_flops(cfg, 10) == cfg.batch_size * (3 * image_flops(cfg, 0) + 7 * unaligned)


def test_a_tiny_dinov2_from_a_local_folder_trains_and_sampling_never_sees_the_projector(dinov2, tmp_path):
    import json

    summary = train(replace(RECIPES[2], **FAST, repa_depth=1, repa_encoder=dinov2, out=str(tmp_path)), progress=False)
    assert summary["skipped_steps"] == 0
    lines = [json.loads(line) for line in (tmp_path / "stage2/metrics.jsonl").read_text().splitlines()]
    assert all(-1 <= m["align"] <= 1 for m in lines if "loss" in m)
    folder = tmp_path / "stage2/checkpoints/step-0000003"
    for name in ("model.safetensors", "ema.safetensors"):
        assert not any(k.startswith(PROJECTOR) for k in load_safetensors(folder / name))
    trainer = torch.load(folder / "trainer.pt", weights_only=True)
    assert trainer["projector"]["model"][f"{PROJECTOR}.4.weight"].shape == (24, 2 * 48)
    assert not hasattr(load_pixart(folder / "ema.safetensors"), PROJECTOR)


def counted(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
@pytest.mark.parametrize("form", ["self", "encoder", "truth"])
def test_the_flop_count_matches_flop_counter_mode(form, mask_ratio, dinov2):
    encoder = FrozenEncoder(dinov2) if form == "encoder" else None
    scenes = [ShapeScenes(length=2, seed=s, size=8)[0]["truth"] for s in (0, 1)] if form == "truth" else None
    T, B, c = kept_count(16, mask_ratio), 2, TINY3
    keep = draw_tokens(B, 16, mask_ratio, torch.Generator().manual_seed(0))
    levers = dict(keep=keep, grid=(4, 4)) if mask_ratio else {}
    box = {}
    fwd = counted(lambda: box.update(step=aligned_step(encoder, levers, depth=2, target_depth=2, device="meta",
                                                       scenes=scenes)))
    *_, out, losses = box["step"]
    bwd = counted(lambda: (out.square().mean() + losses["align"].mean()).backward())
    repa = dict(repa_depth=2, repa_target_depth=2 if form == "self" else 0, repa_projector_dim=96,
                repa_encoder=encoder.config if encoder else None, repa_truth=form == "truth")
    expected = flops_per_image(c, mask_ratio=mask_ratio, **repa)
    # autograd skips the input gradients of the patch embedding and the timestep and caption MLPs' first layers
    skipped = 2 * T * c.in_channels * c.patch_size ** 2 * c.hidden_size + 2 * 256 * c.hidden_size \
        + 2 * c.max_tokens * c.caption_channels * c.hidden_size
    assert fwd + bwd == B * (expected - skipped)
    assert expected > flops_per_image(c, mask_ratio=mask_ratio)


def test_the_flop_count_of_two_depths_one_inside_the_routed_run_matches_flop_counter_mode():
    scenes = [ShapeScenes(length=2, seed=s, size=8)[0]["truth"] for s in (0, 1)]
    route = draw_tokens(2, 16, 0.5, torch.Generator().manual_seed(0))
    routing = dict(route_ratio=0.5, route_blocks=(0, 2))
    box = {}
    fwd = counted(lambda: box.update(step=aligned_step(levers=dict(route=route, route_blocks=(0, 2)), depth=3,
                                                       second_depth=1, device="meta", scenes=scenes)))
    *_, out, losses = box["step"]
    bwd = counted(lambda: (out.square().mean() + losses["align"].mean()).backward())
    c = TINY3
    expected = flops_per_image(c, **routing, repa_depth=3, repa_second_depth=1, repa_projector_dim=96,
                               repa_truth=True)
    skipped = 2 * 16 * c.in_channels * c.patch_size ** 2 * c.hidden_size + 2 * 256 * c.hidden_size \
        + 2 * c.max_tokens * c.caption_channels * c.hidden_size
    assert fwd + bwd == 2 * (expected - skipped)
    one = flops_per_image(c, **routing, repa_depth=3, repa_projector_dim=96, repa_truth=True)
    assert expected - one == (one - flops_per_image(c, **routing)) // 2  # the second reads half the tokens


def test_the_flop_count_of_dinov2_giants_swiglu_mlp():
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, patch_size=2, image_size=8,
                          use_swiglu_ffn=True)
    with torch.device("meta"):
        encoder = Dinov2Model(config)
        n = counted(lambda: encoder(pixel_values=torch.randn(1, 3, 8, 8)))
    parts = alignment_flops(TINY3, repa_encoder=config)  # TINY3's 4 x 4 tokens: the encoder at 8 x 8 px
    assert n == sum(v for k, v in parts.items() if k.startswith("encoder_"))


@pytest.mark.parametrize("settings, expected", [
    (dict(repa_target_depth=2), "pass --repa-depth too"),
    (dict(repa_depth=1), "exactly one target"),
    (dict(repa_depth=1, repa_target_depth=2, repa_encoder="x"), "exactly one target"),
    (dict(repa_depth=2, repa_target_depth=2), "must be deeper"),
    (dict(repa_depth=1, repa_encoder="x", repa_target_offset=100), "pass --repa-target-depth too"),
    (dict(**SELF, repa_target_offset=1000), "--repa-target-offset"),
    (dict(repa_steps=100), "--repa-steps 100: it ends representation alignment; pass --repa-depth too"),
    (dict(repa_depth=3, repa_encoder="x"), "has 2 blocks"),
    (dict(stage=1, **SELF), "not stage 1's DiT"),
    (dict(lora_rank=4, **SELF), "--lora-rank"),
    (dict(repa_depth=1, repa_encoder="x", data="features"), "feature shards hold VAE latents"),
    (dict(repa_depth=1, repa_encoder="no/such/folder"), "not a transformers model folder"),
    (dict(repa_truth=True), "pass --repa-depth too"),
    (dict(repa_depth=1, repa_truth=True, repa_encoder="x"), "exactly one target"),
    (dict(repa_depth=1, repa_truth=True, data="features"), "the truth is the embedded scenes'"),
    (dict(repa_second_depth=1), "--repa-second-depth 1: a second aligned depth; pass --repa-depth too"),
    (dict(repa_depth=1, repa_second_depth=1, repa_truth=True), "--repa-depth aligns that depth already"),
    (dict(repa_depth=1, repa_second_depth=3, repa_truth=True), "--repa-second-depth 3: PixArt-pixel-tiny has 2 "),
    (dict(repa_depth=1, repa_second_depth=2, repa_target_depth=2), "2 --repa-target-depth 2: the target must be"),
])
def test_bad_alignment_flags_fail_with_one_line(settings, expected, tmp_path):
    with pytest.raises(UserError, match=expected) as error:
        train(replace(RECIPES[settings.get("stage", 2)], **{**FAST, **settings}, out=str(tmp_path)), progress=False)
    assert "\n" not in str(error.value)
