"""Autoguidance (a weaker model's prediction pushed away from, on top of classifier-free guidance): the formula, the
model's and the sampler's use of it, and `python -m pixart_fast.train.rescore`, which scores a run's checkpoints
again with other sampler settings."""
import json
from dataclasses import replace

import pytest
import torch

from pixart_fast.cli import UserError
from pixart_fast.diffusion import guided
from pixart_fast.model import CONFIGS, PixArt
from pixart_fast.sample import main as sample_main
from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES
from pixart_fast.train.rescore import main as rescore_main, rescore


def toy(weight, bias):
    """(x (B, 3, H, W), t, y (B,)) -> (B, 6, H, W): a linear map of x scaled by the caption y, plus t."""
    return lambda x, t, y: (torch.einsum("oc,bchw->bohw", weight, x) * (1 + y.view(-1, 1, 1, 1))
                            + t.view(-1, 1, 1, 1) / 1000 + bias)


def test_autoguidance_is_karras_form_on_top_of_classifier_free_guidance():
    g = torch.Generator().manual_seed(0)
    good, bad = toy(torch.randn(6, 3, generator=g), 0.0), toy(torch.randn(6, 3, generator=g), 0.3)
    x, t = torch.randn(2, 3, 4, 4, generator=g), torch.tensor([10, 500])
    both = lambda x2, t2: good(x2, t2, torch.tensor([1.0, 1.0, -1.0, -1.0]))  # noqa: E731
    guide = lambda x1, t1: bad(x1, t1, torch.ones(2))  # noqa: E731
    cond, uncond, weak = good(x, t, torch.ones(2)), good(x, t, -torch.ones(2)), bad(x, t, torch.ones(2))
    out = guided(both, 2.5, guide, 1.5)(x, t)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3])
                               + 1.5 * (cond[:, :3] - weak[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])  # the variance: the conditional prediction's
    # scale 1: the paper's D_0 + w (D_1 - D_0) with w = weight + 1
    torch.testing.assert_close(guided(both, 1.0, guide, 1.5)(x, t)[:, :3], weak[:, :3] + 2.5 * (cond - weak)[:, :3])
    # weight 0, or no guide: classifier-free guidance alone
    torch.testing.assert_close(guided(both, 2.5, guide, 0.0)(x, t), guided(both, 2.5)(x, t))


def test_the_model_guided_by_itself_is_cfg_and_by_another_is_not():
    cfg = CONFIGS["PixArt-pixel-tiny"]
    torch.manual_seed(0)
    model, other = PixArt(cfg, kernels="torch").eval(), PixArt(cfg, kernels="torch").eval()
    for m in (model, other):  # PixArt zero-initialises its output layer and cross-attention outputs
        for p in m.parameters():
            p.data.normal_(0, 0.05)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.tensor([100, 700]), torch.randn(2, cfg.max_tokens, cfg.caption_channels)
    mask = (torch.arange(cfg.max_tokens) < torch.tensor([[3], [9]])).long()
    with torch.no_grad():
        plain = model.forward_with_cfg(x, t, y, mask, 3.0)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, mask, 3.0, guide=model, guide_weight=2.0), plain)
        cond, weak = model(x, t, y, mask), other(x, t, y, mask)
        C = cfg.in_channels
        expected = plain[:, :C] + 2.0 * (cond[:, :C] - weak[:, :C])
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, mask, 3.0, guide=other, guide_weight=2.0)[:, :C],
                                   expected)


def test_rescore_reproduces_the_trainers_evaluation_and_guides_by_an_earlier_checkpoint(tmp_path, capsys,
                                                                                        reference_kernels):
    # a text encoder trained on captions, which rescore and sample rebuild from what the checkpoints record
    cfg = replace(RECIPES[2], model="PixArt-pixel-tiny", route_end=2, steps=4, batch_size=2, num_val=3, sample_steps=2,
                  save_every=2, sample_every=2, kernels="torch", t5_train_steps=4, out=str(tmp_path))
    train(cfg, progress=False)
    run_dir = tmp_path / "stage2"
    logged = {r["step"]: r["val"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "val" in r}
    rows = rescore(run_dir, cfg_scale=cfg.cfg_scale, sample_steps=2, num_val=3, grids=tmp_path / "grids",
                   log=lambda line: None)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:  # the trainer's settings: its own evaluation, sample for sample and number for number
        name = f"step-{r['step']:07d}.png"
        assert (tmp_path / "grids" / name).read_bytes() == (run_dir / "samples" / name).read_bytes()
        assert json.dumps(r["scores"], sort_keys=True) == json.dumps(logged[r["step"]], sort_keys=True)
    guided_rows = rescore(run_dir, cfg_scale=cfg.cfg_scale, sample_steps=2, num_val=3, guide_step=2,
                          guide_weight=1.0, grids=tmp_path / "guided", log=lambda line: None)
    assert [r["step"] for r in guided_rows] == [4]
    name = "step-0000004.png"  # the guide moved the samples
    assert (tmp_path / "guided" / name).read_bytes() != (run_dir / "samples" / name).read_bytes()
    # other weights as the guide (here the same checkpoint, named by its path): every checkpoint is guided
    by_path = rescore(run_dir, cfg_scale=cfg.cfg_scale, sample_steps=2, num_val=3, guide_weight=1.0,
                      guide_ckpt=run_dir / "checkpoints" / "step-0000002", log=lambda line: None)
    assert [r["step"] for r in by_path] == [2, 4]
    assert json.dumps(by_path[1], sort_keys=True) == json.dumps(guided_rows[0], sort_keys=True)  # NaN != NaN
    with pytest.raises(UserError, match="--guide-step 2 and --guide-ckpt .*: pass one guide"):
        rescore_main([str(run_dir), "--guide-step", "2", "--guide-ckpt", str(run_dir / "checkpoints" / "step-0000002")])
    with pytest.raises(UserError, match="--guide-ckpt no/such: no such file or folder"):
        rescore_main([str(run_dir), "--guide-ckpt", "no/such"])
    out = tmp_path / "r.json"
    assert rescore_main([str(run_dir), "--cfg-scale", str(cfg.cfg_scale), "--guide-step", "2", "--sample-steps", "2",
                         "--num-val", "3", "--out", str(out)]) == 0
    assert json.dumps(json.loads(out.read_text()), sort_keys=True) == json.dumps(guided_rows, sort_keys=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4 ")]
    assert len(lines) == 1 and len(lines[0].split("|")) == 9
    with pytest.raises(UserError, match="no checkpoint at that step; it has 2, 4"):
        rescore_main([str(run_dir), "--guide-step", "3"])
    with pytest.raises(UserError, match="no checkpoint after it"):
        rescore_main([str(run_dir), "--guide-step", "4"])
    with pytest.raises(UserError, match="no checkpoints/step-XXXXXXX"):
        rescore_main([str(tmp_path)])
    # the sampler: an earlier checkpoint as the guide, and one of another kind of model refused
    ckpt = run_dir / "checkpoints" / "step-0000004"
    png = tmp_path / "s.png"
    assert sample_main(["--ckpt", str(ckpt), "--prompt", "a red circle", "--out", str(png), "--steps", "2",
                        "--cfg-scale", "2.5", "--guide-ckpt", str(run_dir / "checkpoints" / "step-0000002")]) == 0
    assert png.exists()
    other = replace(cfg, model="PixArt-pixel-32", steps=1, save_every=1, sample_every=0, out=str(tmp_path / "o"))
    train(other, progress=False)
    with pytest.raises(UserError, match="--guide-ckpt .*: its in_channels|--guide-ckpt .*: its max_tokens"):
        sample_main(["--ckpt", str(ckpt), "--prompt", "x", "--out", str(png), "--steps", "2",
                     "--guide-ckpt", str(tmp_path / "o/stage2/checkpoints/step-0000001")])
    ema = run_dir / "checkpoints" / "step-0000002" / "ema.safetensors"  # a damaged guide is named, not used
    damaged = bytearray(ema.read_bytes())
    damaged[-1] ^= 0xFF
    ema.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match="--guide-step 2: its checkpoint is damaged"):
        rescore_main([str(run_dir), "--guide-step", "2"])


def test_the_trainers_validation_autoguided_after_guide_step_equals_rescore(tmp_path, capsys, reference_kernels):
    """--guide-step: validation after that step is guided by the run's checkpoint of it, which --keep keeps; the
    scores and grids are rescore's with the same settings, and a finished run started again scores the same."""
    cfg = replace(RECIPES[2], model="PixArt-pixel-tiny", route_end=2, steps=6, batch_size=2, num_val=3, sample_steps=2,
                  save_every=2, sample_every=2, keep=1, cfg_scale=2.5, guide_step=2, guide_weight=1.5,
                  kernels="torch", t5_train_steps=0, out=str(tmp_path))
    train(cfg, progress=False)
    run_dir = tmp_path / "stage2"
    assert "step 4: EMA (autoguided by step 2)" in capsys.readouterr().out
    assert [f.name for f in sorted((run_dir / "checkpoints").iterdir())] == ["step-0000002", "step-0000006"]
    logged = {r["step"]: r["val"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "val" in r}
    plain = rescore(run_dir, cfg_scale=2.5, sample_steps=2, num_val=3, grids=tmp_path / "plain",
                    log=lambda line: None)
    guided_rows = rescore(run_dir, cfg_scale=2.5, sample_steps=2, num_val=3, guide_step=2, guide_weight=1.5,
                          grids=tmp_path / "guided", log=lambda line: None)
    assert [r["step"] for r in plain] == [2, 6] and [r["step"] for r in guided_rows] == [6]
    for rows, grids in (([plain[0]], "plain"), (guided_rows, "guided")):  # step 2 unguided, step 6 guided
        for r in rows:
            name = f"step-{r['step']:07d}.png"
            assert (tmp_path / grids / name).read_bytes() == (run_dir / "samples" / name).read_bytes()
            assert json.dumps(r["scores"], sort_keys=True) == json.dumps(logged[r["step"]], sort_keys=True)
    name = "step-0000006.png"  # unguided, step 6 draws otherwise
    assert (tmp_path / "plain" / name).read_bytes() != (run_dir / "samples" / name).read_bytes()
    (run_dir / "summary.json").unlink()  # stopped during its final validation: started again, it validates anew
    summary = train(cfg, progress=False)
    assert json.dumps(summary["ema_scores"], sort_keys=True) == json.dumps(logged[6], sort_keys=True)


@pytest.mark.parametrize("settings, expected", [
    (dict(guide_weight=2.0), "--guide-weight 2.0: it weighs validation's autoguidance; pass --guide-step too"),
    (dict(guide_step=3), "--guide-step 3: .* must be a multiple of --save-every 2 and below --steps 4"),
    (dict(guide_step=4), "--guide-step 4: .* below --steps 4"),
    (dict(guide_step=2, stage=1), "--guide-step 2: validation's autoguidance samples the embedded text-to-image"),
    (dict(guide_step=2, lora_rank=4), "--guide-step 2: validation's autoguidance"),
    (dict(guide_step=2, guide_weight=-1.0), "--guide-weight -1.0: must be >= 0"),
])
def test_bad_guide_flags_fail_with_one_line(settings, expected, tmp_path):
    with pytest.raises(UserError, match=expected) as error:
        replace(RECIPES[settings.get("stage", 2)], model="PixArt-pixel-tiny", route_end=2, steps=4, save_every=2,
                **settings, out=str(tmp_path))
    assert "\n" not in str(error.value)


def test_an_autoguided_arm_is_its_recipe_sampled_with_autoguidance():
    from pixart_fast.train.ablate import ARMS, AUTOGUIDED_CFG, stage2_config, step_flops

    arms = {a.name: a for a in ARMS}
    for base in ("default", "repa-truth-first"):
        plain, guided = (stage2_config(arms[name], 0, 900, 300, 8, {}) for name in (base, base + "-autoguided"))
        assert (guided.guide_step, guided.guide_weight, guided.cfg_scale) == (300, 1.0, AUTOGUIDED_CFG)
        assert replace(guided, guide_step=0, cfg_scale=plain.cfg_scale) == plain  # the same training
        assert step_flops(guided, 900) == step_flops(plain, 900)


def test_the_small_guide_config_guides_the_embedded_networks(tmp_path, reference_kernels):
    """PixArt-pixel-32-xs, trained on its own, guides a checkpoint of the stage-2 recipe's network."""
    ckpts = {}
    # the guide trains as the README says: its 2 blocks routed from block 0 to the default end (block 0)
    for name, routing in (("PixArt-pixel-32-pd", {}), ("PixArt-pixel-32-xs", dict(route_start=0, route_end=0))):
        cfg = replace(RECIPES[2], model=name, steps=1, batch_size=2, num_val=1, sample_steps=1, save_every=1,
                      sample_every=0, kernels="torch", t5_train_steps=0, out=str(tmp_path / name), **routing)
        ckpts[name] = train(cfg, progress=False)["checkpoint"]
    png = tmp_path / "s.png"
    assert sample_main(["--ckpt", ckpts["PixArt-pixel-32-pd"], "--prompt", "a red circle", "--out", str(png),
                        "--steps", "2", "--cfg-scale", "2.5", "--guide-ckpt", ckpts["PixArt-pixel-32-xs"]]) == 0
    assert png.exists()
