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

from test_token_levers import TINY3, model_and_inputs
from test_train import assert_resume_is_bit_identical

FAST = dict(model="PixArt-pixel-tiny", batch_size=2, num_val=2, sample_steps=2, sample_every=0, kernels="torch",
            steps=3, log_every=1, save_every=2)


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


@pytest.mark.parametrize("depth, tokens", [(1, 8), (3, 16)])
def test_inside_the_routed_run_only_the_routed_tokens_are_dispersed(depth, tokens, monkeypatch):
    seen = []
    monkeypatch.setattr(align, "dispersive_loss", lambda hidden, distance: seen.append(hidden) or hidden.sum())
    model, a = model_and_inputs()
    route = torch.tensor([[0, 3, 5, 9, 10, 12, 14, 15]] * 2)
    levers = dict(route=route, route_blocks=(0, 2))  # blocks 0 and 1 run the routed tokens only
    net = lambda *args, **kw: model(*args, **kw, **levers)  # noqa: E731
    model_fn, losses = Dispersion(depth).wrap(net, levers)
    out = model_fn(a["x"], a["t"], a["y"], a["mask"], force_drop_ids=a["force_drop_ids"])
    assert torch.equal(out, net(a["x"], a["t"], a["y"], a["mask"], force_drop_ids=a["force_drop_ids"]))
    hidden = net(a["x"], a["t"], a["y"], a["mask"], force_drop_ids=a["force_drop_ids"], hidden_depth=depth)[1]
    expected = hidden.gather(1, route[..., None].expand(-1, -1, hidden.shape[-1])) if tokens == 8 else hidden
    assert seen[0].shape == (2, tokens, hidden.shape[-1]) and torch.equal(seen[0], expected)
    assert torch.equal(losses["disperse"], expected.sum())


@pytest.mark.parametrize("depth, tokens", [(1, 8), (3, 16)])
def test_the_flop_count_matches_flop_counter_mode(depth, tokens):
    c, B = TINY3, 3
    hidden = torch.randn(B, tokens, c.hidden_size, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        dispersive_loss(hidden).backward()
    routing = dict(route_ratio=0.5, route_blocks=(0, 2))  # depth 1 lies inside the run: the routed half is read
    assert counter.get_total_flops() == B * dispersion_flops(c, disperse_depth=depth, batch_size=B, **routing)
    assert flops_per_image(c, **routing, disperse_depth=depth, batch_size=B) == \
        flops_per_image(c, **routing) + dispersion_flops(c, disperse_depth=depth, batch_size=B, **routing)
    with pytest.raises(ValueError, match="batch size"):
        flops_per_image(c, disperse_depth=depth)


def test_dispersion_trains_logs_and_resumes_bit_identically(tmp_path):
    cfg = replace(RECIPES[2], **FAST, disperse_weight=0.5, disperse_depth=1, route_ratio=0.5, route_start=0,
                  route_end=2)
    assert_resume_is_bit_identical(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "a/stage2/metrics.jsonl").read_text().splitlines()]
    disperse = [m["disperse"] for m in lines if "loss" in m]
    assert len(disperse) == 4 and all(-0.7 < v <= 0 for v in disperse)  # in [log(1/B), 0] with B = 2


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
    (dict(disperse_weight=-1.0, disperse_depth=1), "--disperse-weight"),
])
def test_bad_dispersion_flags_fail_with_one_line(settings, expected, tmp_path):
    with pytest.raises(UserError, match=expected) as error:
        train(replace(RECIPES[settings.get("stage", 2)], **{**FAST, **settings}, out=str(tmp_path)), progress=False)
    assert "\n" not in str(error.value)
