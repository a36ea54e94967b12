"""The commands as users meet them: every --help names the command as typed and states each default once;
the sample grids (pixart_fast/grid.py) carry their captions, in `python -m pixart_fast.sample` and in the
trainer's validation grid."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pixart_fast import export, extract, plan, sample
from pixart_fast.checkpoints import save_safetensors
from pixart_fast.diffusion import Diffusion
from pixart_fast.grid import image_grid
from pixart_fast.kernels import aot
from pixart_fast.model import CONFIGS, PixArt
from pixart_fast.train import __main__ as train_cli
from pixart_fast.train.stages import STAGES
from pixart_fast.train.recipes import RECIPES


def help_text(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("main, prog", [
    (plan.main, "python -m pixart_fast.plan"),
    (sample.main, "python -m pixart_fast.sample"),
    (export.main, "python -m pixart_fast.export"),
    (extract.main, "python -m pixart_fast.extract"),
    (aot.main, "python -m pixart_fast.kernels.aot"),
    (train_cli.main, "python -m pixart_fast.train"),
])
def test_help_names_the_command_as_typed(main, prog, capsys):
    text = help_text(main, capsys)
    assert text.startswith(f"usage: {prog} "), text.splitlines()[0]
    assert ".py" not in text.splitlines()[0]


def test_trainer_help_states_each_default_once(capsys):
    text = help_text(train_cli.main, capsys)
    for line in text.splitlines():
        assert line.lower().count("default") <= 1, line
    for action in train_cli.parser()._actions:  # per option, not only per printed line
        assert (action.help or "").count("default") <= 1, action.help
    flat = " ".join(text.split())
    assert "(default: 0.03)" in flat  # the recipes' value, not "the stage's recipe"
    assert "(default: stage 1: 2000, stage 2: 3200, stage 3: 1000)" in flat
    assert "(default: stages 1 and 3: 20, stage 2: 50; paper: 1000)" in flat


def grey(img) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.int16)


def tiles(n, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for _ in range(n)]


def test_grid_without_captions_is_the_tiles():
    grid = image_grid(tiles(5), cols=4, scale=4)
    assert grid.size == (4 * 34 * 4, 2 * 34 * 4)


def test_grid_captions_are_drawn_under_their_tiles():
    images = tiles(5)
    long = "a red circle at top left, a small blue square at center and a large green diamond at right"
    plain = image_grid(images, cols=4, scale=4)
    short = image_grid(images, ["a red circle"] * 5, cols=4, scale=4)
    wrapped = image_grid(images, [long] * 5, cols=4, scale=4)
    assert short.width == wrapped.width == plain.width  # wrapped to the tile width, never wider
    assert plain.height < short.height < wrapped.height  # one line, then several
    # the tiles are the same pixels; the caption band under each holds text (not one flat colour)
    assert short.crop((0, 0, plain.width, 136)).tobytes() == plain.crop((0, 0, plain.width, 136)).tobytes()
    band = grey(short.crop((0, 136, 136, short.height // 2)))
    assert band.max() - band.min() > 100
    # in tile order: only the second tile has a caption, so only the band under it is not blank
    one = image_grid(images, [None, "a blue square", None, None, None], cols=4, scale=4)
    for col in range(4):
        cell = grey(one.crop((col * 136, 136, (col + 1) * 136, 136 + 10)))
        assert (cell.max() - cell.min() > 100) == (col == 1), col
    with pytest.raises(ValueError, match="2 captions for 5 images"):
        image_grid(images, ["a", "b"])


def test_grid_wraps_a_word_wider_than_the_tile():
    grid = image_grid(tiles(1, 8, 8), ["abcdefghijklmnopqrstuvwxyz" * 2], scale=1)
    assert grid.width == 10 and grid.height > 10 + 4 * 10


def test_sample_command_writes_a_captioned_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # kernels "auto" on a CPU: PyTorch, not the (slow) interpreter
    torch.manual_seed(0)
    model = PixArt(CONFIGS["PixArt-pixel-tiny"])
    ckpt = tmp_path / "ema.safetensors"
    save_safetensors(model.state_dict(), ckpt, {"model": "PixArt-pixel-tiny"})
    out = tmp_path / "grid.png"
    prompts = ["a red circle at top left", "a blue square"]
    assert sample.main(["--ckpt", str(ckpt), "--prompt", prompts[0], "--prompt", prompts[1], "--steps", "2",
                        "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    side = (CONFIGS["PixArt-pixel-tiny"].input_size + 2) * 4
    with Image.open(out) as img:
        assert img.width == 2 * side and img.height > side  # the tiles and a caption band under them


@pytest.mark.parametrize("stage", [1, 3])
def test_validation_grid_pairs_sample_and_truth_with_captions(stage, tmp_path):
    cfg = replace(RECIPES[stage], model="PixArtMS-pixel-tiny" if stage == 3 else "PixArt-pixel-tiny", num_val=2,
                  sample_steps=1, kernels="torch", t5_train_steps=0)
    torch.manual_seed(0)
    ema = STAGES[stage].build_model(cfg).eval()
    data = STAGES[stage].data(cfg, ema)
    diffusion = Diffusion(learn_sigma=ema.config.learn_sigma)
    png = tmp_path / "grid.png"
    scores = data.evaluate(ema, STAGES[stage], cfg, diffusion, torch.device("cpu"), png)
    again = data.evaluate(ema, STAGES[stage], cfg, diffusion, torch.device("cpu"), None)  # the grid changes no score
    assert repr(scores) == repr(again)  # (repr: a score of nan equals itself)
    # one tile per held-out sample: (sample, 2-px gap, truth) + a 1-px border, x4; stage 3: its first two buckets
    h, w = (16, 16) if stage == 1 else (64, 80)
    cell_h, cell_w = (h + 2) * 4, (w + 2 + w + 2) * 4
    with Image.open(png) as img:
        assert img.width == 2 * cell_w and img.height > cell_h
        band = grey(img.crop((0, cell_h, img.width, img.height)))
    assert band.max() - band.min() > 100  # caption text under the tiles
