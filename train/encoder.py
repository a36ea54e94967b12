"""`python -m pixart_fast.train.encoder`: a DINOv2 trained on the embedded scenes, the target of representation
alignment (`--repa-encoder`) where no pretrained DINOv2 is at hand.

REPA aligns a diffusion transformer's hidden states with a frozen encoder's patch features; its encoders were
trained on natural images, which the embedded data is not. This is the embedded data's stand-in: a small
transformers `Dinov2Model` (so `--repa-encoder` loads it as any DINOv2), trained with a linear head to name, for
every pixel of each patch, the shape, size and colour of the object drawn there or the background
(`pixart_fast.data.pixel_truth`: the renderer's truth, supervised). Its patch features then carry what a sample
has to get right, and the network aligned to them is told, token by token, what the caption's object there is.
It reads images as `--repa-encoder` feeds them (`pixart_fast.align.encoder_pixels`).

Writes OUT/ (a transformers folder: config.json, model.safetensors; manifest.json) and OUT/encoder.json: the
settings, the training seconds and FLOPs (forward and backward, 3 x the forward; count them with the diffusion
run's when comparing recipes), and the per-pixel accuracy of each label on held-out scenes' object pixels beside
its chance (the most common class's share). The folder appears whole or not at all.

    python -m pixart_fast.train.encoder --out runs/encoder
    python -m pixart_fast.train --stage 2 --route-start 1 --repa-depth 1 --repa-encoder runs/encoder
"""
import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pixart_fast.align import encoder_pixels
from pixart_fast.cli import UserError, run
from pixart_fast.data import TRUTH_CLASSES, ShapeScenes, pixel_truth
from pixart_fast.files import fsync_dir, write_manifest
from pixart_fast.flops import encoder_forward_flops


@dataclass(frozen=True)
class EncoderConfig:
    out: str
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3  # AdamW, after a linear warm-up, then cosine to 0
    warmup: int = 50
    weight_decay: float = 0.01
    hidden_size: int = 96
    layers: int = 3
    heads: int = 3
    patch_size: int = 4  # the embedded stage-2 network's, so one encoder patch is one model token at 32 px
    size: int = 32
    seed: int = 0
    num_val: int = 256

    def __post_init__(self):
        for name in ("steps", "batch_size", "hidden_size", "layers", "heads", "patch_size", "num_val"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr {self.lr}: must be a finite number > 0")
        if self.hidden_size % self.heads:
            raise UserError(f"--hidden-size {self.hidden_size} does not split into --heads {self.heads}")
        if self.size % self.patch_size:
            raise UserError(f"--patch-size {self.patch_size} does not divide the {self.size}-px images")


def _collate(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([s["image"] for s in samples])
    return images, torch.from_numpy(np.stack([pixel_truth(s["truth"]) for s in samples]))


class LabelledEncoder(nn.Module):
    """The DINOv2 and its training head: images (B, 3, H, W) in [-1, 1] -> {label: (B, classes, H, W) logits},
    each patch's features mapped linearly to its pixels' classes."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        self.patch = cfg.patch_size
        self.config = Dinov2Config(image_size=cfg.size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                                   num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                   intermediate_size=4 * cfg.hidden_size)
        self.encoder = Dinov2Model(self.config)
        self.head = nn.Linear(cfg.hidden_size, cfg.patch_size ** 2 * sum(TRUTH_CLASSES.values()))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        B, _, H, W = images.shape
        p, gh, gw = self.patch, H // self.patch, W // self.patch
        features = self.encoder(pixel_values=encoder_pixels(images, p, (gh, gw))).last_hidden_state[:, 1:]
        logits = self.head(features).view(B, gh, gw, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)
        return dict(zip(TRUTH_CLASSES, logits.split(list(TRUTH_CLASSES.values()), 1)))


def training_flops(cfg: EncoderConfig, config) -> int:
    """FLOPs of the whole training run: each image forward and backward (3 x forward) through the encoder and
    its head."""
    grid = cfg.size // cfg.patch_size
    forward = sum(encoder_forward_flops(config, grid, grid).values())
    forward += 2 * grid * grid * cfg.hidden_size * cfg.patch_size ** 2 * sum(TRUTH_CLASSES.values())
    return 3 * forward * cfg.batch_size * cfg.steps


@torch.no_grad()
def evaluate(net: LabelledEncoder, cfg: EncoderConfig) -> dict[str, float]:
    """Per-pixel accuracy of each label on held-out scenes' object pixels, beside `<label>_chance`: the share of
    the most common class among them (what naming every pixel that class scores)."""
    net.eval()
    images, truth = _collate([ShapeScenes(length=cfg.num_val, seed=cfg.seed, split="val", size=cfg.size)[i]
                              for i in range(cfg.num_val)])
    logits, drawn = net(images), truth[:, 0] > 0
    scores = {}
    for k, (label, out) in enumerate(logits.items()):
        want = truth[:, k][drawn]
        scores[label] = round((out.argmax(1)[drawn] == want).float().mean().item(), 4)
        scores[f"{label}_chance"] = round(torch.bincount(want).max().item() / want.numel(), 4)
    net.train()
    return scores


def train_encoder(cfg: EncoderConfig, progress: bool = True) -> dict:
    """Train, evaluate and write the encoder folder (module docstring); returns what encoder.json holds.
    progress: a tqdm bar of the steps."""
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty; pass a new folder (an encoder is trained once and "
                        "then reused by every run that aligns to it)")
    torch.manual_seed(cfg.seed)
    net = LabelledEncoder(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * 0.5 * (
        1 + math.cos(math.pi * s / cfg.steps)))
    data = ShapeScenes(length=cfg.steps * cfg.batch_size, seed=cfg.seed, size=cfg.size)
    loader = DataLoader(data, batch_size=cfg.batch_size, collate_fn=_collate)
    start = time.perf_counter()
    with tqdm(loader, total=cfg.steps, desc="encoder", unit="step", dynamic_ncols=True,
              disable=not progress) as bar:
        for images, truth in bar:
            logits = net(images)
            loss = sum(F.cross_entropy(out, truth[:, k]) for k, out in enumerate(logits.values()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - start
    summary = {"config": asdict(cfg), "train_seconds": round(seconds, 1),
               "train_flops": training_flops(cfg, net.config), "val": evaluate(net, cfg)}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.encoder.save_pretrained(tmp)
    (tmp / "encoder.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_manifest(tmp)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixart_fast.train.encoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = EncoderConfig(out="")
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    for name, about in (("steps", "optimizer steps"), ("batch_size", "images per step"), ("lr", "peak AdamW lr"),
                        ("hidden_size", "the DINOv2's width"), ("layers", "its transformer layers"),
                        ("heads", "its attention heads"), ("seed", "seed of the weights and the training scenes")):
        value = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"{about} (default: {value})")
    args = p.parse_args(argv)
    summary = train_encoder(EncoderConfig(**vars(args)))
    val = summary["val"]
    print(f"encoder done in {summary['train_seconds']:.0f} s ({summary['train_flops']:.2e} FLOPs): per-pixel "
          + ", ".join(f"{k} {val[k]:.3f} (chance {val[k + '_chance']:.3f})" for k in TRUTH_CLASSES) + f"; {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
