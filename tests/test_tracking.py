"""--report-to: the curves read back with TensorBoard's own event reader and W&B's own reader of its offline run
files (`wandb leet inspect`), across a resume from a checkpoint older than the last logged step (a run killed
after it logged past its checkpoint): every step once, the resumed run's values from the resume step on."""
import json
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pixart_fast import tracking
from pixart_fast.cli import UserError
from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES

FLAGS = dict(model="PixArt-pixel-tiny", steps=3, batch_size=4, save_every=2, log_every=1, num_val=2, sample_steps=2,
             kernels="torch", t5_train_steps=0, route_end=2)


def killed_and_resumed(out, report_to: str) -> list[dict]:
    """Train 3 steps (checkpoints at 2 and 3), lose the step-3 checkpoint (as if killed after logging step 3),
    resume to step 4; returns metrics.jsonl's training lines, which the curves must match."""
    cfg = replace(RECIPES[2], **FLAGS, out=str(out), report_to=report_to)
    train(cfg, progress=False)
    shutil.rmtree(out / "stage2/checkpoints/step-0000003")
    train(replace(cfg, steps=4, resume="latest"), progress=False)
    return [r for r in map(json.loads, (out / "stage2/metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_tensorboard_curves_continue_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = killed_and_resumed(tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "stage2/tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert len(list((tmp_path / "stage2/tensorboard").glob("events.out.tfevents.*"))) == 2  # one file a process
    for key in ("loss", "grad_norm", "lr", "mse"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [1, 2, 3, 4], key  # step 3: the resumed run's, not also the first's
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in lines], rel=1e-6), key
    assert [s.step for s in events.Scalars("train/img_per_s")] == [1, 2, 3, 4]
    # validation: the first run's final one (step 3) was past the checkpoint it resumed from
    assert [s.step for s in events.Scalars("val/accuracy")] == [4]
    assert [(i.step, i.width > 0) for i in events.Images("val/samples")] == [(4, True)]
    config = events.Tensors("config/text_summary")
    assert [c.step for c in config] == [0, 2]  # each process's config, at the step it started from
    assert '"steps": 4' in config[1].tensor_proto.string_val[0].decode()


def wandb_records(run_dir) -> list[dict]:
    """The records of an offline run's .wandb file, read by wandb's own reader."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B credentials and no WANDB_MODE: what wandb itself finds decides the mode."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


def test_wandb_is_online_only_with_a_login_its_server_accepts(no_wandb_login, monkeypatch):
    said = []
    assert tracking.wandb_mode(said.append) == "offline" and said == []  # no login
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.wandb_mode() is None  # wandb's own setting decides
    monkeypatch.delenv("WANDB_MODE")
    with socket.socket() as s:  # a login, but its server does not answer (a port nothing listens on)
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "1")
    assert tracking.wandb_mode(said.append) == "offline"
    assert len(said) == 1 and said[0].startswith("W&B: ") and said[0].endswith("; logging offline")


def test_wandb_offline_run_continues_across_a_resume(tmp_path, no_wandb_login):
    out = tmp_path / "out"
    lines = killed_and_resumed(out, "wandb")
    state = json.loads((out / "stage2" / tracking.WANDB_STATE).read_text())
    sessions = []
    for run_dir in (out / "stage2/wandb").glob("offline-run-*"):
        records = wandb_records(run_dir)
        run = next(r["run"] for r in records if r["type"] == "run")
        history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
        sessions.append((run["start_time"], run | {"_dir": run_dir}, history))
    sessions.sort(key=lambda s: s[0])
    assert len(sessions) == 2 and {s[1]["run_id"] for s in sessions} == {state["id"]} and state["step"] == 4
    assert sessions[1][1]["resume"] and sessions[1][1]["config"]["update"]["steps"] == 4
    first, resumed = sessions[0][2], sessions[1][2]
    # the first process logged steps 1-3; the resumed one (from step 2) only what W&B did not hold: step 4
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4]
    curve = {**first, **resumed}
    assert [curve[s]["train/loss"] for s in (1, 2, 3, 4)] == pytest.approx([r["loss"] for r in lines], rel=1e-6)
    assert "val/accuracy" in first[3] and "val/accuracy" in resumed[4]
    assert resumed[4]["val/samples._type"] == "image-file"
    assert (sessions[1][1]["_dir"] / "files" / resumed[4]["val/samples.path"]).is_file()


def test_report_to_without_its_package_is_one_line(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UserError, match=r"--report-to wandb needs the wandb package: pip install 'pixart_fast\[track"):
        train(replace(RECIPES[2], **FLAGS, out="unused", report_to="wandb"), progress=False)


def test_mfu_counts_each_steps_batch_over_the_peak():
    from pixart_fast.batch import Batch
    from pixart_fast.flops import flops_per_image
    from pixart_fast.model import CONFIGS

    cfg = replace(RECIPES[2], **FLAGS, route_ratio=0.0)  # unrouted: every image costs the whole model's FLOPs
    config = CONFIGS[cfg.model]
    mfu = tracking.MFU(cfg, config, False, peak_flops=1e9)
    batch = Batch(images=torch.zeros(2, 3, 16, 16), text=torch.zeros(2, 7, config.caption_channels))
    mfu.add(0, batch)
    mfu.add(1, batch)
    per_image = flops_per_image(config, 16, 16, vae_downsample=1, caption_tokens=7)
    assert mfu.take(10.0) == pytest.approx(10.0 * per_image / 1e9)  # 10 images/s at this many FLOPs each
    assert mfu.take(None) is None
    # self-alignment's teacher and projector count too
    aligned = tracking.MFU(replace(cfg, repa_depth=1, repa_target_depth=2), config, False, peak_flops=1e9)
    aligned.add(0, batch)
    repa = flops_per_image(config, 16, 16, vae_downsample=1, caption_tokens=7, repa_depth=1, repa_target_depth=2)
    assert repa > per_image and aligned.take(10.0) == pytest.approx(10.0 * repa / 1e9)
    # the truth's projector (no teacher), both depths, and nothing after --repa-steps: as the ablation counts them
    from pixart_fast.train.ablate import image_flops

    truth = replace(cfg, repa_depth=2, repa_second_depth=1, repa_truth=True, repa_steps=1, route_ratio=0.5,
                    route_start=0, route_end=2)
    assert truth.aligns(0) and not truth.aligns(1)
    counted = tracking.MFU(truth, config, False, peak_flops=1e9)
    size, tokens = config.input_size, config.max_tokens  # the ablation counts the model's own image and captions
    for step in (0, 1):
        counted.add(step, Batch(images=torch.zeros(2, 3, size, size), text=torch.zeros(2, tokens, 1)))
        assert counted.take(10.0) == pytest.approx(10.0 * image_flops(truth, step) / 1e9)
    # the dispersive loss's Gram matrix over this process's images: 2 of a batch of 4 (two processes)
    from pixart_fast.flops import dispersion_flops

    disperse = replace(cfg, disperse_weight=0.5, disperse_depth=1, batch_size=4)
    counted = tracking.MFU(disperse, config, False, peak_flops=1e9)
    counted.add(0, Batch(images=torch.zeros(2, 3, size, size), text=torch.zeros(2, tokens, 1)))
    gram = dispersion_flops(config, size, size, batch_size=2, vae_downsample=1)
    assert gram > 0 and counted.take(10.0) == pytest.approx(10.0 * (image_flops(cfg, 0) + gram) / 1e9)
    assert tracking.MFU.on(torch.device("cpu"), 1, cfg, config, False) is None


def test_the_loop_logs_mfu_beside_images_per_s(tmp_path, monkeypatch):
    """On a GPU of the table (here: its peak stood in for on the CPU) every full logging interval has an MFU."""
    from pixart_fast.flops import flops_per_image
    from pixart_fast.model import CONFIGS

    monkeypatch.setattr(tracking.MFU, "on", lambda device, world_size, cfg, config, cc, encoder, log:
                        tracking.MFU(cfg, config, cc, 1e9, encoder))
    train(replace(RECIPES[2], **FLAGS, out=str(tmp_path)), progress=False)  # the recipe routes past block 0 of 2
    lines = [r for r in map(json.loads, (tmp_path / "stage2/metrics.jsonl").read_text().splitlines()) if "loss" in r]
    config = CONFIGS[FLAGS["model"]]
    # the recipe's ratio past block 0 of the two: the FLOPs the model ran
    per_image = flops_per_image(config, config.input_size, config.input_size, vae_downsample=1,
                                route_ratio=RECIPES[2].route_ratio, route_blocks=(0, 1))
    assert per_image < flops_per_image(config, config.input_size, config.input_size, vae_downsample=1)
    assert [r["mfu"] for r in lines] == pytest.approx([r["img_per_s"] * per_image / 1e9 for r in lines])
