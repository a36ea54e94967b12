"""The three stages of PixArt-alpha training (paper section 2.1) as objects, and the two kinds of data they train on.

A stage says what model it builds, what data it trains and validates on, how a batch conditions the model, how
the model is judged, and where it starts from. The loop (train/loop.py) asks the stage; it never tests the stage
number or the kind of data.

    STAGES[1]  ClassConditional  a class-conditional DiT: pixel dependency
    STAGES[2]  TextConditional   PixArt on captioned scenes: text-image alignment, from stage 1 (re-parameterized)
    STAGES[3]  TextConditional   PixArtMS on multi-aspect scenes, micro-conditions: aesthetics, from stage 2

Data, one interface (`len`, `bucket_ids()`, `batch(indices) -> Batch`, `evaluate(...)`) in two kinds:
    EmbeddedData  the embedded procedural sets: every caption's truth is known, so the EMA model's samples of the
                  held-out captions are scored (pixart_fast.eval) and drawn beside their ground truth
    FeatureData   extracted VAE latents and T5 features (--data): judged by the EMA model's validation loss
"""
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pixart_fast import data as embedded
from pixart_fast.batch import Batch
from pixart_fast.checkpoints import checkpoint_file, load_into, stored_text_encoder, training_metadata
from pixart_fast.cli import UserError
from pixart_fast.diffusion import Diffusion
from pixart_fast.eval import alignment_scores
from pixart_fast.features import FeatureDataset
from pixart_fast.shards import open_features
from pixart_fast.grid import image_grid
from pixart_fast.loader import to_device
from pixart_fast.model import CONFIGS, DiT, PixArt
from pixart_fast.text import TextEncoder
from .recipes import TrainConfig
from .run_folder import newest_intact_checkpoint

VAL_SEED = 1234  # the held-out noise (and, for features, latent samples and timesteps): the same at every evaluation


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------


class Stage:
    """What the stages share: the model config, the data, where a stage starts from. Subclasses say the rest."""

    number: int
    previous: int | None  # the stage whose newest EMA weights this one starts from, when they exist
    held_out: str  # what the held-out set is made of, for messages: "classes" or "captions"
    class_conditional: bool  # conditioned on class labels (features must carry them), not captions

    def model_config(self, cfg: TrainConfig):
        if cfg.model not in CONFIGS:
            raise UserError(f"unknown model {cfg.model!r}; choose one of {sorted(CONFIGS)}")
        return replace(CONFIGS[cfg.model], class_dropout_prob=cfg.caption_dropout)

    def embedded_set(self, cfg: TrainConfig, size: int, seed: int, split: str, length: int = 100_000):
        """The stage's procedural dataset (pixart_fast.data); split "val" is the held-out stream."""
        raise NotImplementedError

    def text_encoder(self, cfg: TrainConfig, model, source: Path | None = None) -> TextEncoder | None:
        """What turns the embedded captions into caption features (None: the stage reads no captions). source: the
        checkpoint the run resumes or starts from; the trained embedded T5 it keeps is loaded rather than trained
        again, where the run asks for the same encoder."""
        return None

    def data(self, cfg: TrainConfig, model, source: Path | None = None) -> "EmbeddedData | FeatureData":
        """The training data: the embedded sets, or the extracted features of --data after checking they fit.
        source: the checkpoint the run resumes or starts from (see text_encoder)."""
        if cfg.data is None:
            size = model.config.input_size
            return EmbeddedData(self.embedded_set(cfg, size, cfg.seed, "train"),
                                self.embedded_set(cfg, size, 0, "val", cfg.num_val),
                                self.text_encoder(cfg, model, source))
        if cfg.t5 is not None:
            raise UserError(f"--t5 {cfg.t5} encodes the embedded captions; the features in --data {cfg.data} hold "
                             "their captions' T5 features already: drop --t5")
        features = open_features(cfg.data, cfg.data_cache)
        features.check_model(model.config, cfg.model, class_conditional=self.class_conditional)
        return FeatureData(features)

    def init_source(self, cfg: TrainConfig, log=print) -> Path | None:
        """The weights a new run starts from: --init, else the previous stage's newest intact EMA weights under
        --out, else None (from scratch)."""
        if cfg.init:
            if not Path(cfg.init).exists():
                raise UserError(f"--init {cfg.init}: no such file or folder; pass a checkpoint (ours, an official "
                                ".pth, a DiT .pt) or a diffusers folder")
            return Path(cfg.init)
        if self.previous is None:
            return None
        folder = newest_intact_checkpoint(Path(cfg.out) / f"stage{self.previous}", log, flag="previous stage's output")
        return None if folder is None else folder / "ema.safetensors"

    def initialise(self, model, path: Path | None, cfg: TrainConfig) -> str:
        """Load the weights at `path` (from `init_source`; None: leave the fresh ones) into model; returns a line
        saying what was done."""
        if path is None:
            return "no previous stage output and no --init: training from scratch"
        return load_into(model, path, seed=cfg.seed, source=f"--init {path}")

    def build_model(self, cfg: TrainConfig) -> torch.nn.Module:
        raise NotImplementedError

    def condition(self, net, batch: Batch, drop: torch.Tensor, micro_conditions: bool):
        """model_fn(x_t, t) for one batch, its conditions replaced by the null ones where drop (B,) is True."""
        raise NotImplementedError

    def guided(self, ema, batch: Batch, scale: float, micro_conditions: bool, guide=None, guide_weight: float = 0.0):
        """eps_fn(x, t) with classifier-free guidance over the batch's conditions, for sampling; guide: a weaker
        model of the same kind, for autoguidance by guide_weight (`pixart_fast.diffusion.guided`)."""
        raise NotImplementedError

    def tile_captions(self, batch: Batch) -> list[str]:
        """What a validation grid writes under each of the batch's samples."""
        raise NotImplementedError


class ClassConditional(Stage):
    """Stage 1: a class-conditional DiT on shape x colour classes (the paper's ImageNet stage)."""

    number, previous, held_out, class_conditional = 1, None, "classes", True

    def embedded_set(self, cfg, size, seed, split, length=100_000):
        return embedded.ShapeClasses(length, seed, split, size=size, scenes=cfg.stage1_scenes)

    def build_model(self, cfg):
        mcfg = self.model_config(cfg)
        if mcfg.micro_conditions:
            raise UserError(f"stage 1 trains a class-conditional DiT; {cfg.model} has micro-conditions")
        if mcfg.pixel_decoder:
            raise UserError(f"stage 1 trains a class-conditional DiT, without a pixel decoder; {cfg.model} has one")
        return DiT(mcfg, kernels=cfg.kernels, recompute=cfg.recompute)

    def condition(self, net, batch, drop, micro_conditions):
        return lambda xt, tt: net(xt, tt, batch.labels, force_drop_ids=drop)

    def guided(self, ema, batch, scale, micro_conditions, guide=None, guide_weight=0.0):
        if guide is not None:
            raise UserError("autoguidance is for the text-conditional stages (2 and 3), not stage 1's DiT")
        return lambda x, t: ema.forward_with_cfg(x, t, batch.labels, scale)

    def tile_captions(self, batch):
        return [embedded.CLASS_NAMES[label] for label in batch.labels.tolist()]


class TextConditional(Stage):
    """Stages 2 and 3: PixArt conditioned on T5 caption features (and, for PixArtMS, the micro-conditions)."""

    held_out, class_conditional = "captions", False

    def __init__(self, number: int, embedded_kind):
        self.number, self.previous, self._embedded_kind = number, number - 1, embedded_kind

    def embedded_set(self, cfg, size, seed, split, length=100_000):
        objects = cfg.objects if split == "train" else embedded.OBJECTS  # the held-out scenes are scored
        if self._embedded_kind is embedded.AspectScenes:  # multi-aspect: its buckets set the sizes
            return embedded.AspectScenes(length, seed, split, objects=objects)
        return self._embedded_kind(length, seed, split, size=size, objects=objects)

    def text_encoder(self, cfg, model, source=None):
        length = model.config.max_tokens  # the caption length the model's null caption has (Σ: 300)
        recorded = training_metadata(checkpoint_file(Path(source))) if source is not None else {}
        same = all(recorded.get(k) == getattr(cfg, k) for k in ("tokenizer", "t5_locality", "t5_train_steps"))
        stored = stored_text_encoder(source) if same and cfg.t5_train_steps and not cfg.t5 else None
        text = (TextEncoder.from_pretrained(cfg.t5, max_length=length) if cfg.t5 else
                TextEncoder.embedded(tokenizer=cfg.tokenizer, max_length=length, locality=cfg.t5_locality,
                                     train_steps=cfg.t5_train_steps, weights=stored))
        if text.caption_channels != model.config.caption_channels:
            raise UserError(f"text encoder gives {text.caption_channels}-dim features but {cfg.model} expects "
                             f"{model.config.caption_channels}; pick a matching --model or --t5")
        return text

    def build_model(self, cfg):
        return PixArt(self.model_config(cfg), kernels=cfg.kernels, recompute=cfg.recompute)

    def condition(self, net, batch, drop, micro_conditions):
        extra = _micro(batch) if micro_conditions else {}
        return lambda xt, tt: net(xt, tt, batch.text, batch.mask, force_drop_ids=drop, **extra)

    def guided(self, ema, batch, scale, micro_conditions, guide=None, guide_weight=0.0):
        extra = _micro(batch) if micro_conditions else {}
        return lambda x, t: ema.forward_with_cfg(x, t, batch.text, batch.mask, scale, **extra, guide=guide,
                                                 guide_weight=guide_weight)

    def tile_captions(self, batch):
        return batch.captions


def _micro(batch: Batch) -> dict:
    return {"img_hw": batch.img_hw, "aspect_ratio": batch.aspect_ratio}


STAGES = {1: ClassConditional(), 2: TextConditional(2, embedded.ShapeScenes),
          3: TextConditional(3, embedded.AspectScenes)}


# ----------------------------------------------------------------------------------------------------------
# Data: two implementations of one interface
# ----------------------------------------------------------------------------------------------------------


def _by_bucket(bucket_ids: np.ndarray | None, n: int) -> list[list[int]]:
    """Indices 0..n-1 grouped by bucket, buckets in order of first appearance (one group without buckets)."""
    if bucket_ids is None:
        return [list(range(n))]
    groups = {}
    for i in range(n):
        groups.setdefault(int(bucket_ids[i]), []).append(i)
    return list(groups.values())


class EmbeddedData:
    """A stage's embedded procedural sets, training and held-out; captions become caption features here."""

    draws_samples = True  # evaluate() draws the EMA model's samples into a grid

    def __init__(self, train, val, text: TextEncoder | None):
        self.train, self.val, self.text = train, val, text

    def __len__(self) -> int:
        return len(self.train)

    def bucket_ids(self) -> np.ndarray | None:
        return self.train.bucket_ids()

    def batch(self, indices, pin_memory: bool = False) -> Batch:  # pin_memory: the prefetcher pins it
        batch = self.train.batch(indices)
        if self.text is None:
            return batch
        text, mask = self.text.encode(batch.captions)
        return replace(batch, text=text, mask=mask)

    def _held_out_batches(self) -> list[Batch]:
        batches = []
        for group in _by_bucket(self.val.bucket_ids(), len(self.val)):  # one batch per aspect-ratio bucket
            batch = self.val.batch(group)
            if self.text is not None:
                text, mask = self.text.encode_cached(batch.captions)
                batch = replace(batch, text=text, mask=mask)
            batches.append(batch)
        return batches

    @torch.no_grad()
    def evaluate(self, ema, stage: Stage, cfg: TrainConfig, diffusion: Diffusion, device, png: Path | None,
                 guide=None, guide_weight: float = 0.0) -> dict:
        """Sample the held-out set with the EMA model (DPM-Solver++, or Euler for a flow model; CFG, and
        autoguidance by `guide` where given), save the grid to png (None: do not save; other ranks) and return the
        alignment scores (accuracy, colour, position, shape, size, each with its chance level, and background; see
        pixart_fast.eval).
        The grid shows each sample beside its ground-truth render above its caption (stage 1: the class name)."""
        g = torch.Generator().manual_seed(VAL_SEED)
        images, truths, clean, captions = [], [], [], []
        for batch in self._held_out_batches():
            noise = torch.randn(batch.images.shape, generator=g).to(device)
            eps_fn = stage.guided(ema, batch.to(device), cfg.cfg_scale, ema.config.micro_conditions, guide,
                                  guide_weight)
            # Pixel space: the data range [-1, 1] is known, so x0 predictions are clipped to it.
            images += list(diffusion.sample(eps_fn, noise, steps=cfg.sample_steps, clip_x0=True).float().cpu())
            truths += batch.truths
            clean += list(batch.images)
            captions += stage.tile_captions(batch)
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
            # one tile per pair, sample | truth, with a 2-pixel black gap (-1 is black)
            pairs = [torch.cat([im, torch.full((3, im.shape[1], 2), -1.0), truth.float()], dim=2)
                     for im, truth in zip(images, clean)]
            image_grid(pairs, captions, cols=4).save(png)
        return alignment_scores(images, truths)

    def describe(self, scores: dict, cfg: TrainConfig, stage: Stage) -> str:
        chance = scores.get("accuracy_chance")
        versus = f" (chance {chance:.3f})" if chance is not None else ""
        return f"EMA alignment accuracy {scores['accuracy']:.3f}{versus} on {cfg.num_val} held-out {stage.held_out}"


class FeatureData:
    """Extracted features (--data): VAE latent distributions, T5 caption features, micro-conditions."""

    draws_samples = False  # real images have no known truth to score samples against: a validation loss instead

    def __init__(self, features: FeatureDataset):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def bucket_ids(self) -> np.ndarray:
        return self.features.bucket_ids()

    def batch(self, indices, pin_memory: bool = False) -> Batch:
        # T5 features as stored (bfloat16 from a GPU extraction: half the bytes to read, pad and copy);
        # pixart_fast.loader.to_device casts them to float32 on the device
        return self.features.batch(indices, text_dtype=None, pin_memory=pin_memory)

    @torch.no_grad()
    def evaluate(self, ema, stage: Stage, cfg: TrainConfig, diffusion: Diffusion, device, png: Path | None) -> dict:
        """{"val_loss": the EMA model's training loss on the first num_val samples}, with fixed latent samples,
        noise and timesteps and no caption dropped, so the number is comparable from step to step."""
        g = torch.Generator().manual_seed(VAL_SEED)
        total, count = 0.0, 0
        for group in _by_bucket(self.bucket_ids(), min(cfg.num_val, len(self))):  # one batch per bucket
            batch = self.batch(group)
            x0 = batch.x0(torch.randn(batch.images.shape, generator=g)).to(device)
            t = torch.randint(0, diffusion.num_timesteps, (len(group),), generator=g).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            keep = torch.zeros(len(group), dtype=torch.bool, device=device)
            model_fn = stage.condition(ema, to_device(batch, device), keep, ema.config.micro_conditions)
            total += diffusion.training_losses(model_fn, x0, t, noise)["loss"].sum().item()
            count += len(group)
        return {"val_loss": total / count}

    def describe(self, scores: dict, cfg: TrainConfig, stage: Stage) -> str:
        return f"EMA validation loss {scores['val_loss']:.4f} on {min(cfg.num_val, len(self))} samples of {cfg.data}"
