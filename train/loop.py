"""The one trainer for all three stages: `train(cfg)`.

Everything a step needs is an explicit argument; every random draw comes from one torch.Generator that is
saved with the checkpoint, and the images of step s are a pure function of (seed, s), so `--resume latest`
continues bit-identically. A run writes, under <out>/stage<N>/:
    checkpoints/step-XXXXXXX/{model,ema}.safetensors + trainer.pt (optimizer, scheduler, generator, step, config)
    metrics.jsonl     one JSON object per logged step (loss, mse, vb, lr, grad norm, images/s)
    samples/*.png     validation sample grids from the EMA model
    summary.json      wall time, final loss, the EMA model's alignment accuracy
"""
import copy
import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pixart_fast import data as embedded
from pixart_fast.checkpoints import load_any, load_safetensors, load_state_dict_strict, save_safetensors
from pixart_fast.diffusion import Diffusion, guided
from pixart_fast.eval import alignment_scores
from pixart_fast.model import CONFIGS, DiT, PixArt, reparameterize
from pixart_fast.sample import image_grid
from pixart_fast.text import TextEncoder
from pixart_fast.train.recipes import TrainConfig

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MICRO_KEYS = ("csize_embedder.", "ar_embedder.")


# ----------------------------------------------------------------------------------------------------------
# Data: the batch of step s is a pure function of (seed, s)
# ----------------------------------------------------------------------------------------------------------


def embedded_dataset(stage: int, size: int, seed: int, split: str = "train", length: int = 100_000):
    """The procedural data of a stage (DESIGN.md section 5); split "val" is the held-out stream.
    Stages 1-2 render size x size images; stage 3 its aspect-ratio buckets."""
    if stage == 1:
        return embedded.ShapeClasses(length, seed, split, size=size)
    if stage == 2:
        return embedded.ShapeScenes(length, seed, split, size=size)
    return embedded.AspectScenes(length, seed, split)


def batch_indices(dataset, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step `step`'s batch, drawn with replacement; for bucketed data all from one bucket."""
    rng = np.random.default_rng([seed, 7, step])
    if hasattr(dataset, "bucket_ids"):
        buckets = len(dataset.buckets)
        bucket = int(rng.integers(buckets))
        return (bucket + buckets * rng.integers(0, len(dataset) // buckets, batch_size)).tolist()
    return rng.integers(0, len(dataset), batch_size).tolist()


# ----------------------------------------------------------------------------------------------------------
# Models, initialisation, checkpoints
# ----------------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig):
    """Stage 1: the class-conditional DiT; stages 2 and 3: PixArt."""
    if cfg.model not in CONFIGS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {sorted(CONFIGS)}")
    mcfg = replace(CONFIGS[cfg.model], class_dropout_prob=cfg.caption_dropout)
    if cfg.stage == 1:
        if mcfg.micro_conditions:
            raise ValueError(f"stage 1 trains a class-conditional DiT; {cfg.model} has micro-conditions")
        return DiT(mcfg, grad_checkpointing=cfg.grad_checkpointing)
    return PixArt(mcfg, kernels=cfg.kernels, grad_checkpointing=cfg.grad_checkpointing)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (folders are renamed into place only when complete)."""
    found = sorted((run_dir / "checkpoints").glob("step-[0-9]*"))
    return found[-1] if found else None


def default_init(cfg: TrainConfig) -> Path | None:
    """Stage 2 starts from stage 1's newest EMA weights, stage 3 from stage 2's, when they exist."""
    if cfg.stage == 1:
        return None
    ckpt = latest_checkpoint(Path(cfg.out) / f"stage{cfg.stage - 1}")
    return None if ckpt is None else ckpt / "ema.safetensors"


def initialise(model, cfg: TrainConfig) -> str:
    """Load --init (or the previous stage's output) into model; returns a line saying what was done."""
    path = Path(cfg.init) if cfg.init else default_init(cfg)
    if path is None:
        return "no previous stage output and no --init: training from scratch"
    kind, sd = load_any(path)
    if isinstance(model, DiT):
        if kind != "dit":
            raise ValueError(f"stage 1 trains a class-conditional DiT; --init {path} is a {kind} checkpoint")
        load_state_dict_strict(model, sd)
        return f"initialised from DiT checkpoint {path}"
    if kind == "dit":
        load_state_dict_strict(model, reparameterize(sd, model.config, seed=cfg.seed))
        return f"initialised from DiT checkpoint {path} through re-parameterization (paper section 2.3)"
    # A PixArt without micro-conditions seeds a PixArtMS: the size embedders start fresh.
    new = tuple(k for k in model.state_dict() if k.startswith(MICRO_KEYS) and k not in sd)
    allow = new + (("y_embedder.y_embedding",) if kind == "diffusers" else ())
    load_state_dict_strict(model, sd, allow_missing=allow)
    fresh = " (micro-condition embedders new)" if new else ""
    return f"initialised from {kind} PixArt checkpoint {path}{fresh}"


def save_checkpoint(run_dir: Path, step: int, model, ema, opt, sched, gen, cfg: TrainConfig) -> Path:
    """Write checkpoints/step-XXXXXXX atomically: into a temporary folder, fsync'd, then renamed."""
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"step": step, "model": cfg.model, "stage": cfg.stage}
    save_safetensors(model.state_dict(), tmp / "model.safetensors", meta)
    save_safetensors(ema.state_dict(), tmp / "ema.safetensors", meta)
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "config": asdict(cfg)}, tmp / "trainer.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def resume_from(path: Path, model, ema, opt, sched, gen) -> int:
    """Restore a checkpoint folder written by save_checkpoint; returns the step it ends at."""
    load_state_dict_strict(model, load_safetensors(path / "model.safetensors"))
    load_state_dict_strict(ema, load_safetensors(path / "ema.safetensors"))
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return int(state["step"])


@torch.no_grad()
def update_ema(ema, model, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model with d = min(decay, (1 + step) / (10 + step)): short runs average
    over their recent steps instead of staying at the initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


# ----------------------------------------------------------------------------------------------------------
# Validation: sample with the EMA model, score against the known truth, save a grid
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(ema, cfg: TrainConfig, text: TextEncoder | None, diffusion: Diffusion, device, png: Path) -> dict:
    """Sample the fixed held-out set with the EMA model (DPM-Solver++, CFG), save the grid to png and return
    the alignment scores (accuracy, colour, position, shape; see pixart_fast.eval)."""
    val = embedded_dataset(cfg.stage, ema.config.input_size, seed=0, split="val", length=cfg.num_val)
    samples = [val[i] for i in range(len(val))]
    g = torch.Generator().manual_seed(1234)
    images, truths = [], []
    groups = {}  # stage 3: sample each aspect-ratio bucket as its own batch
    for s in samples:
        groups.setdefault(tuple(s["image"].shape), []).append(s)
    for group in groups.values():
        batch = embedded.collate(group)
        noise = torch.randn(batch["image"].shape, generator=g).to(device)
        B = noise.shape[0]
        if cfg.stage == 1:
            labels = torch.cat([batch["label"], batch["label"]]).to(device)
            drop = torch.arange(2 * B, device=device) >= B
            eps_fn = guided(lambda x2, t2: ema(x2, t2, labels, force_drop_ids=drop), cfg.cfg_scale)
        else:
            y, mask = (a.to(device) for a in text.encode_cached(batch["caption"]))
            extra = {}
            if "img_hw" in batch:
                extra = {"img_hw": batch["img_hw"].to(device), "aspect_ratio": batch["aspect_ratio"].to(device)}
            eps_fn = lambda x, t: ema.forward_with_cfg(x, t, y, mask, cfg.cfg_scale, **extra)  # noqa: E731
        images += list(diffusion.dpm_solver(eps_fn, noise, steps=cfg.sample_steps).float().cpu())
        truths += batch["truth"]
    png.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(png)
    return alignment_scores(images, truths)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, device: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) one stage; returns the summary that is also written to summary.json."""
    if cfg.stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {cfg.stage}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch size must be >= 1, got steps={cfg.steps}, batch_size={cfg.batch_size}")
    if cfg.data is not None:
        raise NotImplementedError(f"--data {cfg.data}: training from extracted features is not implemented yet; "
                                  "leave --data unset to use the embedded dataset")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = Path(cfg.out) / f"stage{cfg.stage}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = tqdm.write if progress else print

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    text = None if cfg.stage == 1 else (TextEncoder.from_pretrained(cfg.t5) if cfg.t5 else TextEncoder.embedded())
    if text is not None and text.caption_channels != model.config.caption_channels:
        raise ValueError(f"text encoder gives {text.caption_channels}-dim features but {cfg.model} expects "
                         f"{model.config.caption_channels}; pick a matching --model or --t5")
    diffusion = Diffusion(learn_sigma=model.config.learn_sigma)
    dataset = embedded_dataset(cfg.stage, model.config.input_size, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    gen = torch.Generator().manual_seed(cfg.seed)

    start = 0
    resume = latest_checkpoint(run_dir) if cfg.resume == "latest" else (Path(cfg.resume) if cfg.resume else None)
    if cfg.resume == "latest" and resume is None:
        log(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'}, starting a new run")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if resume is not None:
        start = resume_from(resume, model, ema, opt, sched, gen)
        log(f"resumed from {resume} at step {start}")
    else:
        log(initialise(model, cfg))
        ema.load_state_dict(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    log(f"stage {cfg.stage}: {type(model).__name__} {cfg.model} ({n_params / 1e6:.2f} M parameters) on {device}, "
        f"{cfg.steps} steps x {cfg.batch_size} images, {cfg.precision}")

    autocast = (torch.autocast(device.type, dtype=PRECISIONS[cfg.precision]) if PRECISIONS[cfg.precision]
                else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    metrics = open(run_dir / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"stage {cfg.stage}", unit="step")
    t_start, t_log, last = time.time(), time.time(), {}
    model.train()
    for step in range(start, cfg.steps):
        batch = embedded.collate([dataset[i] for i in batch_indices(dataset, step, cfg.batch_size, cfg.seed)])
        x0 = batch["image"].to(device)
        B = x0.shape[0]
        t = torch.randint(0, diffusion.num_timesteps, (B,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        drop = (torch.rand(B, generator=gen) < cfg.caption_dropout).to(device)
        if cfg.stage == 1:
            labels = batch["label"].to(device)
            model_fn = lambda xt, tt: model(xt, tt, labels, force_drop_ids=drop)  # noqa: E731
        else:
            y, mask = (a.to(device) for a in text.encode(batch["caption"]))
            extra = {}
            if model.config.micro_conditions:
                extra = {"img_hw": batch["img_hw"].to(device), "aspect_ratio": batch["aspect_ratio"].to(device)}
            model_fn = lambda xt, tt: model(xt, tt, y, mask, force_drop_ids=drop, **extra)  # noqa: E731
        with autocast:
            terms = diffusion.training_losses(model_fn, x0, t, noise)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        update_ema(ema, model, cfg.ema_decay, step)
        done = step + 1

        last = {"step": done, "loss": loss.item(), "mse": terms["mse"].mean().item(), "vb": terms["vb"].mean().item(),
                "lr": sched.get_last_lr()[0], "grad_norm": grad_norm.item()}
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.time()
            last["img_per_s"] = cfg.log_every * B / max(now - t_log, 1e-9) if done % cfg.log_every == 0 else None
            t_log = now
            metrics.write(json.dumps(last) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.1e}",
                            img_s=f"{last['img_per_s']:.1f}" if last["img_per_s"] else "-")
        if done % cfg.save_every == 0 and done < cfg.steps:
            save_checkpoint(run_dir, done, model, ema, opt, sched, gen, cfg)
        if cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
            scores = validate(ema, cfg, text, diffusion, device, run_dir / "samples" / f"step-{done:07d}.png")
            metrics.write(json.dumps({"step": done, "val": scores}) + "\n")
            log(f"step {done}: EMA alignment accuracy {scores['accuracy']:.3f}")
    bar.close()
    train_time = time.time() - t_start
    final = save_checkpoint(run_dir, cfg.steps, model, ema, opt, sched, gen, cfg)
    scores = validate(ema, cfg, text, diffusion, device, run_dir / "samples" / f"step-{cfg.steps:07d}.png")
    accuracy = scores["accuracy"]
    summary = {"stage": cfg.stage, "model": cfg.model, "steps": cfg.steps, "batch_size": cfg.batch_size,
               "train_seconds": round(train_time, 1), "final_loss": last.get("loss"),
               "ema_alignment_accuracy": accuracy, "ema_scores": scores, "checkpoint": str(final),
               "samples": str(run_dir / "samples" / f"step-{cfg.steps:07d}.png")}
    metrics.write(json.dumps({"step": cfg.steps, "val": scores}) + "\n")
    metrics.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"stage {cfg.stage} done in {train_time:.0f} s: EMA alignment accuracy {accuracy:.3f} on {cfg.num_val} "
        f"held-out {'classes' if cfg.stage == 1 else 'captions'}; checkpoint {final}; samples {summary['samples']}")
    return summary
