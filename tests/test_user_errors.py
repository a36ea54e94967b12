"""A user's mistake is one clear line and exit 2, and nothing a user does loses a run: bad flag values, missing
or damaged files, a busy output folder, a full disk, a finished run started again, and a checkpoint replaced
while the process is killed."""
import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pixart_fast.cli import UserError, run
from pixart_fast.files import write_manifest
from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES, TrainConfig
from pixart_fast.train.run_folder import LOCK, claimed, recover_leftovers

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
FAST = dict(model="PixArt-pixel-tiny", batch_size=2, num_val=2, sample_steps=2, sample_every=0, kernels="torch",
            t5_train_steps=0, route_end=2)


def tiny(out, **kw) -> TrainConfig:
    return replace(RECIPES[2], **{**FAST, "out": str(out), **kw})


def command(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    for text in expected:
        assert text in last, last


# ----------------------------------------------------------------------------------------------------------
# Flags: checked once, before anything is written
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, expected, env", [
    (["--keep", "-1"], "--keep -1: must be >= 0", None),
    (["--save-every", "0"], "--save-every 0: must be >= 1", None),
    (["--log-every", "0"], "--log-every 0: must be >= 1", None),
    (["--lr", "-1"], "--lr -1.0: must be > 0", None),
    (["--lr", "nan"], "--lr nan: must be a finite number", None),
    (["--caption-dropout", "1.5"], "--caption-dropout 1.5: must be >= 0 and <= 1", None),
    (["--batch-size", "3"], "--batch-size 3 does not split over 2 processes", {"WORLD_SIZE": "2"}),
    (["--init", "no/such/weights.pth"], "--init no/such/weights.pth: no such file or folder", None),
    (["--t5-train-steps", "10", "--tokenizer", "byte"], "--t5-train-steps 10 with --tokenizer byte", None),
    (["--scene-objects", "1,5"], "--scene-objects 1,5: pass object counts from 1 to 4", None),
    (["--scene-objects", "1,4", "--tokenizer", "byte", "--t5-train-steps", "0"],
     "--scene-objects 1,4 with --tokenizer byte", None),
    (["--stage", "1", "--scene-objects", "4"], "--scene-objects 4: it sets the embedded caption scenes", None),
])
def test_a_bad_flag_is_one_line_exit_2_and_writes_nothing(tmp_path, flags, expected, env):
    out = tmp_path / "runs"
    done = command("pixart_fast.train", "--model", "PixArt-pixel-tiny", "--route-end", "2", "--steps", "2", "--out",
                   str(out), *flags, env=env)
    assert_one_line_error(done, "error: " + expected)
    assert not out.exists()


def test_a_bad_value_is_refused_by_the_python_api_too(tmp_path):
    with pytest.raises(UserError, match="--keep -1: must be >= 0"):
        tiny(tmp_path, keep=-1)
    with pytest.raises(UserError, match="--precision fp8: unknown precision; choose one of auto, fp32, bf16, fp16"):
        tiny(tmp_path, precision="fp8")


def test_debug_shows_the_traceback(tmp_path):
    done = command("pixart_fast.train", "--keep", "-1", "--out", str(tmp_path), "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "UserError: --keep -1" in done.stderr
    done = command("pixart_fast.train", "--keep", "-1", "--out", str(tmp_path), env={"PIXART_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
])
def test_a_full_disk_is_said_in_words(error, capsys):
    def main(argv):
        try:
            raise error
        except Exception as e:
            raise RuntimeError("while saving") from e  # however deep the library wrapped it

    assert run(main, []) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on the device") and "free some space" in err
    assert len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# Files: missing, damaged, or not local
# ----------------------------------------------------------------------------------------------------------


def test_sample_names_a_missing_checkpoint_a_hub_name_and_an_out_folder_before_sampling(tmp_path):
    assert_one_line_error(command("pixart_fast.sample", "--ckpt", str(tmp_path / "nope.safetensors"), "--prompt", "x"),
                          f"--ckpt {tmp_path / 'nope.safetensors'}: no such file or folder")
    ckpt = ROOT / "README.md"  # exists: the checks below come before anything is loaded
    done = command("pixart_fast.sample", "--ckpt", str(ckpt), "--prompt", "x", "--vae", "stabilityai/sd-vae-ft-ema")
    assert_one_line_error(done, "--vae stabilityai/sd-vae-ft-ema: no such file or folder", "nothing is downloaded")
    done = command("pixart_fast.sample", "--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "no/x.png"))
    assert_one_line_error(done, f"--out {tmp_path / 'no/x.png'}: the folder {tmp_path / 'no'} does not exist")


def test_a_damaged_pth_is_called_damaged_and_pickled_code_refused(tmp_path):
    torch.save({"w": torch.ones(100)}, tmp_path / "good.pth")
    data = bytearray((tmp_path / "good.pth").read_bytes())
    data[60:160] = bytes(100)
    (tmp_path / "damaged.pth").write_bytes(data)
    done = command("pixart_fast.sample", "--ckpt", str(tmp_path / "damaged.pth"), "--prompt", "x", "--model",
                   "PixArt-pixel-tiny", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(done, "damaged or cut short")
    assert "pickled code" not in done.stderr


# ----------------------------------------------------------------------------------------------------------
# The run folder: one run at a time, and nothing lost
# ----------------------------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_fails_at_once_naming_the_first(tmp_path):
    run_dir = tmp_path / "stage2"
    with claimed(run_dir):
        holder = (run_dir / LOCK).read_text()
        assert f"pid {os.getpid()} on " in holder
        done = command("pixart_fast.train", "--model", "PixArt-pixel-tiny", "--route-end", "2", "--steps", "2", "--out",
                       str(tmp_path))
        assert_one_line_error(done, f"{run_dir} is in use by another run (pid {os.getpid()} on ")
    assert not (run_dir / LOCK).exists()


def test_a_dead_runs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "stage2"
    run_dir.mkdir()
    (run_dir / LOCK).write_text("pid 999999 on elsewhere, since 2026-01-01 00:00:00: python -m pixart_fast.train\n")
    with claimed(run_dir):  # no process holds it: the system released it when its holder died
        assert f"pid {os.getpid()}" in (run_dir / LOCK).read_text()


def test_a_run_that_fails_before_writing_leaves_no_folder_but_keeps_one_it_found(tmp_path):
    with pytest.raises(RuntimeError):
        with claimed(tmp_path / "a" / "stage2"):
            raise RuntimeError("failed during set-up")
    assert not (tmp_path / "a").exists()
    (tmp_path / "b" / "stage2").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with claimed(tmp_path / "b" / "stage2"):
            raise RuntimeError("failed during set-up")
    assert (tmp_path / "b" / "stage2").is_dir() and not any((tmp_path / "b" / "stage2").iterdir())


def checkpoints(out: Path) -> Path:
    return out / "stage2" / "checkpoints"


def test_a_kill_between_the_renames_of_a_replaced_checkpoint_keeps_it(tmp_path, capsys):
    """The state a kill leaves when a save of step 4 (saved before) has moved the old folder aside and not yet
    renamed the new one: the complete new folder is put in place, and the run resumes from step 4."""
    train(tiny(tmp_path, steps=4, save_every=2, keep=1), progress=False)
    ckpts = checkpoints(tmp_path)
    os.replace(ckpts / "step-0000004", ckpts / "step-0000004.tmp")
    (ckpts / "step-0000004.old.tmp").mkdir()
    capsys.readouterr()
    summary = train(tiny(tmp_path, steps=6, save_every=2, keep=1, resume="latest"), progress=False)
    out = capsys.readouterr().out
    assert f"{ckpts / 'step-0000004'}: completed by a save that was interrupted before its last rename" in out
    assert f"resumed from {ckpts / 'step-0000004'} at step 4" in out and "starting a new run" not in out
    assert summary["steps"] == 6 and sorted(p.name for p in ckpts.iterdir()) == ["step-0000006"]


def test_the_replaced_copy_is_put_back_when_the_new_one_is_incomplete(tmp_path, capsys):
    train(tiny(tmp_path, steps=2), progress=False)
    ckpts = checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in (ckpts / "step-0000002").iterdir()}
    os.replace(ckpts / "step-0000002", ckpts / "step-0000002.replaced.tmp")
    shutil.copytree(ckpts / "step-0000002.replaced.tmp", ckpts / "step-0000002.tmp")
    (ckpts / "step-0000002.tmp" / "manifest.json").unlink()  # killed before its manifest: incomplete
    recover_leftovers(tmp_path / "stage2")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"]
    assert {p.name: p.read_bytes() for p in (ckpts / "step-0000002").iterdir()} == before


def test_saving_a_step_again_replaces_it_and_leaves_no_leftovers(tmp_path):
    train(tiny(tmp_path, steps=4, save_every=2), progress=False)
    ckpts = checkpoints(tmp_path)
    shutil.rmtree(ckpts / "step-0000004")
    train(tiny(tmp_path, steps=4, save_every=2, resume=str(ckpts / "step-0000002")), progress=False)
    train(tiny(tmp_path, steps=4, save_every=2, resume=str(ckpts / "step-0000002")), progress=False)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004"]


def test_a_finished_run_started_again_changes_nothing(tmp_path):
    train(tiny(tmp_path, steps=3), progress=False)
    summary = tmp_path / "stage2" / "summary.json"
    written, ckpts = summary.read_bytes(), sorted(checkpoints(tmp_path).iterdir())
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    assert train(tiny(tmp_path, steps=3, resume="latest"), progress=False) == json.loads(written)
    assert summary.read_bytes() == written
    assert [p.stat().st_mtime_ns for p in sorted(checkpoints(tmp_path).iterdir())] == mtimes  # not saved again
    done = command("pixart_fast.train", *[f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()], "--steps=2",
                   f"--out={tmp_path}", "--resume=latest")
    assert_one_line_error(done, "--steps 2, but the run is already at step 3", "pass --steps 3 or more")
    assert summary.read_bytes() == written


def test_a_resumed_runs_training_time_counts_every_process(tmp_path):
    train(tiny(tmp_path, steps=2), progress=False)
    folder = checkpoints(tmp_path) / "step-0000002"
    state = torch.load(folder / "trainer.pt", weights_only=True)
    torch.save({**state, "train_seconds": 1000.0}, folder / "trainer.pt")  # as if the first process ran 1000 s
    write_manifest(folder)
    summary = train(tiny(tmp_path, steps=4, resume="latest"), progress=False)
    seconds = torch.load(checkpoints(tmp_path) / "step-0000004" / "trainer.pt", weights_only=True)["train_seconds"]
    assert 1000 < seconds < 1000 + 60 and summary["train_seconds"] == round(seconds, 1)


def test_a_checkpoint_from_before_a_setting_existed_resumes_without_a_warning(tmp_path, capsys):
    unrouted = dict(route_ratio=0.0)  # the settings' field defaults, which an older checkpoint ran at
    train(tiny(tmp_path, steps=2, **unrouted), progress=False)
    folder = checkpoints(tmp_path) / "step-0000002"
    state = torch.load(folder / "trainer.pt", weights_only=True)
    del state["config"]["mask_ratio"], state["config"]["route_ratio"]  # as an older trainer wrote it
    torch.save(state, folder / "trainer.pt")
    write_manifest(folder)
    capsys.readouterr()
    train(tiny(tmp_path, steps=3, resume="latest", **unrouted), progress=False)
    assert "warning: resuming with settings that differ" not in capsys.readouterr().out
    train(tiny(tmp_path, steps=4, resume="latest", mask_ratio=0.5, **unrouted), progress=False)
    assert "mask_ratio 0.0 -> 0.5" in capsys.readouterr().out


def test_summaries_are_json_without_nan(tmp_path):
    train(replace(tiny(tmp_path, steps=2), stage=1, route_ratio=0.0), progress=False)
    json.loads((tmp_path / "stage1" / "summary.json").read_text(),
               parse_constant=lambda name: pytest.fail(f"summary.json holds {name}"))
