"""The trainer end to end on the embedded data: every stage runs, loss falls, resume is exact, and stage 2
starts from stage 1 through re-parameterization."""
import json
from dataclasses import replace

import pytest
import torch

from pixart_fast.checkpoints import load_safetensors
from pixart_fast.cli import UserError
from pixart_fast.diffusion import Diffusion
from pixart_fast.model import CONFIGS, PixArt, reparameterize
from pixart_fast.train.__main__ import config_from_args
from pixart_fast.train.loop import train
from pixart_fast.train.stages import STAGES
from pixart_fast.train.recipes import RECIPES

FAST = dict(batch_size=4, log_every=1, save_every=2, num_val=3, sample_steps=2, kernels="torch", t5_train_steps=0,
            route_end=2)


def tiny(stage, tmp_path, **kw):
    """The stage's recipe with a tiny model and a fast schedule; kw overrides."""
    model = "PixArtMS-pixel-tiny" if stage == 3 else "PixArt-pixel-tiny"
    return replace(RECIPES[stage], **{"model": model, "out": str(tmp_path), **FAST, **kw})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_runs_end_to_end(stage, tmp_path):
    summary = train(tiny(stage, tmp_path, steps=3), progress=False)
    run = tmp_path / f"stage{stage}"
    assert 0.0 <= summary["ema_alignment_accuracy"] <= 1.0
    assert (run / "checkpoints" / "step-0000003" / "ema.safetensors").exists()
    assert (run / "samples" / "step-0000003.png").exists()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def assert_resume_is_bit_identical(cfg, tmp_path):
    """cfg trained straight to step 4, and to step 2 then resumed to 4: the same weights and EMA, bit for bit. The
    learning rate is held (--lr-decay 0): with a decay over a fraction of --steps, a 2-step run's rates are not a
    4-step run's first two (a run stopped by a signal or a kill keeps its --steps: tests/test_kill.py)."""
    cfg = replace(cfg, lr_decay=0.0)
    train(replace(cfg, out=str(tmp_path / "a"), steps=4), progress=False)
    first = replace(cfg, out=str(tmp_path / "b"), steps=2)
    train(first, progress=False)
    train(replace(first, steps=4, resume="latest"), progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_safetensors(tmp_path / "a/stage2/checkpoints/step-0000004" / name)
        b = load_safetensors(tmp_path / "b/stage2/checkpoints/step-0000004" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_is_bit_identical(tmp_path):
    assert_resume_is_bit_identical(tiny(2, tmp_path), tmp_path)


def test_input_perturbation_is_drawn_per_step_and_resumes_bit_identically(tmp_path):
    cfg = tiny(2, tmp_path, input_perturbation=0.1)
    assert_resume_is_bit_identical(cfg, tmp_path)
    train(replace(cfg, out=str(tmp_path / "off"), steps=4, input_perturbation=0.0), progress=False)
    on, off = (load_safetensors(tmp_path / f"{run}/stage2/checkpoints/step-0000004/model.safetensors")
               for run in ("a", "off"))
    assert any(not torch.equal(on[k], off[k]) for k in on)  # the perturbation reached the weights


def test_the_stage2_recipes_network_trains_routed_resumes_and_samples(tmp_path):
    from pixart_fast.sample import main as sample_main

    cfg = replace(tiny(2, tmp_path, batch_size=2, sample_every=0, route_end=RECIPES[2].route_end),
                  model=RECIPES[2].model)
    assert CONFIGS[cfg.model].pixel_decoder
    assert cfg.routing(0, CONFIGS[cfg.model].depth) == (cfg.route_ratio, (1, 4))  # routed past 1-3
    assert_resume_is_bit_identical(cfg, tmp_path)
    ckpt = tmp_path / "a/stage2/checkpoints/step-0000004/ema.safetensors"
    assert load_safetensors(ckpt)["pixel_decoder.conv3.weight"].abs().sum() > 0  # it left zero: the decoder trained
    out = tmp_path / "s.png"
    assert sample_main(["--ckpt", str(ckpt), "--prompt", "a red circle", "--out", str(out), "--steps", "2"]) == 0
    assert out.exists()
    with pytest.raises(UserError, match="--mask-ratio 0.5 with --model PixArt-pixel-32-pd"):
        replace(cfg, mask_ratio=0.5)
    with pytest.raises(UserError, match="without a pixel decoder"):
        train(replace(tiny(1, tmp_path / "s1", steps=1), model="PixArt-pixel-32-pd"), progress=False)


def test_a_text_encoder_trained_on_captions_is_kept_and_loaded_where_its_checkpoint_goes(tmp_path, capsys):
    """--t5-train-steps: the run trains its embedded T5 first and says what it cost; each checkpoint keeps the
    trained weights (in its manifest), and sampling, resuming and the next stage load them rather than train again.
    A checkpoint without them (written before they were kept) rebuilds the encoder from what it records: the same
    name, hence cache key, and on this machine the same features."""
    from pixart_fast.checkpoints import TEXT_ENCODER_FILE, save_safetensors
    from pixart_fast.files import verify_manifest, write_manifest
    from pixart_fast.sample import load_for_sampling
    from pixart_fast.text import TextEncoder, binding_flops

    cfg = tiny(2, tmp_path, steps=2, t5_train_steps=4)
    summary = train(cfg, progress=False)
    assert "embedded T5 trained on caption text: 4 steps" in capsys.readouterr().out
    length = CONFIGS[cfg.model].max_tokens
    assert summary["text_encoder_seconds"] > 0 and summary["text_encoder_flops"] == binding_flops(
        TextEncoder.embedded(tokenizer="word").model.config, 4, length)
    ckpt = tmp_path / "stage2/checkpoints/step-0000002"
    assert TEXT_ENCODER_FILE in json.loads((ckpt / "manifest.json").read_text())["files"]
    trained = TextEncoder.embedded(tokenizer="word", max_length=length, locality=cfg.t5_locality, train_steps=4)
    captions = ["a small red circle at top left and a large blue square at center"]
    untrained = TextEncoder.embedded(tokenizer="word", max_length=length, locality=cfg.t5_locality)
    assert not torch.equal(trained.encode(captions)[0], untrained.encode(captions)[0])
    stored = load_safetensors(ckpt / TEXT_ENCODER_FILE)
    assert all(torch.equal(stored[k], v) for k, v in trained.model.state_dict().items())

    # other weights in the file: what sampling and a resume read is the file, not a second training
    changed = {k: v * 1.5 for k, v in stored.items()}
    save_safetensors(changed, ckpt / TEXT_ENCODER_FILE)
    write_manifest(ckpt)
    _, text, _ = load_for_sampling(ckpt)
    assert text.name == trained.name and "trained4" in text.name
    assert not torch.equal(text.encode(captions)[0], trained.encode(captions)[0])
    assert all(torch.equal(changed[k], v) for k, v in text.model.state_dict().items())
    train(replace(cfg, steps=3, resume="latest"), progress=False)
    assert f"4 steps, {summary['text_encoder_flops']:.3g} FLOPs, its weights from {ckpt}" in capsys.readouterr().out
    resumed = load_safetensors(tmp_path / "stage2/checkpoints/step-0000003" / TEXT_ENCODER_FILE)
    assert all(torch.equal(changed[k], v) for k, v in resumed.items())

    # a resume that asks for another encoder trains it, and keeps that one
    train(replace(cfg, steps=4, resume="latest", t5_train_steps=5), progress=False)
    assert "embedded T5 trained on caption text: 5 steps" in capsys.readouterr().out
    other = load_safetensors(tmp_path / "stage2/checkpoints/step-0000004" / TEXT_ENCODER_FILE)
    five = TextEncoder.embedded(tokenizer="word", max_length=length, locality=cfg.t5_locality, train_steps=5)
    assert all(torch.equal(other[k], v) for k, v in five.model.state_dict().items())

    # the next stage, started from this one's weights, takes the encoder they were trained with
    train(tiny(3, tmp_path, steps=1, t5_train_steps=5), progress=False)
    assert "5 steps" in (log := capsys.readouterr().out) and "its weights from" in log and "stage2" in log
    third = load_safetensors(tmp_path / "stage3/checkpoints/step-0000001" / TEXT_ENCODER_FILE)
    assert all(torch.equal(other[k], v) for k, v in third.items())

    (ckpt / TEXT_ENCODER_FILE).unlink()  # as a checkpoint written before the weights were kept
    write_manifest(ckpt)
    assert verify_manifest(ckpt) == []
    _, text, _ = load_for_sampling(ckpt)
    assert text.name == trained.name and torch.equal(text.encode(captions)[0], trained.encode(captions)[0])


def test_stage2_starts_from_stage1_through_reparameterization(tmp_path):
    train(tiny(1, tmp_path, steps=2), progress=False)
    cfg = tiny(2, tmp_path, steps=2)
    torch.manual_seed(0)
    model = STAGES[2].build_model(cfg)
    assert "re-parameterization" in STAGES[2].initialise(model, STAGES[2].init_source(cfg), cfg)
    dit_ema = load_safetensors(tmp_path / "stage1/checkpoints/step-0000002/ema.safetensors")
    expected = reparameterize(dit_ema, model.config, seed=cfg.seed)
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_stage3_starts_from_stage2_with_fresh_micro_condition_embedders(tmp_path):
    train(tiny(2, tmp_path, steps=2), progress=False)
    cfg = tiny(3, tmp_path, steps=2)
    model = STAGES[3].build_model(cfg)
    assert "micro-condition embedders new" in STAGES[3].initialise(model, STAGES[3].init_source(cfg), cfg)
    stage2 = load_safetensors(tmp_path / "stage2/checkpoints/step-0000002/ema.safetensors")
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in stage2.items())
    assert set(got) - set(stage2) == {k for k in got if k.startswith(("csize_embedder.", "ar_embedder."))}


def test_overfitting_one_batch_lowers_the_loss():
    torch.manual_seed(0)
    model = PixArt(replace(CONFIGS["PixArt-pixel-tiny"], class_dropout_prob=0.0), kernels="torch")
    diffusion = Diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    y, mask = torch.randn(4, 120, 64, generator=g), torch.ones(4, 120, dtype=torch.bool)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = diffusion.training_losses(lambda xt, tt: model(xt, tt, y, mask), x0, t, noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_cli_overrides_the_recipe():
    cfg = config_from_args(["--stage", "3", "--steps", "7", "--lr", "2e-5", "--recompute", "selective"])
    assert (cfg.stage, cfg.steps, cfg.lr, cfg.recompute) == (3, 7, 2e-5, "selective")
    assert cfg.model == RECIPES[3].model
    with pytest.raises(SystemExit):
        config_from_args(["--stage", "4"])


def test_the_learning_rate_warms_up_holds_and_decays(tmp_path):
    train(tiny(2, tmp_path, steps=6, warmup=2, lr_decay=0.5, sample_every=0), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "stage2/metrics.jsonl").read_text().splitlines()]
    # each line logs the rate of the next step: steps 0-5 run at 1/2, 1, 1, 1, 2/3, 1/3 of --lr, then 0
    expected = [1, 1, 1, 2 / 3, 1 / 3, 0]
    assert [m["lr"] for m in lines if "lr" in m] == pytest.approx([RECIPES[2].lr * f for f in expected])


@pytest.mark.parametrize("field, value, match", [
    ("precision", "fp8", "precision"), ("model", "PixArt-huge", "unknown model"), ("steps", 0, "steps"),
])
def test_bad_settings_are_named(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        train(tiny(2, tmp_path, **{"steps": 1, field: value}), progress=False)


def test_stage1_refuses_a_pixart_init(tmp_path):
    path = tmp_path / "pix.safetensors"
    from pixart_fast.checkpoints import save_safetensors
    save_safetensors(PixArt(CONFIGS["PixArt-pixel-tiny"]).state_dict(), path)
    with pytest.raises(ValueError, match="class-conditional"):
        train(tiny(1, tmp_path, steps=1, init=str(path)), progress=False)


def test_the_ablation_command_writes_its_table_and_plot(tmp_path):
    from pixart_fast.flops import flops_per_image
    from pixart_fast.train.ablate import ablate

    # blocks 0 to the default end (block 0) for every arm: the recipe's blocks 1-3 need four
    tiny = dict(model="PixArt-pixel-tiny", batch_size=2, kernels="torch", sample_steps=2, route_start=0,
                route_end=0, t5_train_steps=0)
    table = ablate(tmp_path, arms=("paper", "default", "mask"), seeds=2, steps=4, stage1_steps=2, eval_every=2,
                   num_val=2, fixed=(("colour", 0.0),), progress=False, **tiny)
    assert set(table) == {"paper", "default", "mask"}
    saved = json.loads((tmp_path / "ablation.json").read_text())
    full = flops_per_image(CONFIGS["PixArt-pixel-tiny"], vae_downsample=1)
    masked = flops_per_image(CONFIGS["PixArt-pixel-tiny"], vae_downsample=1, mask_ratio=0.5)
    # the default routes block 0 of the two (the recipe's ratio); the other arms run unrouted
    routed = flops_per_image(CONFIGS["PixArt-pixel-tiny"], vae_downsample=1, route_ratio=RECIPES[2].route_ratio,
                             route_blocks=(0, 1))
    for seed in ("0", "1"):
        default, mask, paper = (saved["runs"][arm][seed] for arm in ("default", "mask", "paper"))
        assert [e["step"] for e in default["evaluated"]] == [2, 4]
        assert [e["flops"] for e in default["evaluated"]] == [2 * 2 * routed, 4 * 2 * routed] and routed < full
        # the mask arm: an eighth of 4 steps rounds to 0 unmasked steps, so every step runs masked, for less
        assert mask["evaluated"][-1]["flops"] == 4 * 2 * masked < 4 * 2 * full
        assert paper["stage1"]["flops"] == 2 * 2 * flops_per_image(CONFIGS["PixArt-pixel-tiny"], vae_downsample=1,
                                                                   class_conditional=True)
        assert default["stage1"]["flops"] == 0 and all(e["seconds"] > 0 for e in default["evaluated"])
    # colour >= 0 is reached at the first evaluation by every seed: its cost is that step's
    bar = table["default"]["bars"][0]
    assert bar["stage2"]["reached"] == 2 and bar["stage2"]["flops"]["mean"] == 2 * 2 * routed
    paper_bar = table["paper"]["bars"][0]
    assert paper_bar["with_stage1"]["flops"]["mean"] == 2 * 2 * full + saved["runs"]["paper"]["0"]["stage1"]["flops"]
    assert paper_bar["stage2"]["flops"]["mean"] == 2 * 2 * full
    md = (tmp_path / "ablation.md").read_text()
    assert "| paper (stage 1 counted) | colour >= 0 |" in md and "| default | position >=" in md
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    # a second call trains nothing again: the finished runs are read back
    again = ablate(tmp_path, arms=("default",), seeds=2, steps=4, eval_every=2, num_val=2, fixed=(("colour", 0.0),),
                   progress=False, **tiny)
    assert again["default"]["bars"][0] == bar
    with pytest.raises(UserError, match="holds a run of 4 steps, not 6"):  # never trains a finished run on
        ablate(tmp_path, arms=("default",), seeds=1, steps=6, eval_every=2, num_val=2, progress=False, **tiny)


def test_weights_without_a_pixel_decoder_seed_a_model_with_one(tmp_path):
    """Stage 1's DiT (through re-parameterization) and a PixArt without a decoder both load into a model with one;
    the fresh decoder's last convolution is zero, so the seeded model predicts what the weights did."""
    from pixart_fast.checkpoints import load_into, save_safetensors
    from pixart_fast.model import DiT

    cfg = CONFIGS["PixArt-pixel-tiny"]
    torch.manual_seed(0)
    plain = PixArt(cfg, kernels="torch").eval()
    torch.nn.init.normal_(plain.final_layer.linear.weight, std=0.1)
    save_safetensors(plain.state_dict(), tmp_path / "plain.safetensors")
    save_safetensors(DiT(cfg).state_dict(), tmp_path / "dit.safetensors")
    said = load_into(PixArt(replace(cfg, pixel_decoder=8), kernels="torch"), tmp_path / "dit.safetensors")
    assert "re-parameterization" in said and "(pixel decoder new)" in said
    seeded = PixArt(replace(cfg, pixel_decoder=8), kernels="torch").eval()
    assert "(pixel decoder new)" in load_into(seeded, tmp_path / "plain.safetensors")
    x, y = torch.randn(2, 3, 16, 16), torch.randn(2, cfg.max_tokens, cfg.caption_channels)
    with torch.no_grad():
        torch.testing.assert_close(seeded(x, torch.tensor([3, 700]), y), plain(x, torch.tensor([3, 700]), y),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_scene_objects_set_the_training_scenes_and_the_held_out_ones_stay_one_to_three(stage):
    cfg = replace(RECIPES[stage], scene_objects="4")
    train_set = STAGES[stage].embedded_set(cfg, 32, 0, "train", 20)
    held_out = STAGES[stage].embedded_set(cfg, 32, 0, "val", 60)
    assert {len(train_set[i]["truth"].objects) for i in range(20)} == {4}
    assert {len(held_out[i]["truth"].objects) for i in range(60)} == {1, 2, 3}
    assert config_from_args(["--stage", str(stage), "--scene-objects", "1,3,4,4"]).objects == (1, 3, 4, 4)
