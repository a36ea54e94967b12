"""Training data from extracted features (`python -m pixart_fast.extract`): `FeatureDataset(root)`.

Sample i: {"latent_mean", "latent_std": (C, h, w) float32, the VAE's latent distribution (unscaled);
"text": (120, E) float32 T5 features, zero past the caption; "mask": (120,) bool, True on the caption's tokens;
"img_hw": (2,) float32 original (height, width) in pixels; "aspect_ratio": () float32, the bucket's ratio
(1.0 without --multi-aspect): PixArtMS's micro-conditions; "label": int, where the extraction had labels}.
`dataset.batch(indices)` stacks samples into a `pixart_fast.batch.Batch`, whose `x0(eps)` is a training latent
(mean + std * eps) * scaling_factor with fresh eps ~ N(0, 1): a new sample of the latent distribution at every
step, as PixArt's feature loader does.

A chunk that is not what pixart_fast.extract writes (unreadable, a key missing, a wrong dtype or shape) raises
ValueError naming the chunk file, the key, and the expected and found dtype and shape: its small tables when
the dataset opens, a sample's tensors when the sample is read (checking every sample's header entries at
start would cost minutes on millions of samples).
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from pixart_fast.batch import Batch

# The format `python -m pixart_fast.extract` writes (it imports these): an index.json and numbered chunk files.
FORMAT = "pixart_fast.features/1"
INDEX = "index.json"


def chunk_name(k: int) -> str:
    """The file name of chunk k of an extraction folder."""
    return f"chunk-{k:06d}.safetensors"

# Small per-chunk tables, read once at start: key -> (dtype, shape of one row); one row per sample of the chunk.
_TABLES = {"index": (torch.int64, ()), "hw": (torch.int32, (2,)), "size": (torch.int32, (2,)),
           "ratio": (torch.float32, ()), "tokens": (torch.int32, ())}
_LABEL = {"label": (torch.int64, ())}
_FEATURES = (torch.float32, torch.bfloat16)  # the dtypes extract stores encoder outputs in
_REWRITE = "delete it and rerun pixart_fast.extract with the same arguments to write it again"


def _open(path: Path):
    """safe_open of a chunk; a file that is not safetensors (damaged, cut short) raises ValueError naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"feature chunk {path} is not a readable safetensors file ({e}); {_REWRITE}") from None


def _tensor(f, path: Path, key: str) -> torch.Tensor:
    """Tensor `key` of an open chunk; a missing one raises ValueError naming the chunk and the key."""
    try:
        return f.get_tensor(key)
    except SafetensorError:
        raise ValueError(f"feature chunk {path} has no tensor {key!r}; {_REWRITE}") from None


def _check(path: Path, key: str, t: torch.Tensor, dtypes: tuple, shape: tuple) -> None:
    """Raise ValueError naming the chunk, the key, and the expected and found dtype and shape."""
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"feature chunk {path}: {key!r} should be {want} of shape {tuple(shape)}, found "
                         f"{str(t.dtype).removeprefix('torch.')} of shape {tuple(t.shape)}; {_REWRITE}")


class FeatureDataset(Dataset):
    """The samples of an extraction folder, in record order (unreadable images were skipped at extraction).

    Samples of one image size form a bucket: `buckets` lists the sizes (height, width) in pixels and
    `bucket_ids()` gives each sample's, so a batch can take one bucket (one latent shape) at a time.
    Refuses an incomplete extraction, naming the missing chunks.
    """

    def __init__(self, root):
        self.root = Path(root)
        path = self.root / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"--data {self.root}: no {INDEX}; extract features into it first "
                                    f"(python -m pixart_fast.extract --out {self.root} ...)")
        self.meta = json.loads(path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"--data {self.root}: {INDEX} has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        missing = [chunk_name(k) for k in range(self.meta["num_chunks"]) if not (self.root / chunk_name(k)).exists()]
        if missing:
            raise ValueError(f"--data {self.root}: the extraction is incomplete, {len(missing)} of "
                             f"{self.meta['num_chunks']} chunks missing ({', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}); rerun pixart_fast.extract with the same "
                             "arguments (every --shard) to finish it")
        specs = _TABLES | (_LABEL if self.num_classes is not None else {})
        tables, chunk = {key: [] for key in specs}, []
        for k in range(self.meta["num_chunks"]):
            path = self.root / chunk_name(k)
            with _open(path) as f:
                found = {key: _tensor(f, path, key) for key in specs}
            n = len(found["index"]) if found["index"].dim() else 0
            for key, (dtype, row) in specs.items():
                _check(path, key, found[key], (dtype,), (n, *row))
                tables[key].append(found[key])
            if n and not 1 <= found["tokens"].min() <= found["tokens"].max() <= self.meta["max_tokens"]:
                raise ValueError(f"feature chunk {path}: 'tokens' should lie in 1..{self.meta['max_tokens']}, found "
                                 f"{found['tokens'].min()}..{found['tokens'].max()}; {_REWRITE}")
            chunk.append(torch.full((n,), k))
        t = {key: torch.cat(v) for key, v in tables.items()}
        if len(t["index"]) == 0:
            raise ValueError(f"--data {self.root}: no sample in it (were all images unreadable?)")
        self.records, self.chunk = t["index"].tolist(), torch.cat(chunk).tolist()  # record index and chunk of i
        self.img_hw, self.ratio, self.tokens = t["hw"].float(), t["ratio"], t["tokens"].tolist()
        self.labels = t["label"].tolist() if "label" in t else None
        sizes, ids = torch.unique(t["size"], dim=0, return_inverse=True)
        self.buckets = [tuple(s) for s in sizes.tolist()]  # (height, width) in pixels
        self._bucket_ids = ids.numpy()

    @property
    def latent_channels(self) -> int:
        return self.meta["latent_channels"]

    @property
    def caption_channels(self) -> int:
        return self.meta["caption_channels"]

    @property
    def num_classes(self) -> int | None:
        return self.meta["num_classes"]

    def latent_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every bucket's latents."""
        f = self.meta["vae_downsample"]
        return [(h // f, w // f) for h, w in self.buckets]

    def __len__(self) -> int:
        return len(self.records)

    def bucket_ids(self) -> np.ndarray:
        """(len,) int64: every sample's index into `buckets`."""
        return self._bucket_ids

    def __getitem__(self, i: int) -> dict:
        r, L, path = self.records[i], self.meta["max_tokens"], self.root / chunk_name(self.chunk[i])
        with _open(path) as f:
            mean, std, tokens = (_tensor(f, path, f"{r}.{key}") for key in ("mean", "std", "text"))
        latent = (self.latent_channels, *self.latent_sizes()[self._bucket_ids[i]])
        for key, t, shape in (("mean", mean, latent), ("std", std, latent),
                              ("text", tokens, (self.tokens[i], self.caption_channels))):
            _check(path, f"{r}.{key}", t, _FEATURES, shape)
        mean, std, tokens = mean.float(), std.float(), tokens.float()
        text = torch.zeros(L, tokens.shape[1])
        text[: len(tokens)] = tokens
        sample = {"latent_mean": mean, "latent_std": std, "text": text, "mask": torch.arange(L) < len(tokens),
                  "img_hw": self.img_hw[i], "aspect_ratio": self.ratio[i]}
        if self.labels is not None:
            sample["label"] = self.labels[i]
        return sample

    def batch(self, indices) -> Batch:
        """The samples at `indices` as one Batch (one bucket); its x0(eps) scales latents by the VAE's factor."""
        return Batch.collate([self[i] for i in indices], latent_scale=self.meta["scaling_factor"])

    def check_model(self, config, name: str, class_conditional: bool) -> None:
        """Raise ValueError, naming both sides, if model `name` (a PixArtConfig) cannot train on these features."""
        where = f"--data {self.root}"
        if config.in_channels != self.latent_channels:
            raise ValueError(f"{where} holds {self.latent_channels}-channel latents but model {name} has in_channels "
                             f"{config.in_channels}; pick a --model with in_channels {self.latent_channels}, or "
                             "extract with a matching --vae")
        if class_conditional:
            if self.num_classes is None:
                raise ValueError(f"{where} has no class labels; stage 1 is class-conditional: extract from metadata "
                                 "with an integer 'label' on every record, or train stage 2 or 3")
            if self.num_classes > config.num_classes:
                raise ValueError(f"{where} has labels up to {self.num_classes - 1} but model {name} has "
                                 f"num_classes {config.num_classes}")
            side = (config.input_size, config.input_size)
            if any(s != side for s in self.latent_sizes()):
                raise ValueError(f"{where} has latents of sizes {self.latent_sizes()} but stage 1's DiT has fixed "
                                 f"positions for {side}; pick a --model with input_size {self.latent_sizes()[0][0]}")
            return
        if config.caption_channels != self.caption_channels or config.max_tokens != self.meta["max_tokens"]:
            raise ValueError(f"{where} holds {self.caption_channels}-dim caption features of {self.meta['max_tokens']} "
                             f"tokens but model {name} has caption_channels {config.caption_channels} and max_tokens "
                             f"{config.max_tokens}; pick a matching --model, or extract with a matching --t5")
        odd = [s for s in self.latent_sizes() if s[0] % config.patch_size or s[1] % config.patch_size]
        if odd:
            raise ValueError(f"{where} has latent sizes {odd} not divisible by model {name}'s patch size "
                             f"{config.patch_size}")
