"""Crash-safe writes and verified folders: what every file the project writes goes through.

- `atomic_path`: write to a temporary file, fsync, rename, fsync the folder. A crash leaves the old file or the
  whole new one, never a torn one. Weights, checkpoints, feature chunks and caches are written this way.
- `write_manifest` / `verify_manifest`: a folder's `manifest.json` lists each file's size and CRC-32, written last
  (inside the temporary folder of a checkpoint, before its rename). Atomic renames protect against our own
  crashes; the manifest catches what happens to a file afterwards: a disk, a copy or a sync tool that cut it
  short or flipped a bit. CRC-32 detects every error burst of up to 32 bits and any truncation (with the size),
  and runs at about 2 GB/s a core, several times faster than SHA-256: verifying stays cheap next to a save.
"""
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 16 << 20  # bytes read at a time while checksumming


def fsync_dir(folder) -> None:
    """Make the entries of a folder (files created or renamed in it) durable: fsync the folder itself."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Write a file crash-safely: yields a temporary path beside `path` (its name + suffix) to write to; then
    fsyncs it, renames it to `path` and fsyncs the folder. A crash at any moment leaves `path` as it was or
    whole and new, never half-written (at worst a *.tmp leftover); an exception removes the temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def crc32(path) -> str:
    """The CRC-32 of a file's bytes, as 8 hex digits."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)  # releases the GIL: files are checksummed in parallel threads
    return f"{value:08x}"


def _checksums(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(crc32, paths))


def write_manifest(folder, names: list[str] | None = None, manifest: str = MANIFEST) -> Path:
    """Write `folder/manifest.json` (atomically) listing every other file in the folder with its size in bytes
    and its CRC-32. Call it after the last file is written. names / manifest: list only these files of the
    folder, in a manifest of that name (one per file of a folder that several processes fill)."""
    folder = Path(folder)
    if names is None:
        names = [p.name for p in folder.iterdir() if p.is_file() and p.name != manifest]
    names = sorted(names)
    sums = _checksums([folder / n for n in names])
    files = {n: {"bytes": (folder / n).stat().st_size, "crc32": s} for n, s in zip(names, sums)}
    with atomic_path(folder / manifest) as tmp:
        tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    return folder / manifest


def verify_manifest(folder) -> list[str] | None:
    """Check a folder against its manifest. Returns None when it has no manifest (written before manifests
    existed), else the problems found, one line each naming the file and how it differs (empty: intact)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{folder.name}/{MANIFEST}: unreadable ({type(e).__name__}: {e})"]
    problems, present = [], []
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{folder.name}/{name}: missing, manifest lists {want['bytes']:,} bytes")
        elif (size := path.stat().st_size) != want["bytes"]:
            problems.append(f"{folder.name}/{name}: {size:,} bytes, manifest says {want['bytes']:,}")
        else:
            present.append(name)
    for name, got in zip(present, _checksums([folder / n for n in present])):
        if got != files[name]["crc32"]:
            problems.append(f"{folder.name}/{name}: contents differ from the manifest (CRC-32 {got}, manifest "
                            f"says {files[name]['crc32']}): damaged since it was written")
    return problems
