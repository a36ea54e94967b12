"""A stage's run folder, <out>/stage<N>/: its checkpoints (save, verify, choose, prune), leftovers of interrupted
saves, and metrics.jsonl trimming.

    checkpoints/step-XXXXXXX/  model.safetensors, ema.safetensors, trainer.pt (optimizer by parameter name and
                               unsharded, scheduler, step, config; with --repa-depth the model's and the EMA's
                               alignment projectors, kept out of the weights files) and manifest.json (each file's
                               size and CRC-32, written last). A LoRA run's weights files hold its adapters
                               only, and record the frozen base weights' path ("base" in their metadata)

A folder is written as step-XXXXXXX.tmp, every file and the folder fsync'd, the manifest last, and only then
renamed. Saving a step again (a run resumed from an older checkpoint) moves the old folder aside as
step-XXXXXXX.replaced.tmp until the new one is in place. A kill -9 at any moment leaves every checkpoint complete
under its name or in a *.tmp folder that the next run puts back (recover_leftovers): a complete step-XXXXXXX.tmp
(its manifest verifies) is renamed into place, else the replaced copy is restored; only incomplete leftovers and
folders whose deletion was cut short (*.old.tmp) are deleted.
The manifest catches damage after the save (a disk, a copy or a sync tool that cut a file short or flipped a bit):
`--resume latest` verifies the newest folder, says what is wrong with a damaged one, skips it and takes the
newest intact one. Folders written before manifests existed are verified by reading every file whole.
"""
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from pixart_fast import distributed, lora
from pixart_fast.align import PROJECTOR, SECOND_PROJECTOR
from pixart_fast.cli import UserError
from pixart_fast.checkpoints import (TEXT_ENCODER_FILE, load_safetensors, load_state_dict_strict, nonfinite_keys,
                                    save_safetensors)
from pixart_fast.files import atomic_path, fsync_dir, verify_manifest, write_manifest

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "trainer.pt")
WRITING, REPLACED, DELETING = ".tmp", ".replaced.tmp", ".old.tmp"  # suffixes of checkpoint folders in passing


LOCK = ".lock"  # held by the run writing the folder: its pid, host, start time and command inside


class NoIntactCheckpoint(UserError):
    """--resume found checkpoints, but every one is damaged (or the one named is)."""


@contextmanager
def claimed(run_dir: Path):
    """Create a stage's run folder (and the folders above it) and hold its lock while the run writes there. A
    second run on the same folder fails at once with UserError naming the first. The lock is the system's
    (flock), released when its process ends however it ends, so a dead run's lock is taken over. A run that
    fails before writing anything but the lock leaves nothing behind: the folders it created are removed."""
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = path.read_text().strip() if path.exists() else ""
            raise UserError(f"{run_dir} is in use by another run ({holder or 'unknown'}): wait for it to end, or "
                            "pass another --out") from None
        if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
            break  # the file still has its name: the lock is ours (else its holder deleted it on the way out)
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{shlex.join(sys.argv)}\n".encode())
    try:
        yield run_dir
    except BaseException:
        if run_dir in created and all(f.is_file() and (f.name == LOCK or f.stat().st_size == 0)
                                      for f in run_dir.iterdir()):
            shutil.rmtree(run_dir)  # it wrote nothing but the lock and empty files: as if it never ran
            for folder in created[1:]:
                if not any(folder.iterdir()):
                    folder.rmdir()
        raise
    finally:
        if path.exists() and os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()
        os.close(fd)


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first. A folder is named step-XXXXXXX only once
    complete (save_checkpoint); *.tmp names are saves or deletions that a crash interrupted."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None (not verified: see newest_intact_checkpoint)."""
    found = checkpoint_folders(run_dir)
    return found[-1] if found else None


def guide_checkpoint(run_dir: Path, step: int) -> Path:
    """The run's intact checkpoint of `step`, the guide of autoguidance (--guide-step); UserError naming the step
    and what is wrong (no such checkpoint: the ones there are; damage: the files)."""
    folder = run_dir / "checkpoints" / f"step-{step:07d}"
    if not folder.is_dir():
        have = ", ".join(f.name.removeprefix("step-").lstrip("0") for f in checkpoint_folders(run_dir)) or "none"
        raise UserError(f"--guide-step {step}: {run_dir} has no checkpoint at that step; it has {have}")
    problems = checkpoint_problems(folder)
    if problems:
        raise UserError(f"--guide-step {step}: its checkpoint is damaged ({'; '.join(problems)})")
    return folder


def checkpoint_problems(folder: Path) -> list[str]:
    """What is wrong with a checkpoint folder, one line per file (empty: intact). With a manifest: every file's
    size and CRC-32 against it. Without one (written before manifests existed): each file read whole."""
    problems = verify_manifest(folder)  # names the files it lists that are missing
    missing = [f"{folder.name}/{name}: missing" for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if problems or missing:
        return problems or missing  # missing alone: a needed file the manifest does not list
    if problems is not None:
        return []
    problems = []
    for name in CHECKPOINT_FILES:
        try:
            if name.endswith(".safetensors"):
                load_safetensors(folder / name)
            else:
                torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read it back is damage: say which file and what
            problems.append(f"{folder.name}/{name}: unreadable ({str(e).splitlines()[0] or type(e).__name__})")
    return problems


def newest_intact_checkpoint(run_dir: Path, log=print, flag: str = "--resume latest") -> Path | None:
    """The newest checkpoint folder of a run that verifies, or None if the run has none. Each damaged folder is
    reported (`step-0000800/model.safetensors: 1,000 bytes, manifest says 6,291,736; skipping it`) and skipped;
    raises NoIntactCheckpoint, naming them all, if every folder is damaged."""
    folders = checkpoint_folders(run_dir)
    damaged = []
    for folder in reversed(folders):
        problems = checkpoint_problems(folder)
        if not problems:
            return folder
        for line in problems:
            log(f"{flag}: {line}; skipping it")
        damaged.append(folder)
    if damaged:
        raise NoIntactCheckpoint(f"{flag}: no intact checkpoint in {run_dir / 'checkpoints'}; all {len(damaged)} "
                                 f"are damaged ({', '.join(p.name for p in damaged)}). Restore one from a copy, "
                                 "or delete the folders to start the run again")
    return None


def verified_checkpoint(folder: Path) -> Path:
    """A checkpoint folder named by --resume DIR, verified: NoIntactCheckpoint saying what is wrong if damaged."""
    if not (folder / "trainer.pt").is_file() and not (folder / "manifest.json").is_file():
        raise FileNotFoundError(f"--resume {folder}: not a checkpoint folder (no trainer.pt there); pass 'latest' or "
                                "a <out>/stage<N>/checkpoints/step-XXXXXXX folder")
    problems = checkpoint_problems(folder)
    if problems:
        raise NoIntactCheckpoint(f"--resume {folder}: damaged: " + "; ".join(problems) +
                                 ". Pass an older checkpoint folder, or 'latest' to take the newest intact one")
    return folder


def recover_leftovers(run_dir: Path, log=print) -> None:
    """Finish what interrupted saves and deletions left in checkpoints/, each action logged. Where step-N is
    missing: a complete step-N.tmp (every file its manifest lists, intact) is renamed into place, else an intact
    step-N.replaced.tmp (the copy a save of the same step moved aside) is put back. Every other *.tmp folder
    (an incomplete save, a cut-off deletion, a copy no longer needed) is deleted."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return
    for writing in sorted(folder.glob("step-*" + WRITING)):
        final = folder / writing.name.removesuffix(WRITING)
        if not re.fullmatch(r"step-\d+", final.name) or final.exists():
            continue
        replaced = final.with_name(final.name + REPLACED)
        if verify_manifest(writing) == [] and not checkpoint_problems(writing):
            os.replace(writing, final)
            log(f"{final}: completed by a save that was interrupted before its last rename; kept")
        elif replaced.is_dir() and not checkpoint_problems(replaced):
            os.replace(replaced, final)
            log(f"{final}: put back (a save replacing it was interrupted)")
    for replaced in sorted(folder.glob("step-*" + REPLACED)):
        final = folder / replaced.name.removesuffix(REPLACED)
        if not final.exists() and not checkpoint_problems(replaced):
            os.replace(replaced, final)
            log(f"{final}: put back (a save replacing it was interrupted)")
    fsync_dir(folder)
    for leftover in sorted(folder.glob("*.tmp")):
        shutil.rmtree(leftover)
        log(f"deleted {leftover}, left incomplete by an interrupted save or deletion")


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder: renamed to *.old.tmp first (atomic), so a crash midway leaves a leftover
    for recover_leftovers to delete, never a half-deleted folder under a complete checkpoint's name."""
    trash = folder.with_name(folder.name + DELETING)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def save_checkpoint(run_dir: Path, step: int, model, ema, opt, sched, skipped: int, cfg,
                    d: distributed.Dist, base: Path | None = None, seconds: float = 0.0, text=None) -> Path:
    """Write checkpoints/step-XXXXXXX crash-safely: every file written and fsync'd in step-XXXXXXX.tmp, the
    manifest last, then the folder renamed into place (the rename fsync'd too); then all but the newest --keep
    checkpoints are deleted. Refuses weights holding NaN or inf. Every rank calls it (gathering sharded state is
    a collective); rank 0 writes whole, unsharded state dicts. skipped: the run's skipped steps so far. base: a
    LoRA run's frozen base weights (its files then hold the adapters only). seconds: the run's training time so
    far, over all the processes that resumed it. text: the run's text encoder; an embedded T5 trained on caption
    text is kept as TEXT_ENCODER_FILE, so that sampling, resuming and the next stage load the encoder the run
    trained with."""
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    if lora.is_lora(model):
        model_sd, ema_sd = lora.adapter_state_dict(model), lora.adapter_state_dict(ema)
    else:
        model_sd, ema_sd = distributed.full_state_dict(model), distributed.full_state_dict(ema)
    opt_sd = distributed.full_optimizer_state_dict(model, opt)
    if not d.main:
        return final
    for name, sd in (("model", model_sd), ("EMA", ema_sd)):
        bad = nonfinite_keys(sd)
        if bad:
            raise FloatingPointError(f"refusing to write checkpoint {final}: the {name} weights hold NaN or inf in "
                                     f"{len(bad)} tensors ({', '.join(bad[:3])}); the last good checkpoint is "
                                     f"{latest_checkpoint(run_dir) or 'none yet'}")
    projector = {name: _split_off_projector(sd) for name, sd in (("model", model_sd), ("ema", ema_sd))}
    tmp = final.with_name(final.name + WRITING)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # what a sampler needs to know besides the weights: the config, what the model predicts, the embedded T5's
    # tokenizer, attention bias and training on caption text
    meta = {"step": step, "model": cfg.model, "stage": cfg.stage, "prediction": cfg.prediction,
            "tokenizer": cfg.tokenizer, "t5_locality": cfg.t5_locality, "t5_train_steps": cfg.t5_train_steps}
    if lora.is_lora(model):
        meta.update(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets, base=str(base))
    save_safetensors(model_sd, tmp / "model.safetensors", meta)  # each file fsync'd, and the folder
    save_safetensors(ema_sd, tmp / "ema.safetensors", meta)
    if text is not None and cfg.t5_train_steps and cfg.t5 is None:
        # cloned: T5 ties its token embedding to `shared`, and safetensors refuses tensors that share memory
        save_safetensors({k: v.clone() for k, v in text.model.state_dict().items()}, tmp / TEXT_ENCODER_FILE, meta)
    with atomic_path(tmp / "trainer.pt") as path:
        state = {"step": step, "optimizer": opt_sd, "scheduler": sched.state_dict(), "skipped_steps": skipped,
                 "train_seconds": seconds, "config": asdict(cfg)}
        torch.save(state | ({"projector": projector} if projector["model"] else {}), path)
    write_manifest(tmp)  # last: a folder with a manifest holds every file it lists
    # This step saved before (a run resumed from an older checkpoint): its folder is moved aside, not deleted,
    # until the new one has its name, so a kill in between leaves two complete copies (recover_leftovers).
    replaced = final.with_name(final.name + REPLACED)
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    if cfg.keep:
        guide = run_dir / "checkpoints" / f"step-{cfg.guide_step:07d}" if cfg.guide_step else None
        for old in checkpoint_folders(run_dir)[:-cfg.keep]:
            if old not in (final, guide):
                remove_checkpoint(old)
    return final


def load_weights(path: Path, model, ema) -> None:
    """The model and EMA weights of a checkpoint folder, into the unwrapped modules (a LoRA model: its adapters)."""
    if lora.is_lora(model):
        lora.load_adapter(model, load_safetensors(path / "model.safetensors"), source=f"--resume {path}/model")
        lora.load_adapter(ema, load_safetensors(path / "ema.safetensors"), source=f"--resume {path}/ema")
        return
    projector = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True).get("projector", {})
    for module, name, key in ((model, "model.safetensors", "model"), (ema, "ema.safetensors", "ema")):
        load_state_dict_strict(module, load_safetensors(path / name) | projector.get(key, {}),
                               source=f"--resume {path / name}")


def _split_off_projector(sd: dict) -> dict:
    """Take the alignment projectors' entries (training-only heads, pixart_fast.align) out of a state dict:
    the weights files hold the model alone."""
    return {k: sd.pop(k) for k in [k for k in sd if k.split(".")[0] in (PROJECTOR, SECOND_PROJECTOR)]}


def load_trainer_state(path: Path, model, opt, sched) -> tuple[int, int, float, dict]:
    """The optimizer (after wrapping: each rank takes its shard) and scheduler of a checkpoint folder; returns
    (the step it ends at, the steps skipped so far, the training seconds so far, the run's settings then)."""
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    distributed.load_optimizer_state_dict(model, opt, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return (int(state["step"]), int(state.get("skipped_steps", 0)), float(state.get("train_seconds", 0.0)),
            state["config"])


def trim_metrics(path: Path, step: int) -> None:
    """Drop the metrics.jsonl lines past `step`, where a run starts or resumes: a run killed after its last
    checkpoint wrote them (the last one perhaps cut short), and this run writes those steps again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))
