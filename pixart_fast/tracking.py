"""Training curves where a team can watch them: `--report-to tensorboard|wandb|none` (pip install 'pixart_fast[track]').

    tensorboard  event files in <out>/stage<N>/tensorboard/ (watch them with `tensorboard --logdir <out>`)
    wandb        a Weights & Biases run, its local files in <out>/stage<N>/wandb/. Online when WANDB_MODE says
                 so, or when wandb finds a login (WANDB_API_KEY, `wandb login`) and its server answers;
                 otherwise offline (upload later with `wandb sync <out>/stage<N>/wandb/offline-run-*`).
                 WANDB_MODE, WANDB_PROJECT (default pixart_fast) and WANDB_ENTITY are wandb's own.

Only rank 0 writes. Logged: what metrics.jsonl holds (train/loss, mse, vb, grad_norm, lr, img_per_s,
skipped_steps, and on a GPU of pixart_fast.gpus' table train/mfu), the validation scores (val/...) and sample
grids (val/samples), and the run's config.

A resumed run continues the same curves, as metrics.jsonl is trimmed to the resume step:
- TensorBoard: the resumed process's event file starts with a purge at the resume step + 1, so TensorBoard's
  reader drops what the stopped process had logged past its checkpoint, and shows this process's steps instead.
- W&B: the same run (its id is kept in <out>/stage<N>/wandb-run.json, with the last step handed to it),
  continued. W&B's steps only increase, so steps it already holds are not logged again: those the stopped
  process logged past its checkpoint keep their values there (the resumed run retrains them bit-identically).
"""
import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from pixart_fast.cli import UserError
from pixart_fast.files import atomic_path
from pixart_fast.flops import flops_per_image
from pixart_fast.gpus import GPUS, gpu_key

WANDB_STATE = "wandb-run.json"


def require(report_to: str) -> None:
    """UserError naming the pip command when --report-to's package (tensorboard, wandb) is not installed."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise UserError(f"--report-to {report_to} needs the {report_to} package: pip install 'pixart_fast[track]' "
                        f"(or pip install {report_to})")


def _numbers(values: dict) -> dict:
    """The int and float values of `values` (None, text and nested values left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """What the loop calls; this base writes nothing (--report-to none, and every rank but 0)."""

    def log(self, step: int, values: dict, images: dict | None = None) -> None:
        """Step `step`'s numbers of `values` ({name: value}; others ignored) and images ({name: PNG path})."""

    def close(self, failed: bool = False) -> None:
        """Flush and close; failed: the run ended with an error."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path, config: dict, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: the reader hides every event of earlier files from step start + 1 on
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", start)
        self.writer.flush()

    def log(self, step, values, images=None):
        for name, value in _numbers(values).items():
            self.writer.add_scalar(name, value, step)
        for name, path in (images or {}).items():
            self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()  # watched while it runs; a killed process loses nothing it logged

    def close(self, failed=False):
        self.writer.close()


def wandb_mode(log=print) -> str | None:
    """The W&B mode: None where WANDB_MODE is set (wandb reads it itself); "online" where wandb finds a login
    and its server accepts it; else "offline", saying why when there is a login."""
    import wandb

    if os.environ.get("WANDB_MODE"):
        return None
    try:  # False: no login; a login is checked with its server (WANDB_HTTP_TIMEOUT seconds, default 10)
        return "online" if wandb.login(prompt=False, verify=True) else "offline"
    except wandb.errors.CommError as e:  # no network, or the key is refused
        log(f"W&B: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; logging offline")
        return "offline"


class WandB(Tracker):
    def __init__(self, run_dir: Path, config: dict, start: int, log=print):
        import wandb

        self.state = run_dir / WANDB_STATE
        saved = json.loads(self.state.read_text()) if start and self.state.exists() else {}
        self.held = saved.get("step", 0)  # W&B holds this run's steps up to here: not logged again
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pixart_fast"), dir=str(run_dir),
                              id=saved.get("id"), resume="allow", config=config, allow_val_change=True,
                              mode=wandb_mode(log), name=f"{Path(config['out']).name}/stage{config['stage']}")
        if self.held > start:
            log(f"W&B run {self.run.id} holds steps up to {self.held}; this process logs to it from step "
                f"{self.held + 1} on")
        self._save(start)

    def _save(self, step: int) -> None:
        with atomic_path(self.state) as tmp:
            tmp.write_text(json.dumps({"id": self.run.id, "step": max(step, self.held)}) + "\n")

    def log(self, step, values, images=None):
        if step <= self.held:
            return
        import wandb

        data = _numbers(values) | {name: wandb.Image(str(path)) for name, path in (images or {}).items()}
        self.run.log(data, step=step)
        self._save(step)

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


def open_tracker(report_to: str, run_dir: Path, cfg, start: int, log=print) -> Tracker:
    """The tracker of --report-to for rank 0 of a run at step `start` (0: a new run; > 0: resumed there)."""
    require(report_to)
    config = asdict(cfg)
    if report_to == "tensorboard":
        return TensorBoard(run_dir, config, start)
    if report_to == "wandb":
        return WandB(run_dir, config, start, log)
    return Tracker()


class MFU:
    """Model-FLOP utilisation: images/s times the training FLOPs of an image (pixart_fast.flops, counted from
    each step's batch shape, token masking and routing as they ran, representation alignment's share and the
    dispersive loss's, averaged over the steps since the last reading), over the dense bf16 peak of every
    process's GPU. Only on a GPU of pixart_fast.gpus' table. repa_encoder: --repa-encoder's transformers config (None without one)."""

    def __init__(self, cfg, model_config, class_conditional: bool, peak_flops: float, repa_encoder=None):
        self.cfg, self.config, self.class_conditional = cfg, model_config, class_conditional
        self.peak, self.repa_encoder = peak_flops, repa_encoder
        self.flops, self.images, self._per_image = 0, 0, {}

    @classmethod
    def on(cls, device, world_size: int, cfg, model_config, class_conditional: bool, repa_encoder=None,
           log=print) -> "MFU | None":
        """An MFU counter for a run on `device` with world_size processes, each on a GPU like it; None off CUDA
        or on a GPU the table does not have (logged)."""
        if device.type != "cuda":
            return None
        import torch

        props = torch.cuda.get_device_properties(device)
        key = gpu_key(props.name, props.total_memory)
        if key is None:
            log(f"{props.name} is not in pixart_fast.gpus' table: no MFU is logged")
            return None
        return cls(cfg, model_config, class_conditional, GPUS[key].tflops * 1e12 * world_size, repa_encoder)

    def add(self, step: int, batch) -> None:
        """Count step `step`: its global batch, --batch-size images shaped like this rank's `batch`."""
        cfg = self.cfg
        masked = cfg.mask_ratio > 0 and step < cfg.steps - cfg.unmasked_steps
        tokens = None if batch.text is None else batch.text.shape[1]
        routing = cfg.routing(step, self.config.depth)
        shape = (*batch.images.shape[2:], tokens, masked, routing, cfg.aligns(step))
        if shape not in self._per_image:
            ratio, blocks = routing or (0.0, None)
            self._per_image[shape] = flops_per_image(
                self.config, shape[0], shape[1], vae_downsample=1, caption_tokens=tokens,
                class_conditional=self.class_conditional, mask_ratio=cfg.mask_ratio if masked else 0.0,
                route_ratio=ratio, route_blocks=blocks,
                repa_depth=cfg.repa_depth if cfg.aligns(step) else 0, repa_second_depth=cfg.repa_second_depth,
                repa_target_depth=cfg.repa_target_depth, repa_projector_dim=cfg.repa_projector_dim,
                repa_encoder=self.repa_encoder, repa_truth=cfg.repa_truth, disperse_depth=cfg.disperse_depth,
                batch_size=batch.images.shape[0])  # the dispersive loss's batch: this rank's
        self.flops += cfg.batch_size * self._per_image[shape]
        self.images += cfg.batch_size

    def take(self, images_per_s: float | None) -> float | None:
        """The MFU at `images_per_s` (None: None) of the images counted since the last call; starts anew."""
        flops, images, self.flops, self.images = self.flops, self.images, 0, 0
        return None if images_per_s is None or not images else images_per_s * flops / images / self.peak
