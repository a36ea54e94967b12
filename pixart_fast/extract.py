"""Image folder + captions -> cached VAE latents and T5 caption features, for training with `--data DIR`.

    python -m pixart_fast.extract --images DIR --vae PATH --t5 PATH --out DIR --resolution 256|512|1024
                                  [--multi-aspect] [--shard i/n] [--batch-size N] [--max-tokens 120|300]
                                  [--format chunks|shards]
    torchrun --nproc-per-node N [--nnodes M ...] -m pixart_fast.extract ...   one process per GPU

Input (`read_records`): a Hugging Face imagefolder (`metadata.jsonl`, one {"file_name", "text"} per line) or the
official PixArt `data_info.json` (a JSON list of {"path", "prompt", "height", "width", "ratio", ...}), either
named directly or found in the --images folder (also under `partition/`, the official layout). Image paths are
relative to --image-root, by default the folder holding the metadata file. An optional integer "label" on
every record is kept, for the class-conditional stage 1. Or WebDataset tar shards as img2dataset writes them
(`tar_input`: a folder of *.tar, a .tar path or URL, a brace pattern): each sample's `{key}.jpg` (or .jpeg,
.png, .webp) captioned by its `{key}.txt`, or the "caption" of its `{key}.json`; chunk k is then tar k, and each
process downloads the remote tars of its share into --cache before it starts encoding.

Each image is resized (bicubic) so it covers the target and center-cropped to it: resolution x resolution, or
with --multi-aspect the nearest of PixArt's aspect-ratio buckets (aspect_ratio_buckets; nearest in height / width).
The VAE stores its latent distribution's mean and std (a fresh latent is sampled at every training step,
scaled by the VAE's scaling_factor, 0.18215 for SD's); T5 stores the caption's valid tokens only (the mask
hides the padding, so nothing else is needed to rebuild the padded (max_tokens, C) features). --max-tokens is the
caption length: 120 for PixArt-alpha (the default), 300 for PixArt-Sigma; index.json records it, and training
refuses a model whose max_tokens differs.

Output: records are cut into chunks of --chunk-size, written as `chunk-XXXXXX.safetensors` with a manifest
beside each (`chunk-XXXXXX.manifest.json`: its size and CRC-32, which training checks), and `index.json`
describes the whole extraction (`FeatureDataset` in pixart_fast.features reads it). A chunk file exists only
when complete (written to a temporary name, then renamed), so a rerun skips finished chunks, and
`--shard i/n` handles chunks i, i + n, i + 2n, ...: n processes or machines writing into one folder produce
the files of one unsharded run. Under torchrun each process takes RANK of WORLD_SIZE as its share and
cuda:LOCAL_RANK as its device; no process waits for another. A rerun checks each finished chunk against the
metadata as it reads now (image files, captions, labels): a caption fixed in a chunk not yet written does not
disturb the others, one fixed in a finished chunk names that chunk to delete. Nothing is written into --out
before the first chunk is done. `--format shards` writes WebDataset tar shards instead (`shard-XXXXXX.tar` and
its table `shard-XXXXXX.json`, written after it: pixart_fast.shards), which training reads in place or from
object storage (docs/shards.md); a shard is finished when both are there.

Bad input (README "When things go wrong"): a metadata line that is not a JSON record, or whose file name or
caption is not valid Unicode, stops the run before any work, naming the file and line. A missing or unreadable
image is skipped, reported by path and listed in the summary and the chunk's metadata. A 16-bit greyscale image
is scaled to 8 bits. An image smaller than its target is upscaled (bicubic; its original size is kept as
PixArtMS's micro-condition), an empty caption is kept (T5 sees only its end-of-sequence token), and a caption
longer than --max-tokens tokens is truncated: each warned about once and counted in the summary.
"""
import argparse
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from webdataset.cache import FileCache
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from pixart_fast.cli import run
from pixart_fast.files import atomic_path, write_manifest
from pixart_fast.features import FORMAT, INDEX, FeatureError, chunk_name, manifest_name
from pixart_fast.shards import (SHARDS, default_cache, no_s3_scheme, read_table, shard_name, table_name,
                                write_shard)
from pixart_fast.text import MAX_TOKENS, TextEncoder


# PixArt's aspect-ratio buckets at 1024 px, height / width -> (height, width) in pixels, as the official repo
# defines them (diffusion/data/datasets/utils.py); its 512 and 256 tables are this one halved and quartered.
ASPECT_RATIO_1024 = {
    0.25: (512, 2048), 0.26: (512, 1984), 0.27: (512, 1920), 0.28: (512, 1856), 0.32: (576, 1792),
    0.33: (576, 1728), 0.35: (576, 1664), 0.4: (640, 1600), 0.42: (640, 1536), 0.48: (704, 1472),
    0.5: (704, 1408), 0.52: (704, 1344), 0.57: (768, 1344), 0.6: (768, 1280), 0.68: (832, 1216),
    0.72: (832, 1152), 0.78: (896, 1152), 0.82: (896, 1088), 0.88: (960, 1088), 0.94: (960, 1024),
    1.0: (1024, 1024), 1.07: (1024, 960), 1.13: (1088, 960), 1.21: (1088, 896), 1.29: (1152, 896),
    1.38: (1152, 832), 1.46: (1216, 832), 1.67: (1280, 768), 1.75: (1344, 768), 2.0: (1408, 704),
    2.09: (1472, 704), 2.4: (1536, 640), 2.5: (1600, 640), 2.89: (1664, 576), 3.0: (1728, 576),
    3.11: (1792, 576), 3.62: (1856, 512), 3.75: (1920, 512), 3.88: (1984, 512), 4.0: (2048, 512),
}
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # what PIL raises for a missing or bad file
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit greyscale (PNG, TIFF)


def aspect_ratio_buckets(resolution: int) -> dict[float, tuple[int, int]]:
    """PixArt's bucket table at `resolution` px: the 1024 table scaled by resolution / 1024, which gives the
    official 512 and 256 tables exactly, and any other multiple of 16 (small test runs) alike."""
    if resolution < 16 or resolution % 16:
        raise FeatureError(f"--multi-aspect needs a resolution of 256, 512, 1024 or another multiple of 16, "
                           f"got {resolution}")
    return {r: (h * resolution // 1024, w * resolution // 1024) for r, (h, w) in ASPECT_RATIO_1024.items()}


def nearest_bucket(height: int, width: int, buckets: dict) -> tuple[float, tuple[int, int]]:
    """The bucket whose ratio is nearest height / width (the first of equals, in table order)."""
    ratio = min(buckets, key=lambda r: abs(r - height / width))
    return ratio, buckets[ratio]


# ----------------------------------------------------------------------------------------------------------
# Records: what to extract
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    file: str  # path relative to the image root, as the metadata writes it
    caption: str
    label: int | None = None  # class label for stage 1, where the metadata has one
    where: str = field(default="", compare=False)  # the metadata file and line (or record) it was read from
    at: tuple | None = field(default=None, compare=False)  # in a tar input: (local tar file, byte offset, size)


METADATA_NAMES = ("metadata.jsonl", "data_info.json", "partition/data_info.json")  # looked for in --images


def find_metadata(images) -> Path:
    """The metadata file: `images` itself, or metadata.jsonl / data_info.json / partition/data_info.json in it."""
    images = Path(images)
    if images.is_file():
        return images
    for name in METADATA_NAMES:
        if (images / name).is_file():
            return images / name
    raise FileNotFoundError(f"--images {images}: no metadata.jsonl (Hugging Face imagefolder), data_info.json or "
                            "partition/data_info.json (PixArt) there; pass the folder that holds one, or the file")


def _parse(text: str, where: str):
    """json.loads, its error naming where the text came from and the position in it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if "\n" in text else f"column {e.colno}"
        raise FeatureError(f"{where}: not JSON ({e.msg} at {at}): {text[:80]!r}; fix or delete it") from None


def read_records(metadata) -> list[Record]:
    """Records of a metadata.jsonl (one JSON object a line) or a data_info.json (one JSON list), in file order.
    A record names its image with "file_name" (imagefolder) or "path" (PixArt) and its caption with "text"
    or "prompt"; other keys are ignored, except an integer "label". Any line or record that is not one of
    these, or whose file name or caption is not valid Unicode (a lone surrogate, from a broken \\u escape: T5's
    tokenizer cannot encode it), raises FeatureError naming the file and the line (metadata.jsonl) or record."""
    metadata = Path(metadata)
    text = metadata.read_text(encoding="utf-8")
    if metadata.suffix == ".jsonl":
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        entries = [_parse(line, f"{metadata}, line {n}") for n, line in lines]
        wheres = [f"{metadata}, line {n}, record {r}" for r, (n, _) in enumerate(lines)]
    else:
        entries = _parse(text, str(metadata))
        if not isinstance(entries, list):
            raise FeatureError(f"{metadata}: expected a JSON list of records (PixArt's data_info.json), "
                               f"got {type(entries).__name__}")
        wheres = [f"{metadata}, record {r}" for r in range(len(entries))]
    records = []
    for e, where in zip(entries, wheres):
        if not isinstance(e, dict):
            raise FeatureError(f"{where}: expected a JSON object with 'file_name' and 'text', got {str(e)[:80]!r}")
        file, caption = e.get("file_name", e.get("path")), e.get("text", e.get("prompt"))
        if not isinstance(file, str) or not isinstance(caption, str):
            raise FeatureError(f"{where}: need a 'file_name' (or 'path') and a 'text' (or 'prompt') "
                               f"string, got keys {sorted(e)}")
        for name, value in (("file name", file), ("caption", caption)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as u:
                raise FeatureError(f"{where}: {name} {value!r} is not valid Unicode (a lone surrogate at character "
                                   f"{u.start}); fix its \\u escape or delete the line") from None
        label = e.get("label")
        if label is not None and not isinstance(label, int):
            raise FeatureError(f"{where}: 'label' must be an integer class, got {label!r}")
        records.append(Record(file, caption, label, where))
    if not records:
        raise FeatureError(f"{metadata} lists no images")
    return records


TAR_STRIDE = 1_000_000  # record index of a tar input's sample: k * TAR_STRIDE + its position in tar k
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a tar sample's image member, the first of these it has


@dataclass
class Input:
    """What to extract: records from a metadata file (chunk k: records k * chunk_size ...), or WebDataset tar
    shards as img2dataset writes them (chunk k: the samples of tar k, listed when the chunk is extracted).
    `chunk(k)`: record index -> Record."""

    records: list[Record] | None = None  # a metadata file's
    chunk_size: int = 0
    tars: list[str] | None = None  # the tars' paths or URLs
    cache: Path | None = None  # where remote tars are downloaded

    @property
    def num_chunks(self) -> int:
        return len(self.tars) if self.tars is not None else -(-len(self.records) // self.chunk_size)

    def chunk(self, k: int) -> dict[int, Record]:
        if self.tars is None:
            return {i: self.records[i] for i in chunk_records(k, self.chunk_size, len(self.records))}
        return tar_records(self.tars[k], k, self.cache)


def tar_input(images: str) -> list[str] | None:
    """The tar shards `--images` names (a .tar path or URL, brace patterns such as data/{00000..00099}.tar
    expanded, or a folder holding *.tar and no metadata file), or None where it names a metadata input."""
    no_s3_scheme("--images", images, images)
    if "://" in images or images.startswith("pipe:") or images.endswith(".tar") or "{" in images:
        return expand_urls(images)
    folder = Path(images)
    if folder.is_dir() and not any((folder / n).is_file() for n in METADATA_NAMES):
        tars = sorted(str(t) for t in folder.glob("*.tar"))
        return tars or None
    return None


def tar_records(url: str, k: int, cache) -> dict[int, Record]:
    """The samples of tar shard `url` (chunk k) as records: WebDataset's grouping by key ({key}.jpg with its
    {key}.txt caption, or {key}.json's "caption", as img2dataset writes them). A remote tar is downloaded into
    `cache` first (webdataset's FileCache). A key with no image member is not a sample; an image with no
    caption raises FeatureError naming the tar and the key."""
    remote = "://" in url or url.startswith("pipe:")
    if remote:
        cache.mkdir(parents=True, exist_ok=True)
        try:
            local = FileCache(str(cache), url_to_name=lambda _: f"input-{k:06d}.tar").get_file(url)
        except Exception as e:  # noqa: BLE001 - what the download's handler (curl, a pipe) raised
            raise FeatureError(f"--images {url}: cannot download it into {cache} ({type(e).__name__}: {e})") from None
    else:
        local = url
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(local, "r:") as tar:
            for m in tar:
                parts = base_plus_ext(m.name) if m.isfile() else None
                if not parts or parts[0] is None:
                    continue
                key, ext = parts
                group = groups.setdefault(key, {})
                if ext in ("txt", "json"):
                    group[ext] = tar.extractfile(m).read().decode("utf-8")
                elif ext.lower() in IMAGE_EXTS and "image" not in group:
                    group["image"] = (m.name, m.offset_data, m.size)
    except (OSError, tarfile.TarError, UnicodeDecodeError) as e:
        raise FeatureError(f"--images {url}: not a readable WebDataset tar ({type(e).__name__}: {e})") from None
    records = {}
    for j, (key, group) in enumerate((key, g) for key, g in groups.items() if "image" in g):
        caption = group.get("txt")
        if caption is None and "json" in group:
            caption = _parse(group["json"], f"{url}, {key}.json").get("caption")
        if not isinstance(caption, str):
            raise FeatureError(f"--images {url}: sample {key!r} has no caption ({key}.txt, or a \"caption\" in "
                               f"{key}.json); add one or remove the sample")
        if j >= TAR_STRIDE:
            raise FeatureError(f"--images {url} holds more than {TAR_STRIDE:,} samples; split it into smaller tars")
        name, offset, size = group["image"]
        records[k * TAR_STRIDE + j] = Record(f"{url}#{name}", caption, None, f"{url}, sample {key!r}",
                                             (local, offset, size))
    return records


# ----------------------------------------------------------------------------------------------------------
# Images: load, resize, crop
# ----------------------------------------------------------------------------------------------------------


def load_image(path, resolution: int, buckets: dict | None) -> tuple[torch.Tensor, tuple[int, int], float]:
    """Read an image (EXIF orientation applied, RGB; 16-bit greyscale scaled to 8 bits) and fit it to its target:
    resize (bicubic) so it covers the target, center-crop. Returns (image (3, H, W) float32 in [-1, 1], original
    (height, width), aspect ratio of the bucket: its table key with buckets, else 1.0)."""
    with Image.open(path) as f:
        image = ImageOps.exif_transpose(f)
        if image.mode in SIXTEEN_BIT:  # PIL's convert would clip these to 255: white
            image = Image.fromarray(np.clip(np.asarray(image) / 257, 0, 255).round().astype(np.uint8))
        image = image.convert("RGB")
    h, w = image.height, image.width
    ratio, (H, W) = nearest_bucket(h, w, buckets) if buckets else (1.0, (resolution, resolution))
    scale = max(H / h, W / w)
    rw, rh = max(W, round(w * scale)), max(H, round(h * scale))
    image = image.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - W) // 2, (rh - H) // 2
    image = image.crop((left, top, left + W, top + H))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1, (h, w), ratio


def image_source(record: Record, root: Path):
    """What load_image opens for a record: its file under the image root, or its bytes inside a tar."""
    if record.at is None:
        return root / record.file
    path, offset, size = record.at
    with open(path, "rb") as f:
        f.seek(offset)
        return io.BytesIO(f.read(size))


def image_name(record: Record, root: Path) -> str:
    """A record's image as reported: its path, or its tar and member."""
    return record.file if record.at is not None else str(root / record.file)


class _Images(Dataset):
    """Item k of `todo` ((record index, Record) pairs): (record index, image or None, (h, w), ratio, error)."""

    def __init__(self, todo: list, root: Path, resolution: int, buckets):
        self.todo, self.root, self.resolution, self.buckets = todo, root, resolution, buckets

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, k):
        i, record = self.todo[k]
        try:
            image, hw, ratio = load_image(image_source(record, self.root), self.resolution, self.buckets)
        except UNREADABLE as e:
            return i, None, (0, 0), 0.0, f"{type(e).__name__}: {e}"
        return i, image, hw, ratio, ""


# ----------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------


PIPELINE_PARTS = {"vae": "vae", "t5": "text_encoder"}  # where a diffusers pipeline folder keeps each encoder


def _part(folder, what: str) -> Path:
    """An encoder's folder: `folder` itself, or its subfolder when `folder` is a diffusers pipeline's."""
    inside = Path(folder) / PIPELINE_PARTS[what]
    return inside if inside.is_dir() else Path(folder)


def _config(folder, what: str) -> dict:
    path = _part(folder, what) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--{what} {folder}: no config.json there; pass a local {what.upper()} model folder")
    return json.loads(path.read_text())


def plan(records: list[Record], vae, t5, resolution: int, multi_aspect: bool, chunk_size: int,
         max_tokens: int = MAX_TOKENS) -> dict:
    """The extraction's description, written as index.json: the same for every shard of one extraction.
    Encoder shapes come from their config.json files, so a finished extraction loads no weights."""
    if max_tokens < 1:
        raise FeatureError(f"--max-tokens must be >= 1 (120 for PixArt-alpha, 300 for PixArt-Sigma), got {max_tokens}")
    vae_cfg, t5_cfg = _config(vae, "vae"), _config(t5, "t5")
    downsample = 2 ** (len(vae_cfg["block_out_channels"]) - 1)  # one 2x downsampling per block but the last
    buckets = aspect_ratio_buckets(resolution) if multi_aspect else {1.0: (resolution, resolution)}
    odd = [hw for hw in buckets.values() if hw[0] % downsample or hw[1] % downsample]
    if odd:
        raise FeatureError(f"the VAE downsamples by {downsample} but --resolution {resolution} gives image sizes "
                           f"{odd[:3]} not divisible by it; pick a resolution that is a multiple of {downsample}")
    labels = [r.label for r in records] or [None]
    if any(lab is not None for lab in labels) and any(lab is None for lab in labels):
        raise FeatureError("some records have a 'label' and some do not; label all of them (stage 1) or none")
    return {
        "format": FORMAT, "num_records": len(records),
        "chunk_size": chunk_size, "num_chunks": -(-len(records) // chunk_size),
        "resolution": resolution, "multi_aspect": multi_aspect,
        "buckets": [[r, h, w] for r, (h, w) in buckets.items()],
        "latent_channels": vae_cfg.get("latent_channels", 4), "vae_downsample": downsample,
        "scaling_factor": vae_cfg.get("scaling_factor", 0.18215),
        "caption_channels": t5_cfg["d_model"], "max_tokens": max_tokens,
        "num_classes": None if labels[0] is None else max(labels) + 1,
        "vae": str(Path(vae).resolve()), "t5": str(Path(t5).resolve()),
    }


def write_index(out: Path, index: dict) -> None:
    """Write index.json, or check that the one there describes the same extraction (paths may differ; the
    records are checked chunk by chunk, by `check_chunk`)."""
    path = out / INDEX
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in index.items()
                if k not in ("vae", "t5") and old.get(k) != v]
        if diff:
            raise FeatureError(f"{out} holds another extraction ({'; '.join(diff)}); use a new --out, or delete that "
                               "folder to start over")
        return
    with atomic_path(path, suffix=f".tmp-{os.getpid()}") as tmp:  # every shard writes the same text: they agree
        tmp.write_text(json.dumps(index, indent=1) + "\n")


def chunk_records(k: int, chunk_size: int, num_records: int) -> range:
    """The record indices of chunk k."""
    return range(k * chunk_size, min((k + 1) * chunk_size, num_records))


def check_chunk(path: Path, chunk: dict) -> None:
    """Raise FeatureError if the finished chunk at `path` (a chunk file, or a shard's table) holds other image
    files, captions or labels than its records (`chunk`: record index -> Record) give now: the input changed
    there since it was written."""
    if path.suffix == ".json":
        samples = read_table(path)["samples"]
        index, files, captions = samples["index"], samples["file"], samples["caption"]
        labels = samples.get("label", [None] * len(index))
    else:
        try:
            with safe_open(str(path), "pt") as f:
                info, index = f.metadata() or {}, f.get_tensor("index").tolist()
                labels = f.get_tensor("label").tolist() if "label" in f.keys() else [None] * len(index)
            files, captions = json.loads(info["files"]), json.loads(info["captions"])
        except (SafetensorError, KeyError, ValueError) as e:
            raise FeatureError(f"feature chunk {path} is not a readable chunk ({type(e).__name__}: {e}); delete it "
                               "and run this command again to write it again") from None
    for i, file, caption, label in zip(index, files, captions, labels):
        if i not in chunk:
            raise FeatureError(f"feature chunk {path} holds record {i}, not one of its {min(chunk)}..{max(chunk)};"
                               " delete it and run this command again to write it again")
        r = chunk[i]
        change = (f"names {r.file!r}" if r.file != file else f"captions it {r.caption!r}" if r.caption != caption
                  else f"labels it {r.label!r}, not {label!r}" if r.label != label else None)
        if change:
            raise FeatureError(f"{path} holds {file!r} captioned {caption!r}, but {r.where} now {change}; delete "
                               "that chunk to extract it again, or use a new --out to keep it")


def write_chunk_manifest(path: Path) -> None:
    """Write the manifest of the chunk at `path` (its size and CRC-32, which FeatureDataset checks) beside it."""
    k = int(path.name.removeprefix("chunk-").removesuffix(".safetensors"))
    write_manifest(path.parent, [path.name], manifest_name(k))


@torch.no_grad()
def encode(vae, text: TextEncoder, items: list, records: dict) -> dict[int, dict]:
    """One batch of loaded images of one size (items of `_Images`) -> record index -> {"mean", "std": (C, h, w),
    "text": (L, E) the caption's valid tokens, in the encoders' dtype on the CPU; "hw", "size", "ratio"}."""
    x = torch.stack([image for _, image, *_ in items]).to(vae.device, vae.dtype)  # (B, 3, H, W)
    latent = vae.encode(x).latent_dist
    features, mask = text.encode([records[i].caption for i, *_ in items])  # (B, max_tokens, E), (B, max_tokens)
    lengths = mask.sum(1).tolist()
    if not all(mask[b, :n].all() for b, n in enumerate(lengths)):
        raise ValueError("the tokenizer pads on the left; features are stored as a prefix of valid tokens")
    features = features.to(text.model.dtype).cpu()
    return {i: {"mean": latent.mean[b].cpu(), "std": latent.std[b].cpu(), "text": features[b, :lengths[b]].clone(),
                "hw": hw, "size": tuple(x.shape[2:]), "ratio": ratio}
            for b, (i, _, hw, ratio, _) in enumerate(items)}


def write_chunk(path: Path, samples: dict, meta: dict, records, skipped: list) -> None:
    """samples: record index -> {"mean", "std", "text", "hw", "size", "ratio"}. Per-sample tensors are keyed by
    the global record index; small (n,) tables list what the chunk holds. Written atomically, then its manifest
    (a rerun writes the manifest of a chunk that has none)."""
    kept = sorted(samples)
    tensors = {
        "index": torch.tensor(kept, dtype=torch.int64),  # (n,) record indices
        "hw": torch.tensor([samples[i]["hw"] for i in kept], dtype=torch.int32).reshape(-1, 2),  # original size
        "size": torch.tensor([samples[i]["size"] for i in kept], dtype=torch.int32).reshape(-1, 2),  # crop size, px
        "ratio": torch.tensor([samples[i]["ratio"] for i in kept], dtype=torch.float32),  # bucket aspect ratio
        "tokens": torch.tensor([len(samples[i]["text"]) for i in kept], dtype=torch.int32),  # valid caption tokens
    }
    if meta["num_classes"] is not None:
        tensors["label"] = torch.tensor([records[i].label for i in kept], dtype=torch.int64)
    for i in kept:
        for key in ("mean", "std", "text"):
            tensors[f"{i}.{key}"] = samples[i][key].contiguous()
    info = {"captions": json.dumps([records[i].caption for i in kept]),
            "files": json.dumps([records[i].file for i in kept]),
            "skipped": json.dumps(skipped)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=info)
    write_chunk_manifest(path)


def count_oddities(summary: dict, path: Path, hw: tuple[int, int], size: tuple[int, int], caption: str, log) -> None:
    """Count in summary, and report the first of each, an image smaller than its target size (upscaled by
    load_image) and an empty caption (kept)."""
    if hw[0] < size[0] or hw[1] < size[1]:
        if not summary["upscaled"]:
            log(f"{path}: {hw[0]} x {hw[1]} px is smaller than its target {size[0]} x {size[1]}: upscaled; further "
                "ones are only counted")
        summary["upscaled"] += 1
    if not caption.strip():
        if not summary["empty_captions"]:
            log(f"{path}: empty caption, kept (T5 sees only its end-of-sequence token); further ones are only counted")
        summary["empty_captions"] += 1


FORMATS = ("chunks", "shards")  # --format: safetensors chunks (FeatureDataset), WebDataset tar shards (ShardDataset)


def launch_share(shard: tuple[int, int] | None) -> tuple[int, int]:
    """This process's share (i, n): --shard, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard is not None:
        if world > 1:
            raise FeatureError(f"--shard {shard[0]}/{shard[1]} under torchrun (WORLD_SIZE {world}): drop --shard, "
                               "torchrun gives each process its share (RANK of WORLD_SIZE)")
        return shard
    return int(os.environ.get("RANK", "0")), world


def extract(
    images, vae, t5, out, resolution: int = 256, multi_aspect: bool = False, shard: tuple[int, int] | None = None,
    batch_size: int = 32, chunk_size: int = 1024, image_root=None, device=None, dtype: torch.dtype | None = None,
    workers: int = 0, progress: bool = True, max_tokens: int = MAX_TOKENS, format: str = "chunks", cache=None,
) -> dict:
    """Extract (or finish extracting) features into `out`; returns a summary of this process's work:
    {"records", "chunks", "chunks_done_before", "chunks_written", "encoded", "unreadable": [[path, error], ...],
    "upscaled", "empty_captions", "truncated_captions": counts of the images and captions encoded}.

    shard (i, n): handle chunks k with k % n == i; None: torchrun's RANK of WORLD_SIZE (launch_share).
    device: default CUDA if present (cuda:LOCAL_RANK under torchrun); dtype: default bf16 on a GPU that has it,
    else float32. workers: image-decoding processes (DataLoader workers). max_tokens: the caption length T5 pads
    (or truncates) to, recorded in index.json: 120 for PixArt-alpha, 300 for PixArt-Sigma. format: "chunks"
    (safetensors chunk files) or "shards" (WebDataset tar shards, pixart_fast.shards). cache: where remote input
    tars are downloaded (default: under ~/.cache/pixart_fast)."""
    i_shard, n_shards = launch_share(shard)
    if not 0 <= i_shard < n_shards:
        raise FeatureError(f"--shard {i_shard}/{n_shards}: need 0 <= i < n")
    if batch_size < 1 or chunk_size < 1:
        raise FeatureError(f"--batch-size and --chunk-size must be >= 1, got {batch_size} and {chunk_size}")
    if format not in FORMATS:
        raise FeatureError(f"--format {format!r}: pick one of {', '.join(FORMATS)}")
    tars = tar_input(str(images))
    if tars is not None:
        source = Input(tars=tars, cache=Path(cache) if cache else default_cache(str(images)))
        root, records = Path(image_root or "."), []
    else:
        metadata = find_metadata(images)
        root = Path(image_root) if image_root else metadata.parent
        records = read_records(metadata)
        source = Input(records=records, chunk_size=chunk_size)
    out = Path(out)
    meta = plan(records, vae, t5, resolution, multi_aspect, chunk_size, max_tokens)
    if tars is not None:  # chunk k is tar k
        meta |= {"num_records": None, "chunk_size": None, "num_chunks": len(tars)}
    if format == "shards":
        meta["format"] = SHARDS
    finished, write = (table_name, write_shard) if format == "shards" else (chunk_name, write_chunk)
    if (out / INDEX).exists():
        write_index(out, meta)  # refuses another extraction
    mine = list(range(i_shard, meta["num_chunks"], n_shards))
    chunks = {k: source.chunk(k) for k in mine}  # record index -> Record, per chunk
    # finished: a chunk file, or a shard's table (written after its tar) with its tar
    done = [k for k in mine if (out / finished(k)).exists() and (format == "chunks" or (out / shard_name(k)).exists())]
    for k in done:
        check_chunk(out / finished(k), chunks[k])
    for k in done:
        if format == "chunks" and not (out / manifest_name(k)).exists():  # written before its manifest
            write_chunk_manifest(out / chunk_name(k))
    pending = [k for k in mine if k not in done]
    summary = {"records": sum(len(chunks[k]) for k in mine), "chunks": len(mine),
               "chunks_done_before": len(mine) - len(pending), "chunks_written": 0, "encoded": 0, "unreadable": [],
               "upscaled": 0, "empty_captions": 0, "truncated_captions": 0}
    log = tqdm.write if progress else print
    if not pending:
        log(f"{out}: all {len(mine)} chunks of shard {i_shard}/{n_shards} are done already")
        return summary

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    from diffusers import AutoencoderKL  # diffusers is needed here only

    autoencoder = _load("vae", vae, lambda: AutoencoderKL.from_pretrained(
        _part(vae, "vae"), torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False))
    autoencoder = autoencoder.to(device).eval().requires_grad_(False)
    text = _load("t5", t5, lambda: TextEncoder.from_pretrained(t5, dtype=dtype, device=device, max_length=max_tokens))
    buckets = {r: (h, w) for r, h, w in meta["buckets"]} if multi_aspect else None
    todo = [item for k in pending for item in chunks[k].items()]
    loader = DataLoader(_Images(todo, root, resolution, buckets), batch_size=None, num_workers=workers)
    items = iter(loader)  # loaded in todo's order
    bar = tqdm(total=len(todo), disable=not progress, desc=f"extract {i_shard}/{n_shards}", unit="img")
    for k in pending:
        records = chunks[k]
        samples, skipped, waiting = {}, [], {}  # waiting: (H, W) -> loaded images short of a full batch
        for _ in records:
            item = next(items)
            i, image, hw, _, error = item
            bar.update(1)
            if image is None:
                path = image_name(records[i], root)
                skipped.append([i, path, error])
                summary["unreadable"].append([path, error])
                log(f"skipped unreadable image {path} ({error})")
                continue
            size = tuple(image.shape[1:])
            count_oddities(summary, image_name(records[i], root), hw, size, records[i].caption, log)
            waiting.setdefault(size, []).append(item)
            if len(waiting[size]) == batch_size:
                samples.update(encode(autoencoder, text, waiting.pop(size), records))
        for batch in waiting.values():  # the chunk's short batches: a batch never spans two chunks
            samples.update(encode(autoencoder, text, batch, records))
        if not summary["chunks_written"]:  # the folder and its index come with the first chunk
            out.mkdir(parents=True, exist_ok=True)
            write_index(out, meta)
        write(out / (shard_name(k) if format == "shards" else chunk_name(k)), samples, meta, records, skipped)
        summary["chunks_written"] += 1
        summary["encoded"] += len(samples)
    bar.close()
    summary["truncated_captions"] = text.truncated
    del autoencoder, text, loader, items  # free the encoders' memory for whatever runs next
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"shard {i_shard}/{n_shards}: {summary['records']} records in {summary['chunks']} chunks "
        f"({summary['chunks_done_before']} done before); wrote {summary['chunks_written']} chunks, "
        f"encoded {summary['encoded']} images, skipped {len(summary['unreadable'])} unreadable; "
        f"{summary['upscaled']} upscaled, {summary['empty_captions']} empty and {summary['truncated_captions']} "
        "truncated captions")
    return summary


def _load(what: str, folder, load):
    """load() of the --vae or --t5 model, a folder it cannot load from raising FeatureError naming it."""
    try:
        return load()
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FeatureError(f"--{what} {folder}: cannot load it ({first}); pass a local "
                           f"{'diffusers AutoencoderKL' if what == 'vae' else 'T5 encoder'} folder with its weights, "
                           "or a pipeline folder") from e


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/n, e.g. 0/4, got {text!r}") from None
    return i, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixart_fast.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True,
                   help="folder with metadata.jsonl or data_info.json, or that file; or WebDataset tar shards as "
                        "img2dataset writes them: a folder of *.tar, a .tar path or URL, or a pattern such as "
                        "'data/{00000..00099}.tar'")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the metadata's)")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (config.json + weights), or a "
                   "pipeline folder with vae/ inside")
    p.add_argument("--t5", required=True, help="local T5 encoder folder (config.json, weights and tokenizer), or a "
                   "pipeline folder with text_encoder/ and tokenizer/ inside")
    p.add_argument("--out", required=True, help="output folder for index.json and the chunk files")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels: 256, 512 or 1024")
    p.add_argument("--multi-aspect", action="store_true", help="crop to PixArt's nearest aspect-ratio bucket")
    p.add_argument("--shard", type=_shard, default=None,
                   help="i/n: this process's share (chunks k with k %% n == i), for processes started by hand; under "
                        "torchrun each process takes RANK/WORLD_SIZE")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--chunk-size", type=int, default=1024, help="records per output file")
    p.add_argument("--workers", type=int, default=4, help="image-decoding worker processes (0: decode inline)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help=f"caption length in T5 tokens: {MAX_TOKENS} for PixArt-alpha (default), 300 for PixArt-Sigma")
    p.add_argument("--format", choices=FORMATS, default="chunks",
                   help="chunks: safetensors chunk files (default); shards: WebDataset tar shards, which training "
                        "also reads from a URL (docs/shards.md)")
    p.add_argument("--cache", default=None, help="where remote input tars are downloaded (default: under "
                   "~/.cache/pixart_fast/shards)")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, "
                   "else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="encoder dtype, also the stored one (default: bfloat16 on a GPU that has it, else float32)")
    a = p.parse_args(argv)
    summary = extract(a.images, a.vae, a.t5, a.out, a.resolution, a.multi_aspect, a.shard, a.batch_size,
                      a.chunk_size, a.image_root, a.device, a.dtype and getattr(torch, a.dtype), a.workers,
                      max_tokens=a.max_tokens, format=a.format, cache=a.cache)
    print(json.dumps({k: v if k != "unreadable" else len(v) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
