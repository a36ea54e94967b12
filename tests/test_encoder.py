"""The embedded data's alignment encoder (`python -m pixart_fast.train.encoder`): a short run learns, writes a
DINOv2 folder that --repa-encoder loads, counts its FLOPs as FlopCounterMode does, and refuses a used folder."""
import json
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pixart_fast.align import FrozenEncoder
from pixart_fast.cli import UserError
from pixart_fast.files import verify_manifest
from pixart_fast.train.encoder import EncoderConfig, LabelledEncoder, main, train_encoder, training_flops
from pixart_fast.train.recipes import RECIPES

TINY = dict(hidden_size=32, layers=1, heads=2, batch_size=16, num_val=64)


def test_a_short_run_learns_colour_and_writes_a_folder_repa_loads(tmp_path):
    out = tmp_path / "encoder"
    summary = train_encoder(EncoderConfig(out=str(out), steps=200, lr=1e-2, **TINY))
    val = summary["val"]
    assert val["colour"] >= val["colour_chance"] + 0.4  # 200 steps: colour is learned, shape not yet
    assert verify_manifest(out) == []
    encoder = FrozenEncoder(str(out))
    features = encoder(torch.rand(2, 3, 32, 32) * 2 - 1, (8, 8))
    assert features.shape == (2, 64, 32) and torch.isfinite(features).all()
    replace(RECIPES[2], repa_depth=4, repa_encoder=str(out))  # the trainer's checks accept it


def test_the_training_flops_match_flop_counter_mode():
    cfg = EncoderConfig(out="unused", steps=5, **TINY)
    with torch.device("meta"):
        net = LabelledEncoder(cfg)
        images = torch.rand(cfg.batch_size, 3, 32, 32)
        with FlopCounterMode(display=False) as counter:
            sum(out.float().square().mean() for out in net(images).values()).backward()
    # autograd skips the patch embedding's input gradient: 64 patches x (3 x 4 x 4) inputs x the width, per image
    skipped = 2 * 64 * 48 * cfg.hidden_size * cfg.batch_size
    assert counter.get_total_flops() * cfg.steps == training_flops(cfg, net.config) - skipped * cfg.steps


@pytest.mark.parametrize("argv, expected", [
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--hidden-size", "30", "--heads", "4"], "does not split into --heads 4"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
])
def test_bad_settings_fail_with_one_line(argv, expected, tmp_path):
    with pytest.raises(UserError, match=expected):
        main(["--out", str(tmp_path / "e"), *argv])


def test_a_folder_in_use_is_refused(tmp_path):
    (tmp_path / "old.txt").write_text("kept")
    with pytest.raises(UserError, match="exists and is not empty"):
        main(["--out", str(tmp_path), "--steps", "1"])
    assert (tmp_path / "old.txt").read_text() == "kept"


def test_the_ablations_repa_arm_aligns_to_its_seeds_encoder_and_counts_its_cost(tmp_path):
    from pixart_fast.train.ablate import ablate

    for seed in (0, 1):  # finished encoders in the arm's folders: the ablation reads them back, trains no other
        train_encoder(EncoderConfig(out=str(tmp_path / "repa" / f"seed{seed}" / "encoder"), steps=2, seed=seed, **TINY),
                      progress=False)
    tiny = dict(model="PixArt-pixel-tiny", batch_size=2, kernels="torch", sample_steps=2, route_start=0,
                route_end=0, t5_train_steps=0)
    table = ablate(tmp_path, arms=("repa",), seeds=2, steps=2, eval_every=2, num_val=2, fixed=(("colour", 0.0),),
                   progress=False, **tiny)
    saved = json.loads((tmp_path / "ablation.json").read_text())
    for seed in ("0", "1"):
        folder = tmp_path / "repa" / f"seed{seed}"
        encoder = json.loads((folder / "encoder" / "encoder.json").read_text())
        assert saved["runs"]["repa"][seed]["stage1"] == {"flops": encoder["train_flops"],
                                                         "seconds": encoder["train_seconds"]}
        logged = [json.loads(line) for line in (folder / "stage2" / "metrics.jsonl").read_text().splitlines()]
        assert all("align" in r for r in logged if "loss" in r)  # stage 2 trained with the alignment loss
    bar = table["repa"]["bars"][0]
    assert bar["with_stage1"]["flops"]["mean"] > bar["stage2"]["flops"]["mean"]
    assert "| repa (the encoder counted) | colour >= 0 |" in (tmp_path / "ablation.md").read_text()
