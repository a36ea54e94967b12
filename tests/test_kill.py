"""Nothing lost: the trainer run as a user runs it (`python -m pixart_fast.train`, a subprocess) is killed with
SIGKILL at three random moments, resumed with --resume latest each time, and ends with the same bits as a run
that was never interrupted; SIGTERM and SIGINT save a checkpoint, return with status 0 and print the command
that resumes, and resuming from there also ends bit-identical."""
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch

from pixart_fast.checkpoints import load_safetensors
from pixart_fast.train.__main__ import main
from pixart_fast.train.loop import train
from pixart_fast.train.run_folder import checkpoint_folders
from pixart_fast.train.recipes import RECIPES

STEPS = 12
FLAGS = dict(model="PixArt-pixel-tiny", steps=STEPS, batch_size=4, save_every=1, keep=3, log_every=1, num_val=2,
             sample_steps=2, kernels="torch", t5_train_steps=0, route_end=2)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def command(out) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    return [sys.executable, "-m", "pixart_fast.train", "--stage=2", *flags, f"--out={out}", "--resume=latest"]


def newest_step(out) -> int:
    found = checkpoint_folders(out / "stage2")
    return int(found[-1].name.removeprefix("step-")) if found else 0


def wait_for_new_checkpoint(out, after: int, proc=None, timeout: float = 120.0) -> None:
    """Poll until a checkpoint newer than step `after` exists (its folder appears only once complete)."""
    deadline = time.time() + timeout
    while newest_step(out) <= after:
        assert proc is None or proc.poll() is None, f"the run ended early with status {proc.returncode}"
        assert time.time() < deadline, f"no checkpoint after step {after} within {timeout} s"
        time.sleep(0.005)


def assert_same_weights(a, b) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        x = load_safetensors(a / "stage2/checkpoints" / f"step-{STEPS:07d}" / name)
        y = load_safetensors(b / "stage2/checkpoints" / f"step-{STEPS:07d}" / name)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), name


def losses(out) -> list[tuple]:
    lines = [json.loads(line) for line in (out / "stage2/metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["grad_norm"]) for m in lines if "loss" in m]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same run, never interrupted (in this process)."""
    out = tmp_path_factory.mktemp("straight")
    train(replace(RECIPES[2], **FLAGS, out=str(out)), progress=False)
    return out


def test_three_kill_9s_and_resumes_end_bit_identical(straight, tmp_path):
    rng = random.Random(0)
    stopped_at = []
    for _ in range(3):
        before = newest_step(tmp_path)
        with open(tmp_path / "log.txt", "a") as log:
            proc = subprocess.Popen(command(tmp_path), env=ENV, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for_new_checkpoint(tmp_path, before, proc)
                time.sleep(rng.uniform(0.0, 0.1))  # anywhere in the next step: mid-forward, mid-save, mid-prune
                assert proc.poll() is None, "the run finished before it could be killed"
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        stopped_at.append(newest_step(tmp_path))
    assert stopped_at == sorted(stopped_at) and stopped_at[-1] < STEPS, stopped_at
    done = subprocess.run(command(tmp_path), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_weights(straight, tmp_path)
    # --keep 3: the newest three remain, and no *.tmp leftover of a killed save or deletion
    assert sorted(p.name for p in (tmp_path / "stage2/checkpoints").iterdir()) == [
        f"step-{s:07d}" for s in range(STEPS - 2, STEPS + 1)]
    # metrics.jsonl: each step once (lines past the resumed checkpoint were dropped), the same numbers
    assert losses(tmp_path) == losses(straight)


def test_sigterm_saves_exits_0_and_its_resume_command_finishes_bit_identical(straight, tmp_path):
    proc = subprocess.Popen(command(tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_new_checkpoint(tmp_path, 0, proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM" in output and "Resume with:" in output
    stopped = newest_step(tmp_path)
    assert 1 <= stopped < STEPS and f"stopped after step {stopped} of {STEPS}" in output
    resume = next(line.strip() for line in output.splitlines() if line.strip().startswith("python -m"))
    argv = shlex.split(resume)
    assert argv[:3] == ["python", "-m", "pixart_fast.train"] and argv[-2:] == ["--resume", "latest"]
    assert main(argv[3:]) == 0  # the printed command's flags, run in this process
    assert_same_weights(straight, tmp_path)


def test_sigint_in_process_stops_after_the_step_and_restores_the_handlers(straight, tmp_path):
    cfg = replace(RECIPES[2], **FLAGS, out=str(tmp_path))
    late = []

    def record(signum, frame):  # a SIGINT that reached the test after train() returned lands here, not in pytest
        late.append(signum)

    previous = signal.signal(signal.SIGINT, record)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        def interrupt():
            wait_for_new_checkpoint(tmp_path, 0)
            os.kill(os.getpid(), signal.SIGINT)

        thread = threading.Thread(target=interrupt, daemon=True)
        thread.start()
        summary = train(cfg, progress=False)
        thread.join()
        restored = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert restored == (record, sigterm)  # train() left no handler of its own behind
    assert not late and summary.get("interrupted") and 1 <= summary["steps"] < STEPS
    assert summary["checkpoint"].endswith(f"step-{summary['steps']:07d}")
    train(replace(cfg, resume="latest"), progress=False)
    assert_same_weights(straight, tmp_path)
