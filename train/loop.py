"""The one trainer for all three stages: `train(cfg)`, in one process or many (`torchrun ... -m pixart_fast.train`).

Everything a step needs is an explicit argument; every random draw comes from one torch.Generator that is
saved with the checkpoint, and the batch of step s is a pure function of (seed, s), so `--resume latest`
continues bit-identically. Data: the embedded procedural sets (docs/ARCHITECTURE.md section 5), or with `--data DIR` the
VAE latents and T5 features that `python -m pixart_fast.extract` wrote. Under torchrun every rank draws the same
global batch (indices, noise, timesteps, caption drops) and takes its own slice (pixart_fast.distributed), so N
processes take the same steps as one at the same global batch. Rank 0 writes, under <out>/stage<N>/:
    checkpoints/step-XXXXXXX/{model,ema}.safetensors + trainer.pt (optimizer state by parameter name and
                      unsharded, so it resumes under any world size; scheduler, generator, step, config)
    metrics.jsonl     one JSON object per logged step (loss, mse, vb, lr, grad norm, images/s)
    samples/*.png     validation sample grids from the EMA model (embedded data)
    summary.json      wall time, final loss, the EMA model's alignment accuracy (embedded data) or its
                      validation loss (--data: real images have no known truth to score samples against)

When things go wrong (README "When things go wrong"):
- A checkpoint folder is written as step-XXXXXXX.tmp, every file and the folder fsync'd, and only then renamed:
  a kill -9 at any moment leaves the newest complete checkpoint loadable, `--resume latest` picks it, and a
  new run deletes the *.tmp leftovers. `--keep N` deletes all but the newest N (never the one just written).
- SIGINT / SIGTERM: the current step finishes, a checkpoint is saved, and train() returns (exit status 0)
  after printing the command that resumes the run. The previous signal handlers are restored on return.
- A step whose loss or gradient norm is not finite is skipped: no optimizer or EMA update. It still counts as
  a step, so the batch, noise and learning rate of step s stay functions of s (a resumed run, or one that
  skipped steps, keeps the data order). `skipped_steps` in metrics.jsonl counts them; --max-bad-steps in a row
  stop the run with an error naming the step and the last good checkpoint. Non-finite weights are never saved.
"""
import copy
import json
import math
import shlex
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pixart_fast import data as embedded
from pixart_fast import distributed
from pixart_fast.checkpoints import load_any, load_state_dict_strict, nonfinite_keys
from pixart_fast.diffusion import Diffusion, guided
from pixart_fast.eval import alignment_scores
from pixart_fast.features import FeatureDataset
from pixart_fast.model import CONFIGS, DiT, PixArt, reparameterize
from pixart_fast.grid import image_grid
from pixart_fast.text import TextEncoder
from pixart_fast.files import atomic_path
from pixart_fast.train.recipes import RECIPES, TrainConfig
from pixart_fast.train.run_folder import (latest_checkpoint, load_trainer_state, load_weights, newest_intact_checkpoint,
                                          remove_leftovers, save_checkpoint, trim_metrics, verified_checkpoint)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MICRO_KEYS = ("csize_embedder.", "ar_embedder.")
# Settings that shape the run's trajectory: resuming with other values is allowed, but warned about.
TRAJECTORY = ("model", "batch_size", "lr", "weight_decay", "adam_eps", "warmup", "grad_clip", "ema_decay",
              "caption_dropout", "precision", "seed", "data", "t5")


# ----------------------------------------------------------------------------------------------------------
# Data: the batch of step s is a pure function of (seed, s)
# ----------------------------------------------------------------------------------------------------------


def embedded_dataset(stage: int, size: int, seed: int, split: str = "train", length: int = 100_000):
    """The procedural data of a stage (docs/ARCHITECTURE.md section 5); split "val" is the held-out stream.
    Stages 1-2 render size x size images; stage 3 its aspect-ratio buckets."""
    if stage == 1:
        return embedded.ShapeClasses(length, seed, split, size=size)
    if stage == 2:
        return embedded.ShapeScenes(length, seed, split, size=size)
    return embedded.AspectScenes(length, seed, split)


def batch_indices(dataset, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step `step`'s global batch, drawn with replacement. For bucketed data (a `bucket_ids()`
    method) all from one bucket, picked in proportion to its size: the bucket of a uniformly drawn sample."""
    rng = np.random.default_rng([seed, 7, step])
    if hasattr(dataset, "bucket_ids"):
        ids = dataset.bucket_ids()
        members = np.flatnonzero(ids == ids[rng.integers(len(ids))])
        return members[rng.integers(0, len(members), batch_size)].tolist()
    return rng.integers(0, len(dataset), batch_size).tolist()


def load_data(cfg: TrainConfig, model):
    """The training set: the embedded data, or the extracted features of --data after checking they fit the model.
    Returns (dataset, the FeatureDataset or None)."""
    if cfg.data is None:
        return embedded_dataset(cfg.stage, model.config.input_size, cfg.seed), None
    if cfg.t5 is not None:
        raise ValueError(f"--t5 {cfg.t5} encodes the embedded captions; the features in --data {cfg.data} hold their "
                         "captions' T5 features already: drop --t5")
    features = FeatureDataset(cfg.data)
    features.check_model(model.config, cfg.model, cfg.stage)
    return features, features


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


def default_init(cfg: TrainConfig, log=print) -> Path | None:
    """Stage 2 starts from stage 1's newest intact EMA weights, stage 3 from stage 2's, when they exist."""
    if cfg.stage == 1:
        return None
    ckpt = newest_intact_checkpoint(Path(cfg.out) / f"stage{cfg.stage - 1}", log, flag="previous stage's output")
    return None if ckpt is None else ckpt / "ema.safetensors"


def initialise(model, cfg: TrainConfig, log=print) -> str:
    """Load --init (or the previous stage's output) into model; returns a line saying what was done."""
    path = Path(cfg.init) if cfg.init else default_init(cfg, log)
    if path is None:
        return "no previous stage output and no --init: training from scratch"
    kind, sd = load_any(path)
    source = f"--init {path}"
    bad = nonfinite_keys(sd)
    if bad:
        raise ValueError(f"{source}: NaN or inf in {len(bad)} tensors ({', '.join(bad[:3])}); pick another checkpoint")
    if isinstance(model, DiT):
        if kind != "dit":
            raise ValueError(f"stage 1 trains a class-conditional DiT; {source} is a {kind} checkpoint")
        load_state_dict_strict(model, sd, source=source)
        return f"initialised from DiT checkpoint {path}"
    if kind == "dit":
        load_state_dict_strict(model, reparameterize(sd, model.config, seed=cfg.seed), source=source)
        return f"initialised from DiT checkpoint {path} through re-parameterization (paper section 2.3)"
    # A PixArt without micro-conditions seeds a PixArtMS: the size embedders start fresh.
    new = tuple(k for k in model.state_dict() if k.startswith(MICRO_KEYS) and k not in sd)
    allow = new + (("y_embedder.y_embedding",) if kind == "diffusers" else ())
    load_state_dict_strict(model, sd, allow_missing=allow, source=source)
    fresh = " (micro-condition embedders new)" if new else ""
    return f"initialised from {kind} PixArt checkpoint {path}{fresh}"


def resume_command(cfg: TrainConfig) -> str:
    """The command line that continues this run: its stage, --out, every setting that differs from the stage's
    recipe, and --resume latest. (Under torchrun: the same flags after the launcher's.)"""
    recipe = RECIPES[cfg.stage]
    flags = [f"--{f.name.replace('_', '-')} {shlex.quote(str(getattr(cfg, f.name)))}" for f in fields(cfg)
             if f.name not in ("stage", "out", "resume", "init") and getattr(cfg, f.name) != getattr(recipe, f.name)]
    return " ".join(["python -m pixart_fast.train --stage", str(cfg.stage), "--out", shlex.quote(cfg.out), *flags,
                     "--resume latest"])


class StopSignals:
    """Inside `with`, SIGINT and SIGTERM set `received` (the signal's name) instead of ending the process, so
    the loop can finish its step and save; the previous handlers are restored on exit. Outside the main thread,
    where Python cannot install handlers, it does nothing."""

    def __init__(self):
        self.received, self._previous = None, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        print(f"{self.received} received: finishing this step, then saving a checkpoint", flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@torch.no_grad()
def update_ema(ema, model, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model with d = min(decay, (1 + step) / (10 + step)): short runs average
    over their recent steps instead of staying at the initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


# ----------------------------------------------------------------------------------------------------------
# Conditioning and validation
# ----------------------------------------------------------------------------------------------------------


def conditioned(net, batch: dict, drop, stage: int, micro_conditions: bool, text: TextEncoder | None, device):
    """model_fn(x_t, t) for one batch: class labels (stage 1) or captions, replaced by the null ones where drop
    (B,) is True, and PixArtMS's micro-conditions when the model has them. Captions come as extracted features
    ("text", "mask") or as strings that `text` encodes here."""
    if stage == 1:
        labels = batch["label"].to(device)
        return lambda xt, tt: net(xt, tt, labels, force_drop_ids=drop)
    y, mask = (batch["text"], batch["mask"]) if "text" in batch else text.encode(batch["caption"])
    y, mask = y.to(device), mask.to(device)
    extra = {}
    if micro_conditions:
        extra = {"img_hw": batch["img_hw"].to(device), "aspect_ratio": batch["aspect_ratio"].to(device)}
    return lambda xt, tt: net(xt, tt, y, mask, force_drop_ids=drop, **extra)


@torch.no_grad()
def validate(ema, cfg: TrainConfig, text: TextEncoder | None, diffusion: Diffusion, device, png: Path | None) -> dict:
    """Sample the fixed held-out set with the EMA model (DPM-Solver++, CFG), save the grid to png (None: do not
    save; other ranks) and return the alignment scores (accuracy, colour, position, shape; see pixart_fast.eval).
    The grid shows each sample beside its ground-truth render (left: sample, right: truth) above its caption
    (stage 1: the class name)."""
    val = embedded_dataset(cfg.stage, ema.config.input_size, seed=0, split="val", length=cfg.num_val)
    samples = [val[i] for i in range(len(val))]
    g = torch.Generator().manual_seed(1234)
    images, truths = [], []
    clean, captions = [], []  # for the grid only: the ground-truth renders and captions, in the order of images
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
        else:  # as ema.forward_with_cfg, but through ema's __call__, where a sharded EMA gathers its weights
            y, mask = (torch.cat([a, a]).to(device) for a in text.encode_cached(batch["caption"]))
            drop = torch.arange(2 * B, device=device) >= B
            extra = {}
            if "img_hw" in batch:
                extra = {k: torch.cat([batch[k], batch[k]]).to(device) for k in ("img_hw", "aspect_ratio")}
            eps_fn = guided(lambda x2, t2: ema(x2, t2, y, mask, force_drop_ids=drop, **extra), cfg.cfg_scale)
        # Pixel space: the data range [-1, 1] is known, so x0 predictions are clipped to it.
        images += list(diffusion.dpm_solver(eps_fn, noise, steps=cfg.sample_steps, clip_x0=True).float().cpu())
        truths += batch["truth"]
        clean += list(batch["image"])
        captions += [val.class_names[s["label"]] for s in group] if cfg.stage == 1 else batch["caption"]
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        # one tile per pair, sample | truth, with a 2-pixel black gap (-1 is black)
        pairs = [torch.cat([im, torch.full((3, im.shape[1], 2), -1.0), truth.float()], dim=2)
                 for im, truth in zip(images, clean)]
        image_grid(pairs, captions, cols=4).save(png)
    return alignment_scores(images, truths)


@torch.no_grad()
def validation_loss(ema, features: FeatureDataset, cfg: TrainConfig, diffusion: Diffusion, device) -> dict:
    """{"val_loss": the EMA model's training loss on the first num_val feature samples}, with fixed latent
    samples, noise and timesteps and no caption dropped, so the number is comparable from step to step."""
    g = torch.Generator().manual_seed(1234)
    groups = {}  # one batch per bucket
    for i in range(min(cfg.num_val, len(features))):
        groups.setdefault(int(features.bucket_ids()[i]), []).append(features[i])
    total, count = 0.0, 0
    for group in groups.values():
        batch = embedded.collate(group)
        mean = batch["latent_mean"]
        x0 = features.latents(mean, batch["latent_std"], torch.randn(mean.shape, generator=g)).to(device)
        t = torch.randint(0, diffusion.num_timesteps, (len(group),), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        keep = torch.zeros(len(group), dtype=torch.bool, device=device)
        model_fn = conditioned(ema, batch, keep, cfg.stage, ema.config.micro_conditions, None, device)
        total += diffusion.training_losses(model_fn, x0, t, noise)["loss"].sum().item()
        count += len(group)
    return {"val_loss": total / count}


def evaluate(ema, cfg: TrainConfig, features, text, diffusion: Diffusion, d: distributed.Dist, png: Path) -> dict:
    """Validation on every rank (a sharded EMA needs all of them): sample and score the embedded held-out set
    (rank 0 saves the grid to png), or the validation loss on feature data."""
    if features is not None:
        return validation_loss(ema, features, cfg, diffusion, d.device)
    return validate(ema, cfg, text, diffusion, d.device, png if d.main else None)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, device: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) one stage; returns the summary that is also written to summary.json, or, stopped early by
    SIGINT / SIGTERM, {"interrupted": True, "steps" done, "checkpoint", "resume": the command that continues}.
    Under torchrun (WORLD_SIZE > 1 in the environment) this process trains its slice of every batch; device None
    picks cuda:LOCAL_RANK when there is CUDA."""
    if cfg.stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {cfg.stage}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch size must be >= 1, got steps={cfg.steps}, batch_size={cfg.batch_size}")
    fsdp = cfg.fsdp
    if fsdp and cfg.precision == "fp16":
        raise ValueError("--fsdp true with fp16 is not supported (its gradient scaler does not shard); use bf16")
    d = distributed.setup(device)
    try:
        with StopSignals() as stop:
            return _train(cfg, d, fsdp, progress, stop)
    finally:
        d.close()


def _train(cfg: TrainConfig, d: distributed.Dist, fsdp: bool, progress: bool, stop: StopSignals) -> dict:
    device, mine = d.device, d.slice(cfg.batch_size)  # this rank's slice of every global batch
    run_dir = Path(cfg.out) / f"stage{cfg.stage}"
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = progress and d.main
    log = (tqdm.write if progress else print) if d.main else (lambda *a: None)

    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    model = build_model(cfg)
    dataset, features = load_data(cfg, model)
    text = None
    if cfg.stage > 1 and features is None:
        text = TextEncoder.from_pretrained(cfg.t5) if cfg.t5 else TextEncoder.embedded()
        if text.caption_channels != model.config.caption_channels:
            raise ValueError(f"text encoder gives {text.caption_channels}-dim features but {cfg.model} expects "
                             f"{model.config.caption_channels}; pick a matching --model or --t5")
    diffusion = Diffusion(learn_sigma=model.config.learn_sigma)

    if d.main:
        for leftover in remove_leftovers(run_dir):
            log(f"deleted {leftover}, left by an interrupted save")
    resume = None
    if cfg.resume == "latest":  # the newest checkpoint that verifies; damaged ones are named and skipped
        resume = newest_intact_checkpoint(run_dir, log)
    elif cfg.resume:
        resume = verified_checkpoint(Path(cfg.resume))
    if cfg.resume == "latest" and resume is None:
        log(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'}, starting a new run")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if resume is not None:
        load_weights(resume, model, ema)
    else:
        log(initialise(model, cfg, log))
        ema.load_state_dict(model.state_dict())
    net = distributed.wrap(model, d, fsdp)  # DDP, FSDP2 (model sharded in place) or the model itself
    distributed.shard_like(ema, fsdp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    gen = torch.Generator().manual_seed(cfg.seed)
    start, skipped = 0, 0
    if resume is not None:
        start, skipped, saved = load_trainer_state(resume, model, opt, sched, gen)
        log(f"resumed from {resume} at step {start}")
        changed = [f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in TRAJECTORY
                   if saved.get(k) != getattr(cfg, k)]
        if changed:
            log(f"warning: resuming with settings that differ from the checkpoint's ({', '.join(changed)}); the run "
                "goes on, but not as the run that was started")
    if d.main:
        trim_metrics(run_dir / "metrics.jsonl", start)
    n_params = sum(p.numel() for p in model.parameters())
    parallel = f", {d.world_size} processes ({'FSDP2' if fsdp else 'DDP'})" if d.world_size > 1 else ""
    log(f"stage {cfg.stage}: {type(model).__name__} {cfg.model} ({n_params / 1e6:.2f} M parameters) on {device}"
        f"{parallel}, {cfg.steps} steps x {cfg.batch_size} images, {cfg.precision}, "
        f"data {cfg.data or 'embedded'}")

    autocast = (torch.autocast(device.type, dtype=PRECISIONS[cfg.precision]) if PRECISIONS[cfg.precision]
                else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    metrics = open(run_dir / "metrics.jsonl", "a") if d.main else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"stage {cfg.stage}", unit="step")
    t_start, t_log, last = time.time(), time.time(), {}
    done, saved_at, bad_run = start, None, 0  # bad_run: skipped steps in a row
    model.train()
    for step in range(start, cfg.steps):
        batch = embedded.collate([dataset[i] for i in batch_indices(dataset, step, cfg.batch_size, cfg.seed)[mine]])
        x0 = batch["image" if features is None else "latent_mean"].to(device)
        # The global batch's randomness, drawn alike on every rank from a per-step generator seeded by the shared
        # one (on the device: fast at any batch size); each rank keeps its slice.
        step_gen = torch.Generator(device).manual_seed(int(torch.randint(2**62, (), generator=gen)))
        shape = (cfg.batch_size, *x0.shape[1:])
        t = torch.randint(0, diffusion.num_timesteps, shape[:1], generator=step_gen, device=device)[mine]
        noise = torch.randn(shape, generator=step_gen, device=device)[mine]
        drop = (torch.rand(shape[:1], generator=step_gen, device=device) < cfg.caption_dropout)[mine]
        if features is not None:  # a fresh sample of each image's latent distribution
            eps = torch.randn(shape, generator=step_gen, device=device)[mine]
            x0 = features.latents(x0, batch["latent_std"].to(device), eps)
        model_fn = conditioned(net, batch, drop, cfg.stage, model.config.micro_conditions, text, device)
        with autocast:
            terms = diffusion.training_losses(model_fn, x0, t, noise)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # DDP / FSDP average the gradients over ranks: the global batch's mean
        scaler.unscale_(opt)
        grad_norm = distributed.item(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        # One all-reduce: the global batch's losses, and whether any rank got SIGINT / SIGTERM (all stop together).
        stats = torch.stack([loss, terms["mse"].mean(), terms["vb"].mean()]).detach().float()
        stats = d.mean(torch.cat([stats, stats.new_tensor([stop.received is not None])])).tolist()
        done = step + 1
        # A NaN or inf in any gradient makes the norm clip_grad_norm_ computed non-finite: no update this step.
        if math.isfinite(stats[0]) and math.isfinite(grad_norm):
            scaler.step(opt)
            update_ema(ema, model, cfg.ema_decay, step)
            bad_run = 0
        else:
            skipped, bad_run = skipped + 1, bad_run + 1
            log(f"step {done}: loss {stats[0]}, gradient norm {grad_norm}: skipped, no update ({bad_run} in a row)")
            if cfg.max_bad_steps and bad_run >= cfg.max_bad_steps:
                raise FloatingPointError(
                    f"stopping at step {done}: steps {done - bad_run + 1} to {done} all had a non-finite loss or "
                    f"gradient norm (--max-bad-steps {cfg.max_bad_steps}). The last good checkpoint is "
                    f"{latest_checkpoint(run_dir) or 'none yet'}; resume from it with a lower --lr or --grad-clip, "
                    "or check the data")
        scaler.update()  # fp16: a skipped step lowers the loss scale
        sched.step()  # the learning rate stays a function of the step

        last = {"step": done, "loss": stats[0], "mse": stats[1], "vb": stats[2], "lr": sched.get_last_lr()[0],
                "grad_norm": grad_norm, "skipped_steps": skipped}
        bar.update(1)
        if d.main and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.time()
            full = done % cfg.log_every == 0  # images/s over a whole logging interval only
            last["img_per_s"] = cfg.log_every * cfg.batch_size / max(now - t_log, 1e-9) if full else None
            t_log = now
            metrics.write(json.dumps(last) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.1e}",
                            img_s=f"{last['img_per_s']:.1f}" if last["img_per_s"] else "-")
        if done % cfg.save_every == 0 and done < cfg.steps:
            save_checkpoint(run_dir, done, model, ema, opt, sched, gen, skipped, cfg, d)
            saved_at = done
        if stats[3] > 0:
            break
        if cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
            scores = evaluate(ema, cfg, features, text, diffusion, d, run_dir / "samples" / f"step-{done:07d}.png")
            if d.main:
                metrics.write(json.dumps({"step": done, "val": scores}) + "\n")
            log(f"step {done}: EMA " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    bar.close()
    train_time = time.time() - t_start
    final = (run_dir / "checkpoints" / f"step-{done:07d}" if saved_at == done
             else save_checkpoint(run_dir, done, model, ema, opt, sched, gen, skipped, cfg, d))
    if done < cfg.steps:  # stopped by a signal
        if d.main:
            metrics.close()
        command = resume_command(cfg)
        log(f"{stop.received or 'a stop signal (to another process)'}: stopped after step {done} of {cfg.steps}, "
            f"checkpoint {final}. Resume with:\n  {command}")
        return {"stage": cfg.stage, "model": cfg.model, "steps": done, "interrupted": True, "checkpoint": str(final),
                "skipped_steps": skipped, "resume": command}
    png = run_dir / "samples" / f"step-{cfg.steps:07d}.png"
    scores = evaluate(ema, cfg, features, text, diffusion, d, png)
    summary = {"stage": cfg.stage, "model": cfg.model, "steps": cfg.steps, "batch_size": cfg.batch_size,
               "world_size": d.world_size, "train_seconds": round(train_time, 1), "final_loss": last.get("loss"),
               "skipped_steps": skipped,
               "ema_alignment_accuracy": scores.get("accuracy"), "ema_scores": scores, "checkpoint": str(final),
               "samples": None if features is not None else str(png)}
    if d.main:
        metrics.write(json.dumps({"step": cfg.steps, "val": scores}) + "\n")
        metrics.close()
        with atomic_path(run_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    if features is None:
        log(f"stage {cfg.stage} done in {train_time:.0f} s: EMA alignment accuracy {scores['accuracy']:.3f} on "
            f"{cfg.num_val} held-out {'classes' if cfg.stage == 1 else 'captions'}; checkpoint {final}; samples {png}")
    else:
        log(f"stage {cfg.stage} done in {train_time:.0f} s: EMA validation loss {scores['val_loss']:.4f} on "
            f"{min(cfg.num_val, len(features))} samples of {cfg.data}; checkpoint {final}")
    return summary

