"""The dispersive loss (pixart_fast.align.dispersive_loss, --disperse-weight / --disperse-depth): the paper's
formula, the states it reads (inside a routed run the routed tokens only), the trainer with it (logged, resumed
bit-identically, the samples' weights unchanged by its absence), and the flags' errors."""
import json
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pixart_fast import align
from pixart_fast.align import DISPERSE_TEMPERATURE, Dispersion, dispersive_loss
from pixart_fast.cli import UserError
from pixart_fast.flops import dispersion_flops, flops_per_image
from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES

from test_repa import FAST
from test_token_levers import TINY3, model_and_inputs
from test_train import assert_resume_is_bit_identical



def test_the_loss_is_the_papers_infonce_l2():
    # arXiv 2506.09027's pseudo-code: the squared pairwise distances of the flattened states over their width, each
    # pair in both orders and the diagonal's zeros, then the log of the mean of exp(-d / tau)
    z = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = z.flatten(1)
    d = torch.pdist(flat).pow(2) / flat.shape[1]
    d = torch.cat([d, d, torch.zeros(5, dtype=torch.float64)])
    paper = torch.log(torch.exp(-d / DISPERSE_TEMPERATURE).mean())
    torch.testing.assert_close(dispersive_loss(z), paper.float())


def test_the_cosine_form_is_the_papers_and_ignores_the_states_scale():
    # the paper's cosine form: d = -cos(z_i, z_j) over every ordered pair, i = j included
    z = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = z.flatten(1)
    cos = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    paper = torch.log(torch.exp(cos / DISPERSE_TEMPERATURE).mean())
    torch.testing.assert_close(dispersive_loss(z, "cosine"), paper.float())
    torch.testing.assert_close(dispersive_loss(10 * z, "cosine"), paper.float())
    assert dispersive_loss(10 * z) < dispersive_loss(z)  # the l2 form falls as the states grow


def test_the_loss_is_zero_for_one_state_and_falls_to_log_one_over_b_as_the_states_part():
    same = torch.ones(4, 3, 2)
    assert dispersive_loss(same) == 0
    apart = 100 * torch.eye(4).view(4, 1, 4).expand(4, 3, 4)
    torch.testing.assert_close(dispersive_loss(apart), torch.log(torch.tensor(1 / 4)))
    z = torch.randn(4, 3, 2, requires_grad=True)
    dispersive_loss(z).backward()  # its gradient moves each state away from the others: the loss falls along it
    assert dispersive_loss(z.detach() - 0.1 * z.grad) < dispersive_loss(z.detach())


def test_the_loss_is_float32_under_autocast():
    z = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    for distance in ("l2", "cosine"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = dispersive_loss(z.bfloat16(), distance)
        assert under.dtype == torch.float32
        torch.testing.assert_close(under, dispersive_loss(z.bfloat16().float(), distance), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [1, 3])
def test_every_token_is_dispersed_at_its_place_inside_the_routed_run_too(depth, monkeypatch):
    seen = []
    monkeypatch.setattr(align, "dispersive_loss", lambda hidden, distance: seen.append(hidden) or hidden.sum())
    model, a = model_and_inputs()
    route = torch.tensor([[0, 3, 5, 9, 10, 12, 14, 15], [1, 2, 4, 6, 7, 8, 11, 13]])  # each image its own tokens
    levers = dict(route=route, route_blocks=(0, 2))  # blocks 0 and 1 run the routed tokens only
    net = lambda *args, **kw: model(*args, **kw, **levers)  # noqa: E731
    model_fn, losses = Dispersion(depth).wrap(net)
    inputs = (a["x"], a["t"], a["y"], a["mask"])
    out = model_fn(*inputs, force_drop_ids=a["force_drop_ids"])
    assert torch.equal(out, net(*inputs, force_drop_ids=a["force_drop_ids"]))
    hidden = net(*inputs, force_drop_ids=a["force_drop_ids"], hidden_depth=depth)[1]
    assert seen[0].shape == (2, 16, TINY3.hidden_size) and torch.equal(seen[0], hidden)
    assert torch.equal(losses["disperse"], hidden.sum())
    if depth == 1:  # inside the run the skipping tokens are as they entered it: the same after block 0 and block 1
        later = net(*inputs, force_drop_ids=a["force_drop_ids"], hidden_depth=2)[1]
        skipping = torch.ones(2, 16, dtype=torch.bool).scatter(1, route, False)
        assert torch.equal(hidden[skipping], later[skipping]) and not torch.equal(hidden[~skipping], later[~skipping])


def test_the_flop_count_matches_flop_counter_mode():
    c, B = TINY3, 3
    hidden = torch.randn(B, 16, c.hidden_size, requires_grad=True)  # TINY3's 16 tokens, routed or not
    for distance in ("l2", "cosine"):
        with FlopCounterMode(display=False) as counter:
            dispersive_loss(hidden, distance).backward()
        assert counter.get_total_flops() == B * dispersion_flops(c, batch_size=B)
    routing = dict(route_ratio=0.5, route_blocks=(0, 2))
    assert flops_per_image(c, **routing, disperse_depth=1, batch_size=B) == \
        flops_per_image(c, **routing) + dispersion_flops(c, batch_size=B)
    with pytest.raises(ValueError, match="batch size"):
        flops_per_image(c, disperse_depth=1)


@pytest.mark.parametrize("distance, low, high", [("l2", -0.7, 0.0), ("cosine", 1.32, 2.0)])
def test_dispersion_trains_logs_and_resumes_bit_identically(distance, low, high, tmp_path):
    cfg = replace(RECIPES[2], **FAST, disperse_weight=0.5, disperse_depth=1, disperse_distance=distance,
                  route_ratio=0.5, route_start=0)
    assert_resume_is_bit_identical(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "a/stage2/metrics.jsonl").read_text().splitlines()]
    disperse = [m["disperse"] for m in lines if "loss" in m]
    # two images: l2 lies in [log(1/2), 0]; cosine in [log((e^2 + e^-2) / 2), 2], the form's own range
    assert len(disperse) == 4 and all(low < v <= high for v in disperse)


def test_dispersion_trains_lora_adapters(tmp_path):
    # no projector beside the model (unlike alignment), so LoRA's frozen base takes the loss as any other
    train(replace(RECIPES[2], **FAST, out=str(tmp_path / "base")), progress=False)
    base = tmp_path / "base/stage2/checkpoints/step-0000003/ema.safetensors"
    train(replace(RECIPES[2], **FAST, lora_rank=4, init=str(base), disperse_weight=0.5, disperse_depth=1,
                  out=str(tmp_path / "lora")), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "lora/stage2/metrics.jsonl").read_text().splitlines()]
    assert len([m["disperse"] for m in lines if "loss" in m]) == 3


def test_the_dispersive_loss_changes_the_training(tmp_path):
    train(replace(RECIPES[2], **FAST, out=str(tmp_path / "off")), progress=False)
    train(replace(RECIPES[2], **FAST, disperse_weight=0.5, disperse_depth=2, out=str(tmp_path / "on")),
          progress=False)
    lines = {k: [m for x in (tmp_path / k / "stage2/metrics.jsonl").read_text().splitlines()
                 if "loss" in (m := json.loads(x))] for k in ("off", "on")}
    assert "disperse" not in lines["off"][0] and "disperse" in lines["on"][0]
    assert lines["off"][0]["loss"] == lines["on"][0]["loss"]  # the first step's diffusion loss: the same draws
    assert lines["off"][-1]["loss"] != lines["on"][-1]["loss"]  # then the weights part


@pytest.mark.parametrize("settings, expected", [
    (dict(disperse_weight=0.5), "--disperse-weight 0.5 --disperse-depth 0: the dispersive loss takes both"),
    (dict(disperse_depth=1), "--disperse-weight 0.0 --disperse-depth 1: the dispersive loss takes both"),
    (dict(disperse_weight=0.5, disperse_depth=3), "--disperse-depth 3: PixArt-pixel-tiny has 2 blocks"),
    (dict(disperse_weight=0.5, disperse_depth=1, repa_depth=1, repa_truth=True), "pass one of the two"),
    (dict(stage=1, disperse_weight=0.5, disperse_depth=1), "the dispersive loss is for stages 2 and 3"),
    (dict(disperse_distance="cosine"), "--disperse-distance cosine: it shapes the dispersive loss; pass"),
    (dict(disperse_weight=0.5, disperse_depth=1, batch_size=1), "with 1 image a process"),
    (dict(model="PixArt-pixel-32", disperse_weight=0.5, disperse_depth=1, mask_ratio=0.5), "--mask-ratio 0.5: each"),
    (dict(disperse_weight=-1.0, disperse_depth=1), "--disperse-weight"),
])
def test_bad_dispersion_flags_fail_with_one_line(settings, expected, tmp_path):
    with pytest.raises(UserError, match=expected) as error:
        train(replace(RECIPES[settings.get("stage", 2)], **{**FAST, **settings}, out=str(tmp_path)), progress=False)
    assert "\n" not in str(error.value)
