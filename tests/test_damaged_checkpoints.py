"""Checkpoints are verified before they are trusted: a damaged newest folder is named, skipped, and the run resumes
from the newest intact one, still bit-identical to a run that was never interrupted (docs/faults.md)."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pixart_fast import CheckpointDamaged, load_any
from pixart_fast.checkpoints import load_safetensors
from pixart_fast.files import MANIFEST, verify_manifest
from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES
from pixart_fast.train.run_folder import NoIntactCheckpoint

FLAGS = dict(model="PixArt-pixel-tiny", batch_size=4, log_every=1, save_every=2, num_val=2, sample_steps=2,
             kernels="torch", t5_train_steps=0, route_end=2)
STEPS = 6


def cfg(out, **kw):
    return replace(RECIPES[2], **{**FLAGS, "out": str(out), **kw})


def folder(out, step: int):
    return out / "stage2/checkpoints" / f"step-{step:07d}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """STEPS steps, never interrupted."""
    out = tmp_path_factory.mktemp("straight")
    train(cfg(out, steps=STEPS), progress=False)
    return out


@pytest.fixture
def stopped(tmp_path):
    """The same run stopped after step 4: checkpoints at steps 2 and 4."""
    train(cfg(tmp_path, steps=4), progress=False)
    return tmp_path


def resume_to_the_end(out, capsys) -> str:
    capsys.readouterr()
    train(cfg(out, steps=STEPS, resume="latest"), progress=False)
    return capsys.readouterr().out


def assert_bit_identical(a, b):
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_safetensors(folder(a, STEPS) / name), load_safetensors(folder(b, STEPS) / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def truncate(path, size: int = 1000):
    with open(path, "r+b") as f:
        f.truncate(size)


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the tensor data: the file still parses
    path.write_bytes(bytes(data))


def test_every_checkpoint_has_a_manifest_of_its_files(stopped):
    manifest = json.loads((folder(stopped, 4) / MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["ema.safetensors", "model.safetensors", "trainer.pt"]
    for name, entry in manifest.items():
        assert entry["bytes"] == (folder(stopped, 4) / name).stat().st_size
    assert verify_manifest(folder(stopped, 4)) == []


def test_truncated_newest_is_skipped_and_the_resume_stays_bit_identical(straight, stopped, capsys):
    model = folder(stopped, 4) / "model.safetensors"
    size = model.stat().st_size
    truncate(model)
    out = resume_to_the_end(stopped, capsys)
    assert f"--resume latest: step-0000004/model.safetensors: 1,000 bytes, manifest says {size:,}; skipping it" in out
    assert f"resumed from {folder(stopped, 2)} at step 2" in out
    assert_bit_identical(straight, stopped)


def test_one_flipped_byte_in_the_ema_is_caught(straight, stopped, capsys):
    flip_byte(folder(stopped, 4) / "ema.safetensors")
    out = resume_to_the_end(stopped, capsys)
    assert re.search(r"step-0000004/ema.safetensors: contents differ from the manifest \(CRC-32 \w+, manifest says "
                     r"\w+\): damaged since it was written; skipping it", out)
    assert f"resumed from {folder(stopped, 2)} at step 2" in out
    assert_bit_identical(straight, stopped)


def test_missing_trainer_state_is_skipped(stopped, capsys):
    (folder(stopped, 4) / "trainer.pt").unlink()
    out = resume_to_the_end(stopped, capsys)
    assert "step-0000004/trainer.pt: missing" in out and "skipping it" in out
    assert f"resumed from {folder(stopped, 2)} at step 2" in out


def test_all_damaged_fails_naming_them(stopped):
    truncate(folder(stopped, 2) / "trainer.pt")
    flip_byte(folder(stopped, 4) / "model.safetensors")
    with pytest.raises(NoIntactCheckpoint, match=r"no intact checkpoint .*all 2 are damaged \(step-0000004, "
                                                 r"step-0000002\)"):
        train(cfg(stopped, steps=STEPS, resume="latest"), progress=False)


def test_resume_dir_on_a_damaged_folder_fails_with_what_is_wrong(stopped):
    truncate(folder(stopped, 4) / "ema.safetensors")
    with pytest.raises(NoIntactCheckpoint, match=r"--resume .*step-0000004: damaged: step-0000004/ema.safetensors: "
                                                 r"1,000 bytes, manifest says"):
        train(cfg(stopped, steps=STEPS, resume=str(folder(stopped, 4))), progress=False)


def test_an_old_checkpoint_without_manifest_is_read_whole(straight, stopped, capsys):
    for step in (2, 4):
        (folder(stopped, step) / MANIFEST).unlink()
    truncate(folder(stopped, 4) / "trainer.pt")  # without a manifest, only reading it finds this
    out = resume_to_the_end(stopped, capsys)
    assert "step-0000004/trainer.pt: unreadable (" in out and "skipping it" in out
    assert f"resumed from {folder(stopped, 2)} at step 2" in out  # step 2: no manifest, read whole, intact
    assert_bit_identical(straight, stopped)


def test_the_command_line_exits_2_when_none_is_intact_and_0_when_one_is(stopped):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    cmd = [sys.executable, "-m", "pixart_fast.train", "--stage=2", *flags, f"--out={stopped}", "--resume=latest",
           "--steps=5"]
    truncate(folder(stopped, 4) / "model.safetensors")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step-0000004/model.safetensors: 1,000 bytes" in done.stdout + done.stderr
    for step in (2, 4, 5):
        truncate(folder(stopped, step) / "ema.safetensors", 10)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("error: --resume latest: no intact checkpoint")
    assert "Traceback" not in done.stderr


def test_init_and_load_any_name_a_damaged_file(stopped):
    ema = folder(stopped, 4) / "ema.safetensors"
    truncate(ema, 100)
    with pytest.raises(CheckpointDamaged, match=rf"{re.escape(str(ema))}: damaged or cut short \(100 bytes"):
        load_any(ema)
    with pytest.raises(CheckpointDamaged, match=re.escape(str(ema))):
        train(cfg(stopped / "elsewhere", steps=1, init=str(ema)), progress=False)
    pth = stopped / "official.pth"
    torch.save({"w": torch.ones(1000)}, pth)
    truncate(pth, 500)
    with pytest.raises(CheckpointDamaged, match=rf"{re.escape(str(pth))}: damaged or cut short \(500 bytes"):
        load_any(pth)
