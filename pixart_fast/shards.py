"""Extracted features as WebDataset tar shards, read in place or from object storage: `open_features(source)`.

`python -m pixart_fast.extract --format shards` writes, beside index.json, one `shard-XXXXXX.tar` per chunk of
records and its table `shard-XXXXXX.json`. A shard holds, per sample, WebDataset's usual pair of members with
the sample's key (its record index, 9 digits): `{key}.safetensors` (tensors "mean", "std": the VAE's latent
distribution (C, h, w); "text": the caption's valid T5 tokens (n, E)) and `{key}.json` (image file, caption,
original and cropped size, bucket ratio, token count, label). Any WebDataset reader reads them; the table lists
the same small columns for every sample of the shard, with the tar's size and CRC-32, so training knows every
sample's bucket without opening a shard. The table is written after its tar: a shard is finished when both
are there.

`ShardDataset(source, cache)` is a FeatureDataset over such shards; `source` is a local folder or a URL prefix
that webdataset's gopen opens (http(s)://, gs://, hf://, or `pipe:` with a command holding `{name}`, e.g.
`pipe:aws s3 cp s3://bucket/features/{name} -` for a private bucket). index.json and the tables are read at
start; a remote shard is downloaded into `cache` (webdataset's FileCache: a temporary name, then a rename) the
first time a batch needs one of its samples, and read there from then on. Batches are what FeatureDataset.batch
reads: each sample's bytes straight into the batch's tensors, from offsets found once per process in the tar's
headers and the sample's safetensors header. A shard is checked against its table's size and CRC-32 (and
scanned for NaN and inf) when a process first reads it; a damaged copy in the cache is downloaded again once.
"""
import hashlib
import json
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from webdataset.cache import FileCache
from webdataset.gopen import gopen
from webdataset.writer import TarWriter

from pixart_fast.features import (FORMAT, INDEX, FeatureDataset, FeatureError, _KEYS, _Layout, _check_size,
                                  _parse_layout, _verify)
from pixart_fast.files import atomic_path, crc32

SHARDS = "pixart_fast.shards/1"  # index.json's format of a shard set
_TABLE = ("index", "hw", "size", "ratio", "tokens")  # a table's columns, with "label" where there are labels
_REWRITE = "delete it and its .json table, then rerun pixart_fast.extract --format shards with the same arguments"


def shard_name(k: int) -> str:
    """The file name of shard k (the records of chunk k)."""
    return f"shard-{k:06d}.tar"


def table_name(k: int) -> str:
    """The file name of shard k's table: its size, CRC-32 and every sample's small columns."""
    return f"shard-{k:06d}.json"


def sample_key(record: int) -> str:
    """The WebDataset key of record `record`'s sample."""
    return f"{record:09d}"


def is_remote(source: str) -> bool:
    return "://" in source or source.startswith("pipe:")


def no_s3_scheme(flag: str, source: str, example: str) -> None:
    """Refuse an s3:// URL (webdataset opens none) with the pipe: source that reads it."""
    if source.startswith("s3://"):
        raise FeatureError(f"{flag} {source}: S3 is read through a command, e.g. {flag} 'pipe:aws s3 cp "
                           f"{example} -' (docs/shards.md)")


def default_cache(source: str) -> Path:
    """Where the shards of remote `source` are kept: ~/.cache/pixart_fast/shards/<hash of source>."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "pixart_fast" / "shards" / hashlib.sha256(source.encode()).hexdigest()[:16]


def location(source: str, name: str) -> str:
    """The path or URL of file `name` of a shard set at `source` (a `{name}` in it is replaced, else appended)."""
    if "{name}" in source:
        return source.replace("{name}", name)
    return f"{source.rstrip('/')}/{name}" if is_remote(source) else str(Path(source) / name)


# ----------------------------------------------------------------------------------------------------------
# Writing (pixart_fast.extract --format shards)
# ----------------------------------------------------------------------------------------------------------


def write_shard(path: Path, samples: dict, meta: dict, records: dict, skipped: list) -> None:
    """Write shard `path` (shard-XXXXXX.tar) and then its table. samples: record index -> {"mean", "std",
    "text", "hw", "size", "ratio"} (as pixart_fast.extract.write_chunk takes them); records: record index ->
    pixart_fast.extract.Record. Both files are written atomically; the tar's members have a fixed mtime, so the
    same features give the same bytes."""
    kept = sorted(samples)
    rows = {"index": kept, "hw": [list(samples[i]["hw"]) for i in kept],
            "size": [list(samples[i]["size"]) for i in kept], "ratio": [float(samples[i]["ratio"]) for i in kept],
            "tokens": [len(samples[i]["text"]) for i in kept]}
    if meta["num_classes"] is not None:
        rows["label"] = [records[i].label for i in kept]
    rows |= {"file": [records[i].file for i in kept], "caption": [records[i].caption for i in kept]}
    with atomic_path(path) as tmp, open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0) as tar:
        for j, i in enumerate(kept):
            tensors = save({key: samples[i][key].contiguous() for key in _KEYS})
            info = {column: values[j] for column, values in rows.items() if column != "index"}
            tar.write({"__key__": sample_key(i), "safetensors": tensors, "json": json.dumps(info).encode()})
    table = {"format": SHARDS, "bytes": path.stat().st_size, "crc32": crc32(path), "samples": rows,
             "skipped": skipped}
    with atomic_path(path.with_name(table_name(int(path.stem.removeprefix("shard-"))))) as tmp:
        tmp.write_text(json.dumps(table) + "\n")


def read_table(path: Path) -> dict:
    """A finished shard's table (a local file); unreadable raises FeatureError naming it."""
    try:
        table = json.loads(Path(path).read_text())
        if not all(isinstance(table["samples"][c], list) for c in ("index", "file", "caption")):
            raise ValueError("its index, file and caption columns are not lists")
        return table
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FeatureError(f"shard table {path} is unreadable ({type(e).__name__}: {e}); {_REWRITE}") from None


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _fetch(url: str) -> bytes:
    """The bytes at a path or URL (gopen: a curl or a pipe command for a remote one)."""
    try:
        with gopen(url) as f:
            return f.read()
    except Exception as e:  # noqa: BLE001 - gopen raises what its handler (curl, a pipe) reports
        raise FeatureError(f"{url}: cannot read it ({type(e).__name__}: {e}); check the URL, that the file is "
                           "there, and the credentials") from None


class ShardDataset(FeatureDataset):
    """The samples of a shard set (local folder or URL, see the module docstring), in record order: a
    FeatureDataset (buckets, bucket_ids, batch, check_model) whose chunks are tar shards. cache: the folder
    remote shards are downloaded to (default: default_cache(source)); a local set is read in place."""

    def __init__(self, source, cache=None):
        self.source = str(source)
        no_s3_scheme("--data", self.source, f"{self.source.rstrip('/')}/{{name}}")
        self.root = self.source  # named in messages, as a feature folder
        self.remote = is_remote(self.source)
        self.cache = Path(cache) if cache else default_cache(self.source) if self.remote else None
        if not self.remote and not (Path(self.source) / INDEX).is_file():
            raise FeatureError(f"--data {self.source}: no {INDEX}; extract shards into it first "
                               f"(python -m pixart_fast.extract --format shards --out {self.source} ...)")
        self.meta = self._json(INDEX)
        if self.meta.get("format") != SHARDS:
            raise FeatureError(f"--data {self.source}: {INDEX} has format {self.meta.get('format')!r}, expected "
                               f"{SHARDS!r} (a shard set: python -m pixart_fast.extract --format shards)")
        n = self.meta["num_chunks"]
        if not self.remote:
            missing = [table_name(k) for k in range(n) if not (Path(self.source) / table_name(k)).exists()]
            if missing:
                raise FeatureError(f"--data {self.source}: the extraction is incomplete, {len(missing)} of {n} shards "
                                   f"unfinished ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); rerun "
                                   "pixart_fast.extract with the same arguments (every process) to finish it")
        with ThreadPoolExecutor(8) as pool:  # remote: one request each, in parallel
            tables = list(pool.map(self._json, [table_name(k) for k in range(n)]))
        columns = _TABLE + (("label",) if self.num_classes is not None else ())
        dtypes = {"index": torch.int64, "hw": torch.int32, "size": torch.int32, "ratio": torch.float32,
                  "tokens": torch.int32, "label": torch.int64}
        try:
            t = {c: torch.tensor([v for table in tables for v in table["samples"][c]], dtype=dtypes[c])
                 for c in columns}
            # what a process checks a shard against (the files and captions, for messages, are read again then)
            self._entries = [{"bytes": int(table["bytes"]), "crc32": str(table["crc32"])} for table in tables]
        except (KeyError, TypeError, ValueError) as e:
            raise FeatureError(f"--data {self.source}: a shard table lacks or garbles {e}; {_REWRITE}") from None
        tokens, max_tokens = t["tokens"], self.meta["max_tokens"]
        if len(tokens) and not 1 <= tokens.min() <= tokens.max() <= max_tokens:
            raise FeatureError(f"--data {self.source}: 'tokens' should lie in 1..{max_tokens}, found "
                               f"{tokens.min()}..{tokens.max()}; {_REWRITE}")
        for c in ("hw", "size"):
            t[c] = t[c].reshape(-1, 2)
        chunk = torch.cat([torch.full((len(table["samples"]["index"]),), k) for k, table in enumerate(tables)])
        self._index(t, chunk)
        self._locks = {k: threading.Lock() for k in range(n)}  # one download of a shard at a time

    def _json(self, name: str) -> dict:
        where = location(self.source, name)
        try:
            return json.loads(Path(where).read_text() if not self.remote else _fetch(where))
        except FileNotFoundError:
            raise FeatureError(f"--data {self.source}: no {name}; extract the shards first or fix the path") from None
        except FeatureError:
            raise
        except (OSError, ValueError) as e:
            raise FeatureError(f"{where} is unreadable ({type(e).__name__}: {e}); {_REWRITE}") from None

    def _captions(self, k: int) -> tuple[list, list]:
        """The image files and captions of shard k's samples, from its table."""
        samples = self._json(table_name(k))["samples"]
        return samples["file"], samples["caption"]

    def _local(self, k: int) -> Path:
        """Shard k as a local file: in place, or downloaded into the cache (once)."""
        if not self.remote:
            return Path(self.source) / shard_name(k)
        name = shard_name(k)
        self.cache.mkdir(parents=True, exist_ok=True)
        with self._locks[k]:
            try:
                return Path(FileCache(str(self.cache), url_to_name=lambda _: name, validator=None)
                            .get_file(location(self.source, name)))
            except Exception as e:  # noqa: BLE001 - what the download's handler (curl, a pipe) raised
                raise FeatureError(f"--data {self.source}: cannot download {name} into {self.cache} "
                                   f"({type(e).__name__}: {e}); check the URL and the network") from None

    def _open_chunk(self, k: int):
        """(open shard file, its _Layout): parsed and verified the first time this process opens the shard (a
        damaged copy in the cache is deleted and downloaded again, once)."""
        for attempt in (0, 1):
            path = self._local(k)
            f = open(path, "rb", buffering=0)
            try:
                def parse(stamp, records, shapes):
                    _check_size(path, stamp[0], self._entries[k])
                    return _verify(f, path, _tar_layout(f, path, stamp, records, shapes), records, shapes,
                                   self._entries[k], lambda _: self._captions(k))

                return f, self._layout(k, f, parse)
            except FeatureError as e:
                f.close()
                if not self.remote:
                    raise
                path.unlink(missing_ok=True)  # a damaged or stale cached copy: downloaded again once
                if attempt:
                    raise FeatureError(f"{e} [downloaded twice from {location(self.source, shard_name(k))}: the copy "
                                       "there is damaged; upload the shard and its table again]") from None
            except BaseException:
                f.close()
                raise

    def __getstate__(self):
        """Pickled (a worker process): without parsed layouts or locks; each process makes its own."""
        return {**super().__getstate__(), "_locks": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._locks = {k: threading.Lock() for k in range(self.meta["num_chunks"])}


def _tar_layout(f, path: Path, stamp: tuple, records: list[int], shapes: list[tuple]) -> _Layout:
    """The _Layout of an open tar shard whose rows are `records` with (latent, text) `shapes`: each sample's
    safetensors member found in the tar's headers, its tensors' offsets in its own header."""
    members = {}
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                key, _, ext = m.name.rpartition("/")[2].partition(".")
                if ext == "safetensors":
                    members[key] = (m.offset_data, m.size)
    except tarfile.TarError as e:
        raise FeatureError(f"shard {path} is not a readable tar file ({e}); {_REWRITE}") from None
    offsets, codes = np.zeros((len(records), 3), np.int64), np.zeros((len(records), 3), np.int8)
    errors = {}
    for j, (r, shape) in enumerate(zip(records, shapes)):
        if sample_key(r) not in members:
            errors[j] = f"shard {path} has no member {sample_key(r)}.safetensors (record {r}); {_REWRITE}"
            continue
        start, size = members[sample_key(r)]
        one = _parse_layout(f, path, stamp, [r], [shape], prefixed=False, start=start, size=size)
        offsets[j], codes[j] = one.offsets[0], one.codes[0]
        if 0 in one.errors:
            errors[j] = one.errors[0]
    return _Layout(path, stamp, offsets, codes, errors)


def open_features(source, cache=None) -> FeatureDataset:
    """The features at `source` (--data): a shard set (a URL, or a folder whose index.json says so) as a
    ShardDataset, else a feature folder as a FeatureDataset."""
    source = str(source)
    if is_remote(source):
        return ShardDataset(source, cache)
    try:
        fmt = json.loads((Path(source) / INDEX).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = FORMAT  # FeatureDataset names what is wrong
    return ShardDataset(source, cache) if fmt == SHARDS else FeatureDataset(source)
