"""Representation alignment: a training loss that pulls the hidden states after one of PixArt's blocks toward a
target representation of the same image, through a small trained projector. Three targets:

- self-alignment (SRA, arXiv 2505.02831; no pretrained encoder, so the embedded pixel data can use it): the EMA
  model's hidden states after a deeper block, computed without gradients on the student's caption, caption drop
  and kept tokens when masking (never routed). Its input is the student's own noisy image, or, as SRA gives it,
  the same clean image and noise draw at a timestep a little earlier (less noise; the trainer's
  --repa-target-offset draws how much earlier, per image, up to a fifth of the schedule in SRA).
- REPA (arXiv 2410.06940): a frozen DINOv2's patch features of the clean image. The image (pixels in [-1, 1])
  is mapped to [0, 1], resized (bicubic) so that the encoder's patch grid is the model's token grid (REPA's
  224 px for a 16 x 16 grid of patch-14 tokens), ImageNet-normalised, and the encoder's last hidden state
  (after its final LayerNorm) is read with the CLS token dropped: one target per model token, in the same
  row-major order. With masking the targets are taken at the kept tokens.
- the truth (embedded data only): what the renderer drew, per token the one-hot shape, size and colour classes of
  each of its pixels (`pixart_fast.data.pixel_truth`, the labels `python -m pixart_fast.train.encoder` teaches
  its encoder), flattened: REPA against an encoder that knows every pixel exactly, with no encoder to train or
  run. Real images carry no such truth; it measures alignment with an exact target.

The projector is REPA's MLP: Linear(D, P), SiLU, Linear(P, P), SiLU, Linear(P, Z), with D the model's hidden size, Z
the target's width (D for self-alignment, the encoder's hidden size for REPA, `truth_width` for the truth) and P its
width (REPA: 2048 at SiT-XL's D = 1152). The loss of an image is REPA's: the mean over its tokens of
-cos(projector(h), target), in [-1, 1]. The trainer attaches the projector to the model it trains (`PROJECTOR`), so
the optimizer, gradient clipping and the EMA treat it as any weight; checkpoints keep it in trainer.pt, not in the
weights files, so sampling and export never see it.

A second depth may be aligned to the same target through its own projector (`SECOND_PROJECTOR`); an image's loss
is then the sum of the two, in [-2, 2]. At a depth inside a routed run (after a block that only the routed tokens
ran) only the routed tokens are aligned: the others have not moved since they entered it.

The dispersive loss (arXiv 2506.09027, `Dispersion`) needs no target and no projector: it pushes the batch's images'
hidden states after one block apart (`dispersive_loss`), each image's whole token grid (never masked).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixart_fast.cli import UserError
from pixart_fast.data import TRUTH_CLASSES, pixel_truth
from pixart_fast.model import inside_routed_run, take_tokens

PROJECTOR = "align_projector"  # the trained model's attribute holding the projector (training only)
SECOND_PROJECTOR = PROJECTOR + "_second"  # and the second depth's
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def projector(hidden_size: int, width: int, out: int) -> nn.Sequential:
    """REPA's projector: (..., hidden_size) -> (..., out) through two SiLU layers of `width`."""
    return nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, out))


def alignment_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target (B, T, Z) -> (B,) float32: per image, the mean over its T tokens of -cos(pred, target)."""
    pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    return -(pred * target).sum(-1).mean(1)


def truth_width(patch_size: int) -> int:
    """The width of one token's truth target: its patch_size ** 2 pixels' one-hot classes (TRUTH_CLASSES)."""
    return patch_size ** 2 * sum(TRUTH_CLASSES.values())


def truth_targets(scenes: list, patch_size: int) -> torch.Tensor:
    """B embedded scenes (pixart_fast.data.Scene) -> (B, T, truth_width(patch_size)) float32: per token of the
    model's row-major grid, its pixels' one-hot shape, size and colour classes (pixel_truth), pixel by pixel."""
    labels = torch.from_numpy(np.stack([pixel_truth(s) for s in scenes]))  # (B, 3, H, W)
    onehot = torch.cat([F.one_hot(labels[:, k], n) for k, n in enumerate(TRUTH_CLASSES.values())], -1)
    B, H, W, K = onehot.shape
    p = patch_size
    tokens = onehot.view(B, H // p, p, W // p, p, K).permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, K)
    return tokens.reshape(B, (H // p) * (W // p), p * p * K).float()


def encoder_config(path: str):
    """The transformers config of the DINOv2 folder at `path`; UserError if it is not one."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--repa-encoder {path}: not a transformers model folder ({str(e).splitlines()[0]})") from None
    if config.model_type != "dinov2":
        raise UserError(f"--repa-encoder {path}: a {config.model_type} model; REPA here takes a DINOv2 (dinov2)")
    return config


def encoder_pixels(images: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> a DINOv2's pixel_values: mapped to [0, 1], resized (bicubic) to grid
    patches of patch_size pixels, ImageNet-normalised (module docstring)."""
    x = F.interpolate((images.float() + 1) / 2, size=(grid[0] * patch_size, grid[1] * patch_size), mode="bicubic",
                      align_corners=False)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


class FrozenEncoder(nn.Module):
    """A DINOv2 from a local folder, frozen: forward(images (B, 3, H, W) in [-1, 1], grid (gh, gw)) ->
    (B, gh * gw, Z) patch features, the image resized to gh x gw of the encoder's patches (module docstring)."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoModel

        self.config = encoder_config(path)
        self.encoder = AutoModel.from_pretrained(path, local_files_only=True).requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pixels = encoder_pixels(images, self.config.patch_size, grid)
        return self.encoder(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, gh gw, Z): the CLS token dropped


def ran_tokens(depth: int, levers: dict, hidden: torch.Tensor, target: torch.Tensor):
    """(hidden, target) (B, T, .) at `depth` blocks, cut to the tokens that ran the blocks before it: inside the
    levers' routed run (`inside_routed_run`) the routed ones, else all."""
    if "route" in levers and inside_routed_run(depth, levers["route_blocks"]):
        return take_tokens(hidden, levers["route"]), take_tokens(target, levers["route"])
    return hidden, target


DISPERSE_TEMPERATURE = 0.5  # the dispersive loss's tau (arXiv 2506.09027's InfoNCE-L2 default)


def dispersive_loss(hidden: torch.Tensor, distance: str = "l2", temperature: float = DISPERSE_TEMPERATURE
                    ) -> torch.Tensor:
    """hidden (B, T, D) -> () float32: the dispersive loss (InfoNCE, arXiv 2506.09027) of the batch's hidden states,
    each image's flattened: log of the mean over all B x B pairs (i = j included) of exp(-d / tau). distance "l2":
    d is the squared distance over T D (the paper's default; the states' scale is free, so growing them apart
    satisfies it); "cosine": d is minus the cosine similarity (scale-free). Both from the Gram matrix of one
    (B, T D) @ (T D, B) product, in float32 whatever the autocast (the L2 form from states less their batch mean,
    which leaves d as it is and cancels less). Lowest when the images' states lie far apart; no target, no weights."""
    with torch.autocast(hidden.device.type, enabled=False):
        z = hidden.float().flatten(1)
        if distance == "cosine":
            z = F.normalize(z, dim=1)
            d = -(z @ z.T)
        else:
            z = z - z.mean(0)
            norms = z.pow(2).sum(1)
            d = (norms[:, None] + norms[None] - 2 * z @ z.T).clamp(min=0) / z.shape[1]
            d = d * (1 - torch.eye(len(z), device=z.device))  # an image's distance to itself: exactly 0
        return torch.logsumexp(-d.flatten() / temperature, 0) - math.log(d.numel())


@dataclass
class Dispersion:
    """A run's dispersive loss (`dispersive_loss` with `distance`) on the residual stream after `depth` blocks,
    every token at its place in the image grid (inside a routed run, the skipping tokens as they entered it), so
    that image i's k-th token and image j's are the same place."""

    depth: int
    distance: str = "l2"

    def wrap(self, net):
        """(model_fn, losses): model_fn is called as `net` and returns its output; each call also puts the batch's
        dispersive loss () in losses["disperse"]."""
        losses = {}

        def model_fn(x_t, t, *args, **kwargs):
            out, hidden = net(x_t, t, *args, **kwargs, hidden_depth=self.depth)
            losses["disperse"] = dispersive_loss(hidden, self.distance)
            return out

        return model_fn, losses


@dataclass
class Alignment:
    """A run's representation alignment: the hidden states after `depth` blocks (and `second_depth`, if not 0),
    projected, against the EMA model's after `target_depth` blocks (self-alignment), the `encoder`'s features
    (REPA) or, with `truth`, the scenes' truth (`truth_targets`)."""

    depth: int
    target_depth: int  # 0 with an encoder or the truth
    encoder: FrozenEncoder | None
    patch_size: int
    truth: bool = False
    second_depth: int = 0

    def wrap(self, net, ema: nn.Module, projectors: tuple[nn.Module, ...], levers: dict, images: torch.Tensor,
             teacher: tuple[torch.Tensor, torch.Tensor] | None = None, truth: torch.Tensor | None = None):
        """(model_fn, losses): model_fn is called as `net` (the model with this step's token levers) and returns
        its output; each call also puts the batch's alignment loss (B,) in losses["align"]. projectors: the
        depth's, then the second depth's. images: the clean batch (pixels in [-1, 1]), the encoder's input.
        teacher: self-alignment's (x, t) in place of the student's (x_t, t), laid out as x_t (the kept patches when
        masking); None: the student's own. truth: the batch's `truth_targets` over the full token grid, the target
        with `self.truth`."""
        losses = {}
        masking = {k: levers[k] for k in ("keep", "grid") if k in levers}
        depths = (self.depth, self.second_depth) if self.second_depth else (self.depth,)

        def model_fn(x_t, t, *args, **kwargs):
            out, hidden = net(x_t, t, *args, **kwargs, hidden_depth=depths)
            with torch.no_grad():
                if self.truth:
                    target = take_tokens(truth, masking["keep"]) if "keep" in masking else truth
                elif self.encoder is None:
                    x_in, t_in = (x_t, t) if teacher is None else teacher
                    target = ema(x_in, t_in, *args, **kwargs, **masking, hidden_depth=self.target_depth,
                                 hidden_only=True)
                else:  # the model's token grid: the full image's (x_t holds only the kept patches when masking)
                    grid = masking.get("grid") or (x_t.shape[-2] // self.patch_size, x_t.shape[-1] // self.patch_size)
                    target = self.encoder(images, grid)
                    if "keep" in masking:
                        target = take_tokens(target, masking["keep"])
            pairs = (ran_tokens(n, levers, h, target) for n, h in zip(depths, hidden))
            losses["align"] = sum(alignment_loss(project(h), z) for project, (h, z) in zip(projectors, pairs,
                                                                                            strict=True))
            return out

        return model_fn, losses
