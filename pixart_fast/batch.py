"""The batch: one typed value shared by the embedded data, the extracted features and the trainer.

Datasets return samples as dicts (one image each); `Batch.collate` stacks them into a Batch, whose fields say what
each kind of data carries (None where it carries nothing of that kind). Shapes are per field, B samples.
"""
from dataclasses import dataclass, fields, replace

import torch

Tensor = torch.Tensor

# sample dict key -> Batch field
_FIELDS = {"image": "images", "latent_mean": "images", "latent_std": "latent_std", "label": "labels",
           "caption": "captions", "text": "text", "mask": "mask", "img_hw": "img_hw",
           "aspect_ratio": "aspect_ratio", "truth": "truths"}


@dataclass(frozen=True)
class Batch:
    images: Tensor  # (B, C, H, W) float32: pixels in [-1, 1] (embedded data) or VAE latent means (features, unscaled)
    latent_std: Tensor | None = None  # (B, C, H, W) float32: the VAE latent distribution's std (features, unscaled)
    latent_scale: float = 1.0  # the VAE's scaling factor: the diffusion model sees latents times this
    labels: Tensor | None = None  # (B,) int64 class labels (stage 1)
    captions: list[str] | None = None  # B caption strings (embedded data, before a text encoder)
    text: Tensor | None = None  # (B, L, E) caption features, zero past each caption
    mask: Tensor | None = None  # (B, L) bool, True on a caption's tokens
    img_hw: Tensor | None = None  # (B, 2) float32 original (height, width) in pixels: a PixArtMS micro-condition
    aspect_ratio: Tensor | None = None  # (B,) float32 height / width: a PixArtMS micro-condition
    truths: list | None = None  # B pixart_fast.data.Scene: what the embedded captions state, for scoring samples
    truth_tokens: Tensor | None = None  # (B, T, Z) float32: truths per model token (pixart_fast.align.truth_targets)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def is_latent(self) -> bool:
        """True for VAE latent distributions (features): a training input is a fresh sample of each."""
        return self.latent_std is not None

    def x0(self, eps: Tensor | None = None) -> Tensor:
        """The clean input the diffusion model learns: the images, or for latents (mean + std * eps) * scale with
        eps ~ N(0, 1) of the images' shape: a new sample of each latent distribution, as PixArt's feature loader."""
        if self.latent_std is None:
            return self.images
        return (self.images + self.latent_std * eps) * self.latent_scale

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The tensors on `device`; lists stay where they are."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)

    @classmethod
    def collate(cls, samples: list[dict], **extra) -> "Batch":
        """Stack samples (dicts with the keys of _FIELDS) into a Batch: tensors stacked, ints into a (B,) tensor,
        anything else (captions, truths) kept as a list. extra: other fields (latent_scale)."""
        batch = {}
        for key, first in samples[0].items():
            values = [s[key] for s in samples]
            if isinstance(first, Tensor):
                shapes = {tuple(v.shape) for v in values}
                if len(shapes) > 1:
                    raise ValueError(f"cannot stack {key!r} of shapes {sorted(shapes)}: batch one bucket at a time "
                                     "(the dataset's bucket_ids())")
                batch[_FIELDS[key]] = torch.stack(values)
            elif isinstance(first, int):
                batch[_FIELDS[key]] = torch.tensor(values)
            else:
                batch[_FIELDS[key]] = values
        return cls(**batch, **extra)
