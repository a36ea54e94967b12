"""The one trainer for all three stages: `train(cfg)`, in one process or many (`torchrun ... -m pixart_fast.train`).

Every random draw of step s (its batch, noise, timesteps, caption drops) is a pure function of (seed, s), so
`--resume latest` continues bit-identically with no random-generator state to save. Under torchrun every rank draws the
same global batch (indices, noise, timesteps, caption drops) and takes its own slice (pixart_fast.distributed),
so N processes take the same steps as one at the same global batch (except the dispersive loss, --disperse-weight,
which each process computes over its own share of the batch).

Who owns what:
    train/stages.py      what each stage builds, trains on, conditions with, and how it is judged
    train/run_folder.py  <out>/stage<N>/: checkpoints (save, verify, choose, prune), metrics trimming
    train/loop.py        this file: set-up (`setup`), one optimizer step (`train_step`), the loop (`train`)
Rank 0 writes metrics.jsonl (one JSON object per logged step: loss, mse, vb, lr, grad norm, images/s; with
--repa-depth also align, the alignment loss before its weight, 0 after --repa-steps; with --disperse-depth disperse, the
dispersive loss before its weight; loss is the diffusion loss alone),
samples/*.png (validation grids from the EMA model, embedded data) and summary.json (wall time, final loss, the
EMA model's alignment scores, or its validation loss on --data); on a GPU of pixart_fast.gpus' table, mfu too.
--report-to sends the same to TensorBoard or W&B (pixart_fast/tracking.py).

When things go wrong (docs/faults.md):
- Checkpoints are written crash-safely and verified before a resume trusts them (train/run_folder.py).
- SIGINT / SIGTERM: the current step finishes, a checkpoint is saved, and train() returns (exit status 0)
  after printing the command that resumes the run. The previous signal handlers are restored on return.
- A step whose loss or gradient norm is not finite is skipped: no optimizer or EMA update. It still counts as
  a step, so the batch, noise and learning rate of step s stay functions of s (a resumed run, or one that
  skipped steps, keeps the data order). `skipped_steps` in metrics.jsonl counts them; --max-bad-steps in a row
  stop the run with an error naming the step and the last good checkpoint. Non-finite weights are never saved.
"""
import functools
import json
import math
import shlex
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pixart_fast import distributed, lora, tracking
from pixart_fast.align import (PROJECTOR, SECOND_PROJECTOR, Alignment, Dispersion, FrozenEncoder, projector,
                               truth_targets, truth_width)
from pixart_fast.checkpoints import training_metadata
from pixart_fast.cli import UserError
from pixart_fast.diffusion import Diffusion
from pixart_fast.files import atomic_path
from pixart_fast.loader import prefetch, to_device
from pixart_fast.model import draw_tokens, keep_patches
from pixart_fast.sample import load_guide
from .recipes import RECIPES, TrainConfig
from .run_folder import (claimed, guide_checkpoint, latest_checkpoint, load_trainer_state, load_weights,
                         newest_intact_checkpoint, recover_leftovers, save_checkpoint, trim_metrics,
                         verified_checkpoint)
from .stages import STAGES, Stage

PREFETCH_DEPTH, PREFETCH_WORKERS = 4, 2  # batches built ahead of the step, by this many threads
PRECISIONS = {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # "auto": see autocast_dtype
# Settings that shape the run's trajectory: resuming with other values is allowed, but warned about.
TRAJECTORY = ("model", "batch_size", "lr", "weight_decay", "adam_eps", "warmup", "lr_decay", "grad_clip", "ema_decay",
              "caption_dropout", "scene_objects", "precision", "seed", "data", "t5", "prediction", "min_snr_gamma",
              "min_snr_plus_one", "timestep_sampling", "logit_mean", "logit_std", "input_perturbation", "tokenizer",
              "t5_locality", "t5_train_steps", "optimizer", "lora_rank", "lora_alpha", "lora_targets", "mask_ratio",
              "unmasked_steps", "route_ratio", "route_start", "route_end", "early_route_steps", "early_route_ratio",
              "early_route_start", "repa_depth", "repa_second_depth", "repa_target_depth", "repa_target_offset",
              "repa_encoder", "repa_weight", "repa_projector_dim", "repa_steps", "repa_truth", "disperse_weight",
              "disperse_depth", "disperse_distance")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --precision on `device` (None: fp32). "auto" is bf16 on CUDA, fp32 on a CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return PRECISIONS[precision]


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s noise, timesteps and caption drops: a pure function of (seed, step)."""
    return int(np.random.default_rng([seed, 11, step]).integers(2**62))


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of --lr: a linear warm-up over --warmup
    steps, then held, and over the last --lr-decay of the run's steps a linear decay toward 0."""
    factor = min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_decay:
        factor *= min(1.0, (cfg.steps - step) / (cfg.lr_decay * cfg.steps))
    return factor


def token_levers(cfg: TrainConfig, step: int, shape: tuple, patch_size: int, depth: int, device,
                 rank_part: slice) -> dict:
    """Step `step`'s token masking and routing as the model's forward arguments ({} when both are off): which
    tokens of each image enter the network, and which of those run the routed blocks. Drawn for the global batch
    from a generator seeded by (seed, step) and sliced like the other draws: a pure function of (seed, step).
    The last --unmasked-steps steps draw no mask; routing follows TrainConfig.routing."""
    masking = cfg.mask_ratio > 0 and step < cfg.steps - cfg.unmasked_steps
    routing = cfg.routing(step, depth)
    if not (masking or routing):
        return {}
    gen = torch.Generator(device).manual_seed(int(np.random.default_rng([cfg.seed, 13, step]).integers(2**62)))
    B, grid = shape[0], (shape[2] // patch_size, shape[3] // patch_size)
    levers, tokens = {}, grid[0] * grid[1]
    if masking:
        keep = draw_tokens(B, tokens, cfg.mask_ratio, gen)
        levers, tokens = {"keep": keep[rank_part], "grid": grid}, keep.shape[1]
    if routing:
        ratio, blocks = routing
        levers.update(route=draw_tokens(B, tokens, ratio, gen)[rank_part], route_blocks=blocks)
    return levers


def batch_indices(data, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step `step`'s global batch, drawn with replacement: a pure function of (seed, step). For
    bucketed data (`bucket_ids()` not None) all from one bucket, picked in proportion to its size: the bucket of
    a uniformly drawn sample."""
    rng = np.random.default_rng([seed, 7, step])
    ids = data.bucket_ids()
    if ids is not None:
        members = np.flatnonzero(ids == ids[rng.integers(len(ids))])
        return members[rng.integers(0, len(members), batch_size)].tolist()
    return rng.integers(0, len(data), batch_size).tolist()


def resume_command(cfg: TrainConfig) -> str:
    """The command line that continues this run: its stage, --out, every setting that differs from the stage's
    recipe, and --resume latest. (Under torchrun: the same flags after the launcher's.)"""
    recipe = RECIPES[cfg.stage]
    skip = ("stage", "out", "resume") + (() if cfg.lora_rank else ("init",))  # LoRA: --init is the frozen base
    flags = [f"--{f.name.replace('_', '-')} {shlex.quote(str(getattr(cfg, f.name)))}" for f in fields(cfg)
             if f.name not in skip and getattr(cfg, f.name) != getattr(recipe, f.name)]
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
def update_ema(ema_params: list, params: list, decay: float, step: int, apply: torch.Tensor) -> None:
    """ema <- d * ema + (1 - d) * model with d = min(decay, (1 + step) / (10 + step)) over the trained parameters:
    short runs average over their recent steps instead of staying at the initial weights. One foreach op.
    apply: a 0-dim bool tensor on the device; False leaves the EMA exactly as it is (a skipped step), decided
    on the device without a host sync."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, apply * (1 - d))


def make_optimizer(params: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    """--optimizer: AdamW (fused: one kernel for all parameters, and it skips a step on the device through
    `found_inf`, see train_step) or CAME (came-pytorch) with PixArt-Sigma's betas and eps."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps, fused=True)
    from came_pytorch import CAME

    return CAME(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))


# ----------------------------------------------------------------------------------------------------------
# Set-up: everything a step needs, built once
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One stage's run in this process: what `setup` builds and `train_step` uses."""

    cfg: TrainConfig
    stage: Stage
    dist: distributed.Dist
    run_dir: Path
    model: torch.nn.Module  # the unwrapped model: its parameters, state dicts and config
    net: torch.nn.Module  # what runs forward and backward: DDP, the FSDP2-sharded model, or the model itself
    ema: torch.nn.Module  # LoRA: shares the model's frozen base weights, averages the adapters
    base: Path | None  # LoRA: where the frozen base weights came from (recorded in checkpoints)
    params: list  # the trained parameters (LoRA: the adapters' only), and the EMA's, in the same order
    ema_params: list
    data: object  # train/stages.py: EmbeddedData or FeatureData
    diffusion: Diffusion
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    start: int  # steps done before this process started (a resumed run)
    skipped: int  # non-finite steps skipped so far (up to the last `read_records`)
    seconds: float  # training time before this process started (a resumed run)
    autocast: torch.dtype | None  # the forward's autocast dtype; None: fp32
    align: Alignment | None  # --repa-depth: representation alignment (its projectors: `projectors(model)`)


def setup(cfg: TrainConfig, d: distributed.Dist, log) -> Run:
    """Build the model and EMA, the data, the optimizer and scheduler; resume from or initialise them."""
    stage = STAGES[cfg.stage]
    run_dir = Path(cfg.out) / f"stage{cfg.stage}"
    with torch.random.fork_rng(devices=[]):  # every rank builds the same initial weights; the global RNG is untouched
        torch.manual_seed(cfg.seed)
        model = stage.build_model(cfg)
    if (cfg.mask_ratio or cfg.route_ratio or cfg.early_route_steps) and stage.class_conditional:
        raise UserError("--mask-ratio, --route-ratio and --early-route-steps act on PixArt's tokens (stages 2 and 3), "
                        "not stage 1's DiT")
    depth = model.config.depth  # a bad routed range fails here, before writing
    phases = [(0, "--early-route-ratio", cfg.early_route_ratio, cfg.early_route_start)] if cfg.early_route_steps else []
    for step, flag, ratio, start in phases + [(cfg.early_route_steps, "--route-ratio", cfg.route_ratio,
                                               cfg.route_start)]:
        if ratio and cfg.routing(step, depth) is None:
            log(f"{flag} {ratio}: {cfg.model} has {depth} blocks, none between the first routed one ({start}) and "
                "the last block, so no token is routed")
    if d.main:
        recover_leftovers(run_dir, log)
    resume = None
    if cfg.resume == "latest":  # the newest checkpoint that verifies; damaged ones are named and skipped
        resume = newest_intact_checkpoint(run_dir, log)
        if resume is None:
            log(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'}, starting a new run")
    elif cfg.resume:
        resume = verified_checkpoint(Path(cfg.resume))
    model.to(d.device)
    base = None  # LoRA: the frozen base weights, loaded again on a resume (checkpoints hold the adapters only)
    if resume is None or cfg.lora_rank:
        # a LoRA resume without --init: the base its checkpoint records having been trained on
        recorded = (training_metadata(resume / "model.safetensors").get("base")
                    if resume is not None and cfg.init is None else None)
        base = Path(recorded) if recorded else stage.init_source(cfg, log)
        if cfg.lora_rank and base is None:
            raise UserError(f"--lora-rank {cfg.lora_rank} adapts existing weights, but there are none: pass --init "
                             "(a diffusers folder, an official .pth or our checkpoint) or train the previous stage")
        log(stage.initialise(model, base, cfg))
    if cfg.lora_rank:
        with torch.random.fork_rng(devices=[]):  # the adapters' initial A: the same on every rank, from --seed
            torch.manual_seed(cfg.seed)
            lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        log(f"{lora.adapter_summary(model)}; base weights {base}")
    # the embedded T5 the checkpoint it resumes or starts from was trained with, where it keeps it and it fits
    source = resume or base
    data = stage.data(cfg, model, source)
    text = getattr(data, "text", None)
    if text is not None and text.training_flops:
        how = f"{text.training_seconds:.0f} s" if text.training_seconds else f"its weights from {source}"
        log(f"embedded T5 trained on caption text: {cfg.t5_train_steps} steps, {text.training_flops:.3g} FLOPs, "
            + how)
    align = attach_alignment(cfg, model, d.device)  # before the EMA copy: the projector is averaged as any weight
    ema = lora.ema_copy(model)
    if resume is not None:
        load_weights(resume, model, ema)
    # Every rank reads the checkpoint it resumes from, or the previous stage's weights, under --out: on several
    # nodes, a folder they all see. Where they differ, no rank trains (FSDP would mix shards of both).
    step = int(training_metadata(resume / "model.safetensors").get("step", 0)) if resume else 0
    if not d.agree(step, base is not None):
        raise UserError(f"the processes do not start from the same checkpoint or weights (this one: "
                        f"{resume or base or 'new weights'}; {run_dir} as its node sees it): put --out on a file "
                        "system every node shares, at the same path")
    net = distributed.wrap(model, d, cfg.fsdp)  # DDP, FSDP2 (model sharded in place) or the model itself
    distributed.shard_like(ema, cfg.fsdp)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    model_by_name, ema_by_name = dict(model.named_parameters()), dict(ema.named_parameters())
    params, ema_params = [model_by_name[n] for n in trained], [ema_by_name[n] for n in trained]
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    start, skipped, seconds = 0, 0, 0.0
    if resume is not None:
        start, skipped, seconds, saved = load_trainer_state(resume, model, opt, sched)
        log(f"resumed from {resume} at step {start}")
        # a setting the checkpoint does not record (it predates the setting) was at its default then
        saved = {f.name: f.default for f in fields(TrainConfig)} | saved
        changed = [f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in TRAJECTORY if saved[k] != getattr(cfg, k)]
        if changed:
            log(f"warning: resuming with settings that differ from the checkpoint's ({', '.join(changed)}); the run "
                "goes on, but not as the run that was started")
    if d.main:
        trim_metrics(run_dir / "metrics.jsonl", start)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
    if cfg.compile:
        net = torch.compile(net)  # the model is one graph, the Triton kernels included (custom ops with fakes)
    diffusion = Diffusion(learn_sigma=model.config.learn_sigma, prediction=cfg.prediction,
                          min_snr_gamma=cfg.min_snr_gamma, min_snr_plus_one=cfg.min_snr_plus_one,
                          timestep_sampling=cfg.timestep_sampling, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
    return Run(cfg, stage, d, run_dir, model, net, ema, base if cfg.lora_rank else None, params, ema_params, data,
               diffusion, opt, sched, scaler, start, skipped, seconds, autocast_dtype(cfg.precision, d.device), align)


def attach_alignment(cfg: TrainConfig, model: torch.nn.Module, device) -> Alignment | None:
    """--repa-depth: the projector, attached to `model` as PROJECTOR (drawn from --seed; --repa-second-depth's
    next, as SECOND_PROJECTOR), and the target's source (the frozen --repa-encoder, the scenes' truth, or the EMA
    model's deeper blocks); None when off."""
    if not cfg.repa_depth:
        return None
    encoder = FrozenEncoder(cfg.repa_encoder).to(device) if cfg.repa_encoder else None
    D, p = model.config.hidden_size, model.config.patch_size
    width = encoder.config.hidden_size if encoder else truth_width(p) if cfg.repa_truth else D
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = [projector(D, cfg.repa_projector_dim or 2 * D, width) for _ in range(1 + bool(cfg.repa_second_depth))]
    for name, head in zip((PROJECTOR, SECOND_PROJECTOR), heads):
        model.add_module(name, head.to(device))
    return Alignment(cfg.repa_depth, cfg.repa_target_depth, encoder, p, cfg.repa_truth, cfg.repa_second_depth)


def projectors(model: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The alignment projectors attached to `model`: PROJECTOR's, then SECOND_PROJECTOR's if it has one."""
    return tuple(getattr(model, name) for name in (PROJECTOR, SECOND_PROJECTOR) if hasattr(model, name))


# ----------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------


def step_batch(run: Run, step: int):
    """This rank's slice of step `step`'s global batch, on the CPU (page-locked when training on a GPU): a pure
    function of (seed, step), so the prefetcher may build it ahead of time. With --repa-truth, in the steps that
    align, it carries the truth per token too (built here, off the step's path)."""
    cfg, d = run.cfg, run.dist
    indices = batch_indices(run.data, step, cfg.batch_size, cfg.seed)[d.slice(cfg.batch_size)]
    batch = run.data.batch(indices, pin_memory=d.device.type == "cuda")
    if cfg.repa_truth and cfg.aligns(step):
        batch = replace(batch, truth_tokens=truth_targets(batch.truths, run.model.config.patch_size))
    return batch


def train_step(run: Run, step: int, stop_requested: bool, batch=None) -> torch.Tensor:
    """Step `step` of the run: this rank's slice of the global batch, forward, backward, and (when the loss and
    gradient norm are finite) the optimizer and EMA updates. No host sync: whether to update is decided on the
    device. Returns a device tensor [loss, mse, vb, grad norm, updated, stop, align, disperse] (losses averaged over
    ranks; stop: some rank asked to stop), read by `read_records` at logging steps."""
    cfg, d, rank_part = run.cfg, run.dist, run.dist.slice(run.cfg.batch_size)
    # batch: step_batch(run, step), built ahead by the prefetcher; on the device, caption features in float32
    batch = to_device(step_batch(run, step) if batch is None else batch, d.device)
    # The global batch's randomness, drawn alike on every rank from a generator seeded by (seed, step) (on the
    # device: fast at any batch size); each rank keeps its slice. Determinism: every draw below is a function
    # of (seed, step) and the data, never of the world size or of earlier steps' outcomes.
    step_gen = torch.Generator(d.device).manual_seed(step_seed(cfg.seed, step))
    shape = (cfg.batch_size, *batch.images.shape[1:])
    t = run.diffusion.draw_timesteps(cfg.batch_size, step_gen, d.device)[rank_part]  # flow: float s * T
    noise = torch.randn(shape, generator=step_gen, device=d.device)[rank_part]
    drop = (torch.rand(shape[:1], generator=step_gen, device=d.device) < cfg.caption_dropout)[rank_part]
    eps = torch.randn(shape, generator=step_gen, device=d.device)[rank_part] if batch.is_latent else None
    x0 = batch.x0(eps)  # latents: a fresh sample of each image's latent distribution
    perturb = (cfg.input_perturbation * torch.randn(shape, generator=step_gen, device=d.device)[rank_part]
               if cfg.input_perturbation else None)
    mc = run.model.config
    levers = token_levers(cfg, step, shape, mc.patch_size, mc.depth, d.device, rank_part)
    if "keep" in levers:  # masking: the loss sees only the kept patches (the layout the masked model takes)
        x0, noise = keep_patches(x0, levers["keep"], mc.patch_size), keep_patches(noise, levers["keep"], mc.patch_size)
        perturb = None if perturb is None else keep_patches(perturb, levers["keep"], mc.patch_size)
    net = functools.partial(run.net, **levers) if levers else run.net
    teacher = None
    aligning = cfg.aligns(step)  # run.align is set whenever --repa-depth is
    # SRA's teacher input: the same x0 and noise, up to the offset less noisy (drawn last: none after --repa-steps)
    if aligning and cfg.repa_target_offset:
        back = torch.rand(shape[:1], generator=step_gen, device=d.device)[rank_part] * cfg.repa_target_offset
        t_teacher = (t - back).clamp(min=0).to(t.dtype)  # int64 timesteps: floored (all >= 0)
        teacher = (run.diffusion.noised(x0, t_teacher, noise), t_teacher)
    if aligning:  # the same call, and each call also computes the alignment loss into aligned["align"]
        net, aligned = run.align.wrap(net, run.ema, projectors(run.model), levers, batch.images, teacher,
                                       batch.truth_tokens)
    if cfg.disperse_depth:  # the same call, and each call also computes the dispersive loss
        net, dispersed = Dispersion(cfg.disperse_depth, cfg.disperse_distance).wrap(net)
    model_fn = run.stage.condition(net, batch, drop, mc.micro_conditions)
    with torch.autocast(d.device.type, dtype=run.autocast) if run.autocast else nullcontext():
        terms = run.diffusion.training_losses(model_fn, x0, t, noise, perturb)
    loss = terms["loss"].mean()
    align = aligned["align"].mean() if aligning else torch.zeros((), device=d.device)
    objective = loss + cfg.repa_weight * align if aligning else loss
    if cfg.disperse_depth:
        objective = objective + cfg.disperse_weight * dispersed["disperse"]
    if cfg.repa_depth and not aligning and d.world_size > 1:
        # DDP waits for a gradient of every weight each step: the projectors, idle after --repa-steps, get zeros
        objective = objective + 0 * sum(p.sum() for head in projectors(run.model) for p in head.parameters())
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(objective).backward()  # DDP / FSDP average the gradients over ranks: the global batch's mean
    run.scaler.unscale_(run.opt)
    grad_norm = distributed.full(torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip))
    # One all-reduce: the global batch's losses, and whether any rank got SIGINT / SIGTERM (all stop together).
    disperse = dispersed["disperse"] if cfg.disperse_depth else torch.zeros((), device=d.device)
    stats = torch.stack([loss, terms["mse"].mean(), terms["vb"].mean(), align, disperse]).detach().float()
    stats = d.mean(torch.cat([stats, stats.new_tensor([stop_requested])]))
    # A NaN or inf in any gradient makes the norm clip_grad_norm_ computed non-finite: no update this step. The
    # fused AdamW reads `found_inf` on the device and leaves weights, moments and its step count as they are
    # (the mechanism GradScaler uses; with fp16 the scaler sets it from the gradients itself). CAME has no such
    # input: there the host reads `updated` (one sync a step).
    updated = torch.isfinite(stats[0]) & torch.isfinite(grad_norm)
    if cfg.optimizer == "adamw":
        run.opt.found_inf = (~updated).float()
        run.scaler.step(run.opt)
    elif updated.item():
        run.scaler.step(run.opt)
    update_ema(run.ema_params, run.params, cfg.ema_decay, step, updated)
    run.scaler.update()  # fp16: a skipped step lowers the loss scale
    run.sched.step()  # the learning rate stays a function of the step
    return torch.stack([stats[0], stats[1], stats[2], grad_norm.float(), updated.float(), stats[5], stats[3],
                        stats[4]]).detach()


def read_records(run: Run, records: list[tuple[int, torch.Tensor]], bad_run: int, log) -> tuple[list, int]:
    """Read the steps' device records at once (note: .tolist() is the host sync of the loop, once per logging
    step) and account for them in step order: skipped steps counted and reported, --max-bad-steps enforced.
    Returns ([(step, {loss, mse, vb, (--repa-depth) align, (--disperse-depth) disperse, grad_norm, stop}) ...], the
    skipped steps in a row now)."""
    if not records:
        return [], bad_run
    values = torch.stack([r for _, r in records]).tolist()
    cfg, out = run.cfg, []
    for (done, _), (loss, mse, vb, grad_norm, updated, stop, align, disperse) in zip(records, values):
        if updated:
            bad_run = 0
        else:
            run.skipped, bad_run = run.skipped + 1, bad_run + 1
            log(f"step {done}: loss {loss}, gradient norm {grad_norm}: skipped, no update ({bad_run} in a row)")
            if cfg.max_bad_steps and bad_run >= cfg.max_bad_steps:
                raise FloatingPointError(
                    f"stopping at step {done}: steps {done - bad_run + 1} to {done} all had a non-finite loss or "
                    f"gradient norm (--max-bad-steps {cfg.max_bad_steps}). The last good checkpoint is "
                    f"{latest_checkpoint(run.run_dir) or 'none yet'}; resume from it with a lower --lr or "
                    "--grad-clip, or check the data")
        out.append((done, {"loss": loss, "mse": mse, "vb": vb, **({"align": align} if run.align else {}),
                           **({"disperse": disperse} if cfg.disperse_depth else {}), "grad_norm": grad_norm,
                           "stop": stop > 0}))
    return out, bad_run


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, device: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) one stage; returns the summary that is also written to summary.json, or, stopped early by
    SIGINT / SIGTERM, {"interrupted": True, "steps" done, "checkpoint", "resume": the command that continues}.
    Under torchrun (WORLD_SIZE > 1 in the environment) this process trains its slice of every batch; device None
    picks cuda:LOCAL_RANK when there is CUDA."""
    tracking.require(cfg.report_to)  # a missing package fails here, before anything is written
    d = distributed.setup(device)
    matmul_precision = torch.get_float32_matmul_precision()
    if d.device.type == "cuda":  # what stays fp32 (all of it with --precision fp32) runs its matmuls on TF32
        torch.set_float32_matmul_precision("high")
    finished = False
    try:
        with StopSignals() as stop, claimed(Path(cfg.out) / f"stage{cfg.stage}") if d.main else nullcontext():
            summary = _train(cfg, d, progress and d.main, stop)
        finished = True
        return summary
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        d.close(finished)


def _train(cfg: TrainConfig, d: distributed.Dist, progress: bool, stop: StopSignals) -> dict:
    log = (tqdm.write if progress else print) if d.main else (lambda *a: None)
    run = setup(cfg, d, log)
    if run.start >= cfg.steps:
        return _already_done(run, log)
    n_params = sum(p.numel() for p in run.model.parameters())
    parallel = f", {d.world_size} processes ({'FSDP2' if cfg.fsdp else 'DDP'})" if d.world_size > 1 else ""
    precision = str(run.autocast).removeprefix("torch.") + " autocast" if run.autocast else "fp32"
    log(f"stage {cfg.stage}: {type(run.model).__name__} {cfg.model} ({n_params / 1e6:.2f} M parameters) on "
        f"{d.device}{parallel}, {cfg.steps} steps x {cfg.batch_size} images, {precision}, "
        f"data {cfg.data or 'embedded'}")

    guides = {}  # --guide-step's EMA, loaded at the first validation after that step

    def save(step: int, seconds: float) -> Path:  # seconds: the run's training time so far, every process's
        return save_checkpoint(run.run_dir, step, run.model, run.ema, run.opt, run.sched, run.skipped, cfg, d,
                               run.base, seconds, getattr(run.data, "text", None))

    # rank 0: --report-to's tracker, resumed at run.start, and on a GPU of the table the MFU counter
    tracker = tracking.open_tracker(cfg.report_to, run.run_dir, cfg, run.start, log) if d.main else tracking.Tracker()
    encoder = run.align.encoder.config if run.align is not None and run.align.encoder is not None else None
    mfu = tracking.MFU.on(d.device, d.world_size, cfg, run.model.config, run.stage.class_conditional, encoder,
                          log) if d.main else None

    def track_scores(step: int, scores: dict) -> None:  # rank 0: validation scores and grid to the tracker
        png = run.run_dir / "samples" / f"step-{step:07d}.png"
        tracker.log(step, {f"val/{k}": v for k, v in scores.items()}, {"val/samples": png} if png.exists() else None)

    bar = tqdm(total=cfg.steps, initial=run.start, disable=not progress, desc=f"stage {cfg.stage}", unit="step")
    t_start = t_log = time.time()
    done, saved_at, bad_run, last, records = run.start, None, 0, {}, []  # bad_run: skipped steps in a row
    run.model.train()
    steps = range(run.start, cfg.steps)
    # Batches built by background threads pay off when the step runs on a GPU; on a CPU the threads compete with
    # the step for its cores (measured: 10-15 % fewer images/s on 2 cores), so there they are built in line.
    if d.device.type == "cuda":
        batches = prefetch(lambda s: step_batch(run, s), steps, depth=PREFETCH_DEPTH, workers=PREFETCH_WORKERS,
                           pin_memory=True)
    else:
        batches = nullcontext((s, step_batch(run, s)) for s in steps)
    with open(run.run_dir / "metrics.jsonl", "a") if d.main else nullcontext() as metrics, batches as batches, \
            tracker:
        for step, batch in batches:
            records.append((step + 1, train_step(run, step, stop.received is not None, batch)))
            if mfu is not None:
                mfu.add(step, batch)
            done = step + 1
            bar.update(1)
            logging = done % cfg.log_every == 0 or done == cfg.steps
            saving = done % cfg.save_every == 0 and done < cfg.steps
            sampling = cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps
            # The host reads the device's numbers only here. Every rank reaches the same steps (a collective may
            # follow); a single process also stops at once on a signal.
            if not (logging or saving or sampling or (d.world_size == 1 and stop.received)):
                continue
            steps_read, bad_run = read_records(run, records, bad_run, log)
            # stop: a signal some rank reported (all ranks see the same records), or this single process's own,
            # received during the step just done
            stopping = any(r["stop"] for _, r in steps_read) or (d.world_size == 1 and stop.received is not None)
            records = []
            last = {"step": done, **{k: v for k, v in steps_read[-1][1].items() if k != "stop"},
                    "lr": run.sched.get_last_lr()[0], "skipped_steps": run.skipped}
            if d.main and logging:
                now = time.time()
                full = done % cfg.log_every == 0  # images/s over a whole logging interval only
                last["img_per_s"] = cfg.log_every * cfg.batch_size / max(now - t_log, 1e-9) if full else None
                t_log = now
                if mfu is not None:
                    last["mfu"] = mfu.take(last["img_per_s"])
                metrics.write(json.dumps(last) + "\n")
                tracker.log(done, {f"train/{k}": v for k, v in last.items() if k != "step"})
                metrics.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.1e}",
                                img_s=f"{last['img_per_s']:.1f}" if last["img_per_s"] else "-")
            if saving:
                save(done, run.seconds + time.time() - t_start)
                saved_at = done
            if stopping:  # a stop signal reached some rank: every rank stops after this same step
                break
            if sampling:
                scores = validate(run, done, guides)
                if d.main:
                    metrics.write(json.dumps({"step": done, "val": scores}) + "\n")
                    track_scores(done, scores)
                guided = f" (autoguided by step {cfg.guide_step})" if cfg.guide_step and done > cfg.guide_step else ""
                log(f"step {done}: EMA{guided} " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()
                                                             if isinstance(v, float)))
            if saving or sampling:
                t_log = time.time()  # images/s counts training steps, not checkpoints or validation
        bar.close()
        train_time = run.seconds + time.time() - t_start  # over every process that trained this run
        final = run.run_dir / "checkpoints" / f"step-{done:07d}" if saved_at == done else save(done, train_time)
        if done < cfg.steps:  # stopped by a signal
            command = resume_command(cfg)
            log(f"{stop.received or 'a stop signal (to another process)'}: stopped after step {done} of "
                f"{cfg.steps}, checkpoint {final}. Resume with:\n  {command}")
            return {"stage": cfg.stage, "model": cfg.model, "steps": done, "interrupted": True,
                    "checkpoint": str(final), "skipped_steps": run.skipped, "resume": command}
        scores = validate(run, cfg.steps, guides)
        if d.main:
            metrics.write(json.dumps({"step": cfg.steps, "val": scores}) + "\n")
            track_scores(cfg.steps, scores)
    return _summary(run, scores, train_time, last, final, log)


def validate(run: Run, step: int, guides: dict) -> dict:
    """The EMA model's validation scores at `step`, on every rank (a sharded EMA needs all of them; rank 0 writes
    the sample grid), autoguided after --guide-step by the run's checkpoint of that step; `guides` caches that
    checkpoint's model for the run's later validations."""
    cfg, d = run.cfg, run.dist
    png = run.run_dir / "samples" / f"step-{step:07d}.png" if d.main else None
    if not cfg.guide_step or step <= cfg.guide_step:
        return run.data.evaluate(run.ema, run.stage, cfg, run.diffusion, d.device, png)
    if "guide" not in guides:
        guides["guide"] = load_guide(guide_checkpoint(run.run_dir, cfg.guide_step), run.ema, cfg.prediction, d.device)
    return run.data.evaluate(run.ema, run.stage, cfg, run.diffusion, d.device, png, guides["guide"], cfg.guide_weight)


def _already_done(run: Run, log) -> dict:
    """A run resumed at its last step (a finished run started again): nothing is trained or rewritten. Its
    summary.json is returned as it is; one missing (the run was stopped during its final evaluation) is written
    from the checkpoint and metrics.jsonl. A checkpoint past --steps is the user's to sort out."""
    cfg, path = run.cfg, run.run_dir / "summary.json"
    checkpoint = latest_checkpoint(run.run_dir)
    if run.start > cfg.steps:
        raise UserError(f"--steps {cfg.steps}, but the run is already at step {run.start} ({checkpoint}): pass "
                        f"--steps {run.start} or more to go on, or another --out for a new run")
    summary = json.loads(path.read_text()) if path.exists() else {}
    if summary.get("steps") == cfg.steps:
        log(f"stage {cfg.stage}: the run is complete ({cfg.steps} steps, {checkpoint}); nothing to do. Its summary: "
            f"{path}")
        return summary
    losses = [r["loss"] for r in map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r] if (run.run_dir / "metrics.jsonl").exists() else []
    scores = validate(run, cfg.steps, {})
    return _summary(run, scores, run.seconds, {"loss": losses[-1]} if losses else {}, checkpoint, log)


def _summary(run: Run, scores: dict, train_time: float, last: dict, final: Path, log) -> dict:
    """Write summary.json (rank 0) and say how the run ended; returns the summary."""
    cfg = run.cfg
    png = run.run_dir / "samples" / f"step-{cfg.steps:07d}.png"
    summary = {"stage": cfg.stage, "model": cfg.model, "steps": cfg.steps, "batch_size": cfg.batch_size,
               "world_size": run.dist.world_size, "train_seconds": round(train_time, 1), "final_loss": last.get("loss"),
               "skipped_steps": run.skipped, "ema_alignment_accuracy": scores.get("accuracy"), "ema_scores": scores,
               "checkpoint": str(final), "samples": str(png) if run.data.draws_samples else None}
    text = getattr(run.data, "text", None)
    if text is not None and text.training_flops:  # what training the embedded T5 on caption text cost, before step 1
        summary.update(text_encoder_flops=text.training_flops, text_encoder_seconds=round(text.training_seconds, 1))
    if run.dist.main:
        with atomic_path(run.run_dir / "summary.json") as tmp:  # JSON has no NaN: a non-finite number is null
            tmp.write_text(json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n")
    samples = f"; samples {png}" if run.data.draws_samples else ""
    log(f"stage {cfg.stage} done in {train_time:.0f} s: {run.data.describe(scores, cfg, run.stage)}; "
        f"checkpoint {final}{samples}")
    return summary


def _finite(value):
    """value with every non-finite float (NaN, inf) inside it replaced by None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
