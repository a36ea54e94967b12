"""The one trainer for all three stages: `train(cfg)`, in one process or many (`torchrun ... -m pixart_fast.train`).

Everything a step needs is an explicit argument; every random draw comes from one torch.Generator that is
saved with the checkpoint, and the batch of step s is a pure function of (seed, s), so `--resume latest`
continues bit-identically. Data: the embedded procedural sets (DESIGN.md section 5), or with `--data DIR` the
VAE latents and T5 features that `python -m pixart_fast.extract` wrote. Under torchrun every rank draws the same
global batch (indices, noise, timesteps, caption drops) and takes its own slice (pixart_fast.distributed), so N
processes take the same steps as one at the same global batch. Rank 0 writes, under <out>/stage<N>/:
    checkpoints/step-XXXXXXX/{model,ema}.safetensors + trainer.pt (optimizer state by parameter name and
                      unsharded, so it resumes under any world size; scheduler, generator, step, config)
    metrics.jsonl     one JSON object per logged step (loss, mse, vb, lr, grad norm, images/s)
    samples/*.png     validation sample grids from the EMA model (embedded data)
    summary.json      wall time, final loss, the EMA model's alignment accuracy (embedded data) or its
                      validation loss (--data: real images have no known truth to score samples against)
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
from pixart_fast import distributed
from pixart_fast.checkpoints import load_any, load_safetensors, load_state_dict_strict, save_safetensors
from pixart_fast.diffusion import Diffusion, guided
from pixart_fast.eval import alignment_scores
from pixart_fast.features import FeatureDataset
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


def save_checkpoint(run_dir: Path, step: int, model, ema, opt, sched, gen, cfg: TrainConfig,
                    d: distributed.Dist) -> Path:
    """Write checkpoints/step-XXXXXXX atomically: into a temporary folder, fsync'd, then renamed. Every rank
    calls it (gathering sharded state is a collective); rank 0 writes whole, unsharded state dicts."""
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    model_sd, ema_sd = distributed.full_state_dict(model), distributed.full_state_dict(ema)
    opt_sd = distributed.full_optimizer_state_dict(model, opt)
    if not d.main:
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"step": step, "model": cfg.model, "stage": cfg.stage}
    save_safetensors(model_sd, tmp / "model.safetensors", meta)
    save_safetensors(ema_sd, tmp / "ema.safetensors", meta)
    torch.save({"step": step, "optimizer": opt_sd, "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "config": asdict(cfg)}, tmp / "trainer.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_weights(path: Path, model, ema) -> None:
    """The model and EMA weights of a checkpoint folder, into the unwrapped modules."""
    load_state_dict_strict(model, load_safetensors(path / "model.safetensors"))
    load_state_dict_strict(ema, load_safetensors(path / "ema.safetensors"))


def load_trainer_state(path: Path, model, opt, sched, gen) -> int:
    """The optimizer (after wrapping: each rank takes its shard), scheduler and generator of a checkpoint
    folder; returns the step it ends at."""
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    distributed.load_optimizer_state_dict(model, opt, state["optimizer"])
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
    save; other ranks) and return the alignment scores (accuracy, colour, position, shape; see pixart_fast.eval)."""
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
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images).save(png)
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
    """Run (or resume) one stage; returns the summary that is also written to summary.json. Under torchrun
    (WORLD_SIZE > 1 in the environment) this process trains its slice of every batch; device None picks
    cuda:LOCAL_RANK when there is CUDA."""
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
        return _train(cfg, d, fsdp, progress)
    finally:
        d.close()


def _train(cfg: TrainConfig, d: distributed.Dist, fsdp: bool, progress: bool) -> dict:
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

    resume = latest_checkpoint(run_dir) if cfg.resume == "latest" else (Path(cfg.resume) if cfg.resume else None)
    if cfg.resume == "latest" and resume is None:
        log(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'}, starting a new run")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if resume is not None:
        load_weights(resume, model, ema)
    else:
        log(initialise(model, cfg))
        ema.load_state_dict(model.state_dict())
    net = distributed.wrap(model, d, fsdp)  # DDP, FSDP2 (model sharded in place) or the model itself
    distributed.shard_like(ema, fsdp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume is not None:
        start = load_trainer_state(resume, model, opt, sched, gen)
        log(f"resumed from {resume} at step {start}")
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
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        update_ema(ema, model, cfg.ema_decay, step)
        done = step + 1

        losses = d.mean(torch.stack([loss, terms["mse"].mean(), terms["vb"].mean()]).detach().float()).tolist()
        last = {"step": done, "loss": losses[0], "mse": losses[1], "vb": losses[2],
                "lr": sched.get_last_lr()[0], "grad_norm": distributed.item(grad_norm)}
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
            save_checkpoint(run_dir, done, model, ema, opt, sched, gen, cfg, d)
        if cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
            scores = evaluate(ema, cfg, features, text, diffusion, d, run_dir / "samples" / f"step-{done:07d}.png")
            if d.main:
                metrics.write(json.dumps({"step": done, "val": scores}) + "\n")
            log(f"step {done}: EMA " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    bar.close()
    train_time = time.time() - t_start
    final = save_checkpoint(run_dir, cfg.steps, model, ema, opt, sched, gen, cfg, d)
    png = run_dir / "samples" / f"step-{cfg.steps:07d}.png"
    scores = evaluate(ema, cfg, features, text, diffusion, d, png)
    summary = {"stage": cfg.stage, "model": cfg.model, "steps": cfg.steps, "batch_size": cfg.batch_size,
               "world_size": d.world_size, "train_seconds": round(train_time, 1), "final_loss": last.get("loss"),
               "ema_alignment_accuracy": scores.get("accuracy"), "ema_scores": scores, "checkpoint": str(final),
               "samples": None if features is not None else str(png)}
    if d.main:
        metrics.write(json.dumps({"step": cfg.steps, "val": scores}) + "\n")
        metrics.close()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if features is None:
        log(f"stage {cfg.stage} done in {train_time:.0f} s: EMA alignment accuracy {scores['accuracy']:.3f} on "
            f"{cfg.num_val} held-out {'classes' if cfg.stage == 1 else 'captions'}; checkpoint {final}; samples {png}")
    else:
        log(f"stage {cfg.stage} done in {train_time:.0f} s: EMA validation loss {scores['val_loss']:.4f} on "
            f"{min(cfg.num_val, len(features))} samples of {cfg.data}; checkpoint {final}")
    return summary

