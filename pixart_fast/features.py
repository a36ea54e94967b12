"""Training data from extracted features (`python -m pixart_fast.extract`): `FeatureDataset(root)`.

`dataset.batch(indices)` gives a `pixart_fast.batch.Batch` of one bucket: latent_mean / latent_std (B, C, h, w)
float32, the VAE's latent distributions (unscaled); text (B, L, E) T5 features, L the extraction's max_tokens (120,
or 300 for PixArt-Sigma), zero past each caption (float32, or with text_dtype=None as stored: bfloat16 from a GPU
extraction); mask (B, L) bool, True on the captions' tokens; img_hw (B, 2) float32 original (height, width) in
pixels; aspect_ratio (B,) float32, the bucket's ratio (1.0 without --multi-aspect): PixArtMS's micro-conditions;
labels (B,) int64, where the extraction had labels. Its `x0(eps)` is a training latent (mean + std * eps) *
scaling_factor with fresh eps ~ N(0, 1): a new sample of the latent distribution at every step, as PixArt's
feature loader does. `dataset[i]` is sample i as a dict of those (text float32 and padded): "latent_mean",
"latent_std", "text", "mask", "img_hw", "aspect_ratio", "label".

Reading is built for the trainer's appetite (hundreds of 256-px samples a second per GPU): a chunk's header is
parsed once per process (not once per sample), a batch reads each sample's stored bytes straight into the batch's
tensors (only the caption's valid tokens are stored; the padding is zeroed in place), optionally into page-locked
memory, and several threads may build batches at once (pixart_fast.loader.prefetch). Worker processes (fork or
pickle) each parse the headers they read.

Each chunk has a manifest beside it (`chunk-XXXXXX.manifest.json`: its size and CRC-32, as pixart_fast.files
writes for checkpoints). Sizes are checked when the dataset opens; the CRC-32 when a process first reads the
chunk, together with a scan for NaN and inf in its samples: a chunk damaged since extraction (a bit flipped on a
disk or in a copy) is refused, and a sample that is not finite is named by chunk, record and caption, instead of
training on wrong values or skipping steps of a NaN loss. A folder extracted before chunks had manifests is read
unverified, with one warning; rerunning pixart_fast.extract on it writes them.

pixart_fast.shards reads the same features from WebDataset tar shards (`extract --format shards`), local or
remote, through this class's batch path.

Whatever a user can fix raises FeatureError (a pixart_fast.cli.UserError and a ValueError) naming the file and
what to do: a folder that is not an extraction, a chunk damaged or not what pixart_fast.extract writes
(unreadable, a key missing, a wrong dtype or shape: its small tables when the dataset opens, a sample's tensors
when a batch holding the sample is read, as checking every sample's header entries at start would cost minutes
on millions of samples), a model that does not fit the features.
"""
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from pixart_fast.batch import Batch
from pixart_fast.cli import UserError
from pixart_fast.files import crc32

# The format `python -m pixart_fast.extract` writes (it imports these): an index.json and numbered chunk files.
FORMAT = "pixart_fast.features/1"
INDEX = "index.json"


def chunk_name(k: int) -> str:
    """The file name of chunk k of an extraction folder."""
    return f"chunk-{k:06d}.safetensors"


def manifest_name(k: int) -> str:
    """The file name of chunk k's manifest (pixart_fast.files.write_manifest's format: its size and CRC-32)."""
    return f"chunk-{k:06d}.manifest.json"


class FeatureError(UserError, ValueError):
    """Extraction input or features that cannot be used as they are: the message names the file and what to do."""


# Small per-chunk tables, read once at start: key -> (dtype, shape of one row); one row per sample of the chunk.
_TABLES = {"index": (torch.int64, ()), "hw": (torch.int32, (2,)), "size": (torch.int32, (2,)),
           "ratio": (torch.float32, ()), "tokens": (torch.int32, ())}
_LABEL = {"label": (torch.int64, ())}
_FEATURES = (torch.float32, torch.bfloat16)  # the dtypes extract stores encoder outputs in
_REWRITE = "delete it and rerun pixart_fast.extract with the same arguments to write it again"


def _open(path: Path):
    """safe_open of a chunk; a file that is not safetensors (damaged, cut short) raises FeatureError naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise FeatureError(f"feature chunk {path} is not a readable safetensors file ({e}); {_REWRITE}") from None


def _tensor(f, path: Path, key: str) -> torch.Tensor:
    """Tensor `key` of an open chunk; a missing one raises FeatureError naming the chunk and the key."""
    try:
        return f.get_tensor(key)
    except SafetensorError:
        raise FeatureError(f"feature chunk {path} has no tensor {key!r}; {_REWRITE}") from None


def _dtype_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _mismatch(path: Path, key: str, dtype, shape: tuple, dtypes: tuple, want: tuple) -> str | None:
    """None if (dtype, shape) is one of dtypes with shape want; else the message naming the chunk, the key, and
    the expected and found dtype and shape."""
    if dtype in dtypes and tuple(shape) == tuple(want):
        return None
    return (f"feature chunk {path}: {key!r} should be {' or '.join(_dtype_name(d) for d in dtypes)} of shape "
            f"{tuple(want)}, found {_dtype_name(dtype)} of shape {tuple(shape)}; {_REWRITE}")


def _check(path: Path, key: str, t: torch.Tensor, dtypes: tuple, shape: tuple) -> None:
    """Raise FeatureError naming the chunk, the key, and the expected and found dtype and shape."""
    error = _mismatch(path, key, t.dtype, tuple(t.shape), dtypes, shape)
    if error:
        raise FeatureError(error)


_KEYS = ("mean", "std", "text")  # a sample's tensors, in the order they are checked and read
# safetensors' dtype names -> torch dtypes (a name missing here is reported as it is written)
_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
           "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
           "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


_STORED = {"F32": (0, 4), "BF16": (1, 2)}  # safetensors' names of _FEATURES -> (index in _FEATURES, item size)


@dataclass(frozen=True)
class _Layout:
    """Where a chunk's samples lie in its file, from its header: parsed once per process, not once per sample."""

    path: Path
    stamp: tuple  # (size, mtime_ns, inode) of the file parsed: a rewritten chunk is parsed again
    offsets: np.ndarray  # (n, 3) int64: byte offset in the file of row j's mean, std and text
    codes: np.ndarray  # (n, 3) int8: their dtypes, indices into _FEATURES
    errors: dict  # row -> the message reading it raises (a tensor missing, of a wrong dtype or shape, or not finite)


def _not_safetensors(path: Path, why) -> "FeatureError":
    return FeatureError(f"feature chunk {path} is not a readable safetensors file ({why}); {_REWRITE}")


def _parse_layout(f, path: Path, stamp: tuple, records: list[int], shapes: list[tuple], prefixed: bool = True,
                  start: int = 0, size: int | None = None) -> _Layout:
    """The _Layout of an open chunk file whose rows are `records` with (latent, text) `shapes`. The safetensors
    format: an 8-byte little-endian header size, a JSON header {name: {"dtype", "shape", "data_offsets": [begin,
    end] after the header}}, the data. A chunk names its tensors "{record}.mean" (prefixed); a safetensors file
    of one sample inside a tar shard (pixart_fast.shards) names them "mean", and lies at byte `start` of the
    file, `size` bytes long (offsets are from the start of the file either way)."""
    size = stamp[0] if size is None else start + size
    f.seek(start)
    try:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8 bytes that give its header's size")
        n = int.from_bytes(head, "little")
        if n > size - start - 8:
            raise ValueError(f"its header of {n} bytes is longer than the file")
        header, base = json.loads(f.read(n)), start + 8 + n
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise _not_safetensors(path, e) from None
    offsets, codes = np.zeros((len(records), 3), np.int64), np.zeros((len(records), 3), np.int8)
    errors = {}
    for j, (r, (latent, text)) in enumerate(zip(records, shapes)):
        names = [f"{r}.{key}" if prefixed else key for key in _KEYS]
        entries = [header.get(name) for name in names]
        for c, (e, want) in enumerate(zip(entries, (latent, latent, text))):
            try:  # the common case first, cheaply: a chunk of a million samples has three million entries
                code, itemsize = _STORED[e["dtype"]]
                begin, end = e["data_offsets"]
                if e["shape"] == list(want) and end - begin == math.prod(want) * itemsize and base + end <= size:
                    offsets[j, c], codes[j, c] = base + begin, code
                    continue
            except (KeyError, TypeError, ValueError):
                pass
            errors[j] = _entry_error(path, names, entries, c, want, base, size)
            break
    return _Layout(path, stamp, offsets, codes, errors)


def _entry_error(path: Path, names: list, entries: list, c: int, want: tuple, base: int, size: int) -> str:
    """The message for a sample whose entry c (of names / entries, the header's) is not what it should be: the
    first tensor missing, else entry c's dtype or shape, else where its data lie."""
    if None in entries:
        return f"feature chunk {path} has no tensor {names[entries.index(None)]!r}; {_REWRITE}"
    name, e = names[c], entries[c]
    try:
        dtype, shape, (begin, end) = _DTYPES.get(e["dtype"], e["dtype"]), tuple(e["shape"]), e["data_offsets"]
        error = _mismatch(path, name, dtype, shape, _FEATURES, want)
        if error is None and (end - begin != math.prod(shape) * dtype.itemsize or base + end > size):
            error = str(_not_safetensors(path, f"{name!r} does not lie where its header says"))
        return error or str(_not_safetensors(path, f"its header entry {name!r} is malformed"))
    except (KeyError, TypeError, ValueError):
        return str(_not_safetensors(path, f"its header entry {name!r} is malformed"))


def _manifest_entry(root: Path, k: int) -> dict | None:
    """Chunk k's entry in its manifest, {"bytes", "crc32"}; None where it has no manifest (an older extraction)."""
    path = root / manifest_name(k)
    try:
        entry = json.loads(path.read_text())["files"][chunk_name(k)]
        return {"bytes": int(entry["bytes"]), "crc32": str(entry["crc32"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FeatureError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it and {chunk_name(k)}, then "
                           "rerun pixart_fast.extract with the same arguments to write them again") from None


def _check_size(path: Path, size: int, entry: dict | None) -> None:
    if entry is not None and size != entry["bytes"]:
        raise _not_safetensors(path, f"{size:,} bytes, extract wrote {entry['bytes']:,}: cut short or overwritten")


# Per index into _FEATURES: the stored dtype as unsigned words and the bits of its exponent, all ones in NaN and inf
_EXPONENT = ((np.uint32, 0x7F800000), (np.uint16, 0x7F80))


def _chunk_captions(path: Path) -> tuple[list, list]:
    """The image files and captions of a chunk's samples, from its metadata."""
    with _open(path) as st:
        info = st.metadata() or {}
    return tuple(json.loads(info.get(key, "[]")) for key in ("files", "captions"))


def _verify(f, path: Path, layout: _Layout, records: list[int], shapes: list[tuple], entry: dict | None,
            captions=_chunk_captions) -> _Layout:
    """Check an open chunk (rows `records` of `shapes`, as _parse_layout's) against its manifest entry (None: an
    older chunk, not checked) and scan its samples for NaN and inf: a damaged chunk raises FeatureError; a sample
    not finite gets its message in the returned layout's errors, naming the chunk, the record, its image file and
    caption (captions(path): the files and captions of the chunk's rows)."""
    _check_size(path, layout.stamp[0], entry)
    if entry is not None and (got := crc32(path)) != entry["crc32"]:
        raise FeatureError(f"feature chunk {path} is damaged (CRC-32 {got}, extract wrote {entry['crc32']}); "
                           f"{_REWRITE}")
    raw, bad = np.memmap(f, np.uint8, mode="r"), {}  # the samples read in place; unmapped when raw is freed
    for j, (latent, text) in enumerate(shapes):
        if j in layout.errors:
            continue
        for c, shape in enumerate((latent, latent, text)):
            word, ones = _EXPONENT[layout.codes[j, c]]
            at = int(layout.offsets[j, c])
            if ((raw[at:at + math.prod(shape) * np.dtype(word).itemsize].view(word) & ones) == ones).any():
                bad[j] = c
                break
    if not bad:
        return layout
    files, captions = captions(path)
    errors = {}
    for j, c in bad.items():
        r = records[j]
        named = f"{files[j]!r}, caption {captions[j]!r}" if j < min(len(files), len(captions)) else "?"
        errors[j] = f"feature chunk {path}: record {r} ({named}) holds NaN or inf in '{r}.{_KEYS[c]}'; {_REWRITE}"
    return replace(layout, errors={**errors, **layout.errors})


def _readinto(f, offset: int, dst: np.ndarray, path: Path, key: str) -> None:
    """Read len(dst) bytes at `offset` of open file f into dst (a contiguous uint8 array); the read releases the
    GIL. A file that ends first raises FeatureError naming the chunk and the tensor."""
    view = memoryview(dst)
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise FeatureError(f"feature chunk {path}: {key!r} is cut short ({done} of {len(view)} bytes); {_REWRITE}")
        done += got


class _Into:
    """One tensor of a batch (B rows: mean, std or text) and how its rows are read: straight into it when every
    row is stored in its dtype; else into a scratch buffer of the stored dtype, converted in one copy at the end
    (per row where the rows' stored dtypes differ)."""

    def __init__(self, out: torch.Tensor, codes: np.ndarray, buffers: "_Buffers"):
        self.out, self.codes, self.buf = out, codes, None
        kinds = np.unique(codes)
        if len(kinds) == 1:
            stored = _FEATURES[kinds[0]]
            self.buf = out if stored == out.dtype else buffers.empty(tuple(out.shape), stored)
            self.bytes = self.buf.view(torch.uint8).reshape(len(out), -1).numpy()  # (B, bytes of a row)
            self.unit = math.prod(out.shape[2:]) * stored.itemsize  # bytes of one token (text)

    def read(self, f, b: int, offset: int, n: int | None, path: Path, key: str) -> None:
        """Row b from offset: all of it (n None), or its n tokens with the rest of the row zeroed (text)."""
        if self.buf is not None:
            row = self.bytes[b]
            _readinto(f, offset, row if n is None else row[: n * self.unit], path, key)
            if n is not None:
                row[n * self.unit:] = 0  # numpy: one thread, the GIL released (torch's zero_ would fan out)
            return
        dst = self.out[b] if n is None else self.out[b, :n]
        tmp = torch.empty(dst.shape, dtype=_FEATURES[self.codes[b]])
        _readinto(f, offset, tmp.view(torch.uint8).reshape(-1).numpy(), path, key)
        dst.copy_(tmp)
        if n is not None:
            self.out[b, n:].zero_()

    def finish(self) -> None:
        if self.buf is not None and self.buf is not self.out:
            self.out.copy_(self.buf)


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # references to a tensor storage, from C++ too


def _uses(t: torch.Tensor) -> int:
    return _use_count(t.untyped_storage()._cdata)


class _Buffers:
    """Batch-sized CPU tensors, reused: a fresh 100-MB tensor costs more in page faults (the kernel zeroing
    every page) than filling it with a batch (measured: 81 ms against 21 ms for 126 MB). A buffer is handed out
    again only once nothing refers to its memory (its storage's use count: views, autograd's saved tensors and
    numpy arrays count), so a batch the trainer or anything else still holds is never overwritten. Thread-safe;
    a forked child starts with its own empty pool. Page-locked batches are not pooled (torch's caching host
    allocator reuses them, knowing which copies to the GPU are still running)."""

    def __init__(self, keep: int = 32):
        self.keep = keep
        self._reset()

    def _reset(self) -> None:
        self._pid, self._lock, self._bases = os.getpid(), threading.Lock(), []  # [(base tensor, its idle count)]

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if _use_count is None:
            return torch.empty(shape, dtype=dtype)
        if os.getpid() != self._pid:  # a forked child: the parent's lock may have been held at the fork
            self._reset()
        numel = math.prod(shape)
        with self._lock:
            for n, (base, idle) in enumerate(self._bases):
                if base.dtype == dtype and base.numel() == numel and _uses(base) == idle:
                    self._bases.append(self._bases.pop(n))  # most recently used last
                    return base.view(shape)  # a view: its own reference to the storage while it lives
            base = torch.empty(numel, dtype=dtype)
            self._bases.append((base, _uses(base)))
            if len(self._bases) > self.keep:
                self._bases.pop(0)  # forgotten, not freed: whoever holds it keeps it
            return base.view(shape)

    def __getstate__(self):
        return {"keep": self.keep}

    def __setstate__(self, state):
        self.keep = state["keep"]
        self._reset()


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
            raise FeatureError(f"--data {self.root}: no {INDEX}; extract features into it first "
                               f"(python -m pixart_fast.extract --out {self.root} ...)")
        self.meta = json.loads(path.read_text())
        if self.meta.get("format") != FORMAT:
            raise FeatureError(f"--data {self.root}: {INDEX} has format {self.meta.get('format')!r}, expected "
                               f"{FORMAT!r}")
        missing = [chunk_name(k) for k in range(self.meta["num_chunks"]) if not (self.root / chunk_name(k)).exists()]
        if missing:
            raise FeatureError(f"--data {self.root}: the extraction is incomplete, {len(missing)} of "
                               f"{self.meta['num_chunks']} chunks missing ({', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''}); rerun pixart_fast.extract with the same "
                               "arguments (every --shard) to finish it")
        entries = [_manifest_entry(self.root, k) for k in range(self.meta["num_chunks"])]
        if None in entries:
            warnings.warn(f"--data {self.root}: {entries.count(None)} of {len(entries)} chunks have no manifest "
                          "(written by an older pixart_fast.extract), so they are read unverified; rerun "
                          "pixart_fast.extract with the same arguments to write them", stacklevel=2)
        specs = _TABLES | (_LABEL if self.num_classes is not None else {})
        tables, chunk = {key: [] for key in specs}, []
        for k in range(self.meta["num_chunks"]):
            path = self.root / chunk_name(k)
            _check_size(path, path.stat().st_size, entries[k])
            with _open(path) as f:
                found = {key: _tensor(f, path, key) for key in specs}
            n = len(found["index"]) if found["index"].dim() else 0
            for key, (dtype, row) in specs.items():
                _check(path, key, found[key], (dtype,), (n, *row))
                tables[key].append(found[key])
            if n and not 1 <= found["tokens"].min() <= found["tokens"].max() <= self.meta["max_tokens"]:
                raise FeatureError(f"feature chunk {path}: 'tokens' should lie in 1..{self.meta['max_tokens']}, found "
                                   f"{found['tokens'].min()}..{found['tokens'].max()}; {_REWRITE}")
            chunk.append(torch.full((n,), k))
        self._index({key: torch.cat(v) for key, v in tables.items()}, torch.cat(chunk))

    def _index(self, t: dict, chunk: torch.Tensor) -> None:
        """Set the dataset's tables from the chunks' small tables concatenated (t: key -> tensor, one row per
        sample) and each sample's chunk."""
        if len(t["index"]) == 0:
            raise FeatureError(f"--data {self.root}: no sample in it (were all images unreadable?)")
        self.records, self.chunk = t["index"].tolist(), chunk.tolist()  # record index and chunk of i
        self.img_hw, self.ratio, self.tokens = t["hw"].float(), t["ratio"], t["tokens"].tolist()
        self.labels = t["label"].tolist() if "label" in t else None
        sizes, ids = torch.unique(t["size"], dim=0, return_inverse=True)
        self.buckets = [tuple(s) for s in sizes.tolist()]  # (height, width) in pixels
        self._bucket_ids = ids.numpy()
        # The batch path's tables: each sample's chunk, row in it and caption length; each chunk's first sample.
        self._chunk_ids = chunk.numpy()
        self._first = np.searchsorted(self._chunk_ids, np.arange(self.meta["num_chunks"] + 1))
        self._rows = np.arange(len(self._chunk_ids)) - self._first[self._chunk_ids]
        self._tokens = t["tokens"].numpy().astype(np.int64)
        self._labels = t.get("label")
        self._layouts = {}  # chunk -> _Layout, parsed when this process first reads the chunk
        self._buffers = _Buffers()  # batch tensors, reused once nothing refers to them

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
        """Sample i as a dict (the module docstring's keys): text float32, padded to max_tokens. For inspection
        and tests; training reads whole batches with `batch`, which reads each sample's bytes once."""
        b = self.batch([i])
        sample = {"latent_mean": b.images[0], "latent_std": b.latent_std[0], "text": b.text[0], "mask": b.mask[0],
                  "img_hw": b.img_hw[0], "aspect_ratio": b.aspect_ratio[0]}
        if b.labels is not None:
            sample["label"] = int(b.labels[0])
        return sample

    def batch(self, indices, text_dtype: torch.dtype | None = torch.float32, pin_memory: bool = False) -> Batch:
        """The samples at `indices` (one bucket) as one Batch; its x0(eps) scales latents by the VAE's factor.

        Each sample's stored bytes are read straight into the batch's tensors (latents float32; a chunk opened
        once per batch, its header parsed once per process), then the text padding zeroed.
        text_dtype: the dtype of Batch.text; None keeps the stored one (bfloat16 from a GPU extraction: half the
        bytes to read, pad and copy to the GPU; the model then needs it cast, e.g. pixart_fast.loader.to_device).
        pin_memory: allocate the batch in page-locked memory (where CUDA is available), for asynchronous copies
        to the GPU. Thread-safe: batches may be built in several threads (pixart_fast.loader.prefetch)."""
        if text_dtype is not None and not text_dtype.is_floating_point:
            raise ValueError(f"text_dtype must be a floating-point dtype or None, got {text_dtype}")
        idx = self._positions(indices)
        buckets = np.unique(self._bucket_ids[idx])
        latent_sizes = self.latent_sizes()
        if len(buckets) > 1:
            shapes = sorted((self.latent_channels, *latent_sizes[k]) for k in buckets.tolist())
            raise ValueError(f"cannot stack 'latent_mean' of shapes {shapes}: batch one bucket at a time "
                             "(the dataset's bucket_ids())")
        B, L, E = len(idx), self.meta["max_tokens"], self.caption_channels
        latent = (self.latent_channels, *latent_sizes[buckets[0]])
        lengths = self._tokens[idx]
        pin = pin_memory and torch.cuda.is_available()
        chunks, rows = self._chunk_ids[idx], self._rows[idx]
        opened = {}  # chunk -> (open file, its layout)
        try:
            for k in np.unique(chunks).tolist():
                opened[k] = self._open_chunk(k)
            layouts = [opened[k][1] for k in chunks.tolist()]
            for layout, j in zip(layouts, rows.tolist()):  # a bad sample raises as when samples were read one by
                if j in layout.errors:                      # one: the first in the batch's order
                    raise FeatureError(layout.errors[j])
            codes = np.stack([layout.codes[j] for layout, j in zip(layouts, rows.tolist())])  # (B, 3) stored dtypes
            offsets = np.stack([layout.offsets[j] for layout, j in zip(layouts, rows.tolist())])
            stored_text = np.unique(codes[:, 2])
            dtype = text_dtype or (_FEATURES[stored_text[0]] if len(stored_text) == 1 else torch.float32)
            if pin:
                def empty(shape, dt):
                    return torch.empty(shape, dtype=dt, pin_memory=True)
            else:
                empty = self._buffers.empty
            outs = (empty((B, *latent), torch.float32), empty((B, *latent), torch.float32), empty((B, L, E), dtype))
            into = [_Into(out, codes[:, c], self._buffers) for c, out in enumerate(outs)]
            for b in np.lexsort((offsets[:, 0], chunks)).tolist():  # chunk by chunk, in file order
                f, n = opened[chunks[b]][0], int(lengths[b])
                for c in range(3):
                    into[c].read(f, b, int(offsets[b, c]), n if c == 2 else None, layouts[b].path,
                                 f"{self.records[idx[b]]}.{_KEYS[c]}")
            for x in into:
                x.finish()
        finally:
            for f, _ in opened.values():
                f.close()
        mean, std, text = outs
        mask = torch.arange(L) < torch.from_numpy(lengths)[:, None]
        t = torch.from_numpy(idx)
        small = {"img_hw": self.img_hw[t], "aspect_ratio": self.ratio[t], "mask": mask,
                 "labels": None if self._labels is None else self._labels[t]}
        if pin:
            small = {key: v if v is None else v.pin_memory() for key, v in small.items()}
        return Batch(images=mean, latent_std=std, latent_scale=self.meta["scaling_factor"], text=text, **small)

    def _positions(self, indices) -> np.ndarray:
        """indices (ints, a list, an array or a tensor) -> (B,) int64 sample positions; negatives count from the
        end, as a list's; out of range raises IndexError."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            raise ValueError("a batch needs at least one sample index")
        n = len(self)
        if idx.min() < -n or idx.max() >= n:
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"sample index {bad} out of range: {self.root} has {n} samples")
        return idx % n

    def _open_chunk(self, k: int):
        """(open chunk file, its _Layout): parsed and verified (_verify) the first time this process opens the
        chunk, again if the file changed since."""
        path = self.root / chunk_name(k)
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            raise FeatureError(f"feature chunk {path} is not a readable safetensors file ({e}); {_REWRITE}") from None
        try:
            layout = self._layout(k, f, lambda stamp, records, shapes: _verify(
                f, path, _parse_layout(f, path, stamp, records, shapes), records, shapes, _manifest_entry(self.root, k)))
        except BaseException:
            f.close()
            raise
        return f, layout

    def _layout(self, k: int, f, parse) -> _Layout:
        """Chunk k's _Layout, open as f: `parse(stamp, records, shapes)` (parsed and verified) the first time this
        process opens the chunk, and again if the file changed since (another size, mtime or inode)."""
        st = os.fstat(f.fileno())
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        layout = self._layouts.get(k)
        if layout is None or layout.stamp != stamp:
            layout = parse(stamp, self.records[self._first[k]:self._first[k + 1]], self._expected_shapes(k))
            self._layouts[k] = layout  # a dict assignment: atomic, no lock (threads may parse it twice)
        return layout

    def _expected_shapes(self, k: int) -> list[tuple]:
        """The (latent, text) shapes chunk k's samples must have."""
        start, stop = self._first[k], self._first[k + 1]
        sizes, C, E = self.latent_sizes(), self.latent_channels, self.caption_channels
        return [((C, *sizes[b]), (n, E)) for b, n in zip(self._bucket_ids[start:stop].tolist(),
                                                          self._tokens[start:stop].tolist())]

    def __getstate__(self):
        """Pickled (a worker process): without the parsed chunk layouts; each process parses its own."""
        return {**self.__dict__, "_layouts": {}}

    def check_model(self, config, name: str, class_conditional: bool) -> None:
        """Raise FeatureError, naming both sides, if model `name` (a PixArtConfig) cannot train on these features."""
        where = f"--data {self.root}"
        if config.in_channels != self.latent_channels:
            raise FeatureError(f"{where} holds {self.latent_channels}-channel latents but model {name} has in_channels "
                               f"{config.in_channels}; pick a --model with in_channels {self.latent_channels}, or "
                               "extract with a matching --vae")
        if class_conditional:
            if self.num_classes is None:
                raise FeatureError(f"{where} has no class labels; stage 1 is class-conditional: extract from metadata "
                                   "with an integer 'label' on every record, or train stage 2 or 3")
            if self.num_classes > config.num_classes:
                raise FeatureError(f"{where} has labels up to {self.num_classes - 1} but model {name} has "
                                   f"num_classes {config.num_classes}")
            side = (config.input_size, config.input_size)
            if any(s != side for s in self.latent_sizes()):
                raise FeatureError(f"{where} has latents of sizes {self.latent_sizes()} but stage 1's DiT has fixed "
                                   f"positions for {side}; pick a --model with input_size {self.latent_sizes()[0][0]}")
            return
        if config.caption_channels != self.caption_channels or config.max_tokens != self.meta["max_tokens"]:
            raise FeatureError(f"{where} holds {self.caption_channels}-dim caption features of "
                               f"{self.meta['max_tokens']} tokens but model {name} has caption_channels "
                               f"{config.caption_channels} and max_tokens {config.max_tokens}; pick a matching "
                               f"--model, or extract with a matching --t5 and --max-tokens {config.max_tokens}")
        # A PixArt takes any size, but its position scale (pe_interpolation) and released weights are for one:
        # far from it (a quarter or four times the tokens, e.g. 256-px data on a 1024-px model) is a wrong --model.
        native = config.input_size**2
        far = [s for s in self.latent_sizes() if not native / 4 <= s[0] * s[1] <= native * 4]
        if far:
            raise FeatureError(f"{where} has latents of {far[0][0]}x{far[0][1]} but model {name} is made for "
                               f"{config.input_size}x{config.input_size} (position scale {config.pe_interpolation:g}); "
                               "pick the --model of your images' resolution, or extract at its --resolution")
        odd = [s for s in self.latent_sizes() if s[0] % config.patch_size or s[1] % config.patch_size]
        if odd:
            raise FeatureError(f"{where} has latent sizes {odd} not divisible by model {name}'s patch size "
                               f"{config.patch_size}")
