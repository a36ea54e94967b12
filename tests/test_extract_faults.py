"""Feature extraction's faults as a user meets them: a caption that is not valid Unicode is named by file and line
before any output; a fixed caption file resumes from the chunks already written; chunks carry a size + CRC-32
manifest that the dataset checks (a flipped bit names the chunk, a NaN names the chunk, record and caption); a
16-bit greyscale image keeps its tones; and `python -m pixart_fast.extract` prints a user's mistake as one
`error:` line (exit 2) and leaves no output behind."""
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixart_fast.cli import UserError
from pixart_fast.extract import extract, load_image
from pixart_fast.features import FeatureDataset, chunk_name
from pixart_fast.files import crc32
from test_extract import encoders, picture  # noqa: F401 (encoders: the tiny VAE and T5 folders, a fixture)

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [f"picture {n}" for n in range(5)]  # chunks of 2: records 0-1, 2-3, 4
SURROGATE = '{"file_name": "1.png", "text": "bad \\ud83d"}'  # valid JSON, but a lone surrogate is not Unicode


def write_metadata(root: Path, captions, lines: dict | None = None) -> None:
    """metadata.jsonl captioning n.png with captions[n]; lines: line number -> raw text put in its place."""
    text = [json.dumps({"file_name": f"{n}.png", "text": c}) for n, c in enumerate(captions)]
    for n, line in (lines or {}).items():
        text[n - 1] = line
    (root / "metadata.jsonl").write_text("\n".join(text) + "\n")


def make_images(root: Path, captions=CAPTIONS, lines: dict | None = None) -> Path:
    root.mkdir(parents=True)
    for n in range(len(captions)):
        picture("astronaut" if n % 2 else "coffee", 40 + n, 36).save(root / f"{n}.png")
    write_metadata(root, captions, lines)
    return root


def run(images, encoders, out, **kw):  # noqa: F811
    return extract(images, *encoders, out, **{"resolution": 32, "batch_size": 2, "chunk_size": 2, "progress": False,
                                              **kw})


def command(*args) -> subprocess.CompletedProcess:
    """python -m pixart_fast.extract ARGS from the repo root, as a user types it."""
    return subprocess.run([sys.executable, "-m", "pixart_fast.extract", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def data_offset(path: Path, key: str) -> int:
    """Where tensor `key`'s bytes begin in a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[key]["data_offsets"][0]


def test_a_caption_that_is_not_unicode_is_named_before_any_output(encoders, tmp_path):  # noqa: F811
    images = make_images(tmp_path / "images", lines={2: SURROGATE})
    with pytest.raises(UserError, match=r"metadata.jsonl, line 2, record 1: caption 'bad \\ud83d' is not valid "
                                        r"Unicode \(a lone surrogate at character 4\); fix its \\u escape"):
        run(images, encoders, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_fixed_caption_file_resumes_from_the_chunks_already_written(encoders, tmp_path):  # noqa: F811
    images, out = make_images(tmp_path / "images"), tmp_path / "out"
    run(images, encoders, out)
    (out / chunk_name(2)).unlink()  # the run was stopped before its last chunk
    fixed = CAPTIONS[:4] + ["picture 4, fixed"]
    write_metadata(images, fixed)
    summary = run(images, encoders, out)
    assert (summary["chunks_done_before"], summary["chunks_written"]) == (2, 1)
    assert len(FeatureDataset(out)) == 5
    # a caption changed in a chunk already written: that chunk is named; deleting it extracts it again
    write_metadata(images, ["picture 0, fixed"] + fixed[1:])
    chunk = out / chunk_name(0)
    with pytest.raises(UserError, match=rf"{re.escape(str(chunk))} holds '0.png' captioned 'picture 0', but .*"
                                        r"metadata.jsonl, line 1, record 0 now captions it 'picture 0, fixed'; "
                                        "delete that chunk to extract it again"):
        run(images, encoders, out)
    chunk.unlink()
    assert run(images, encoders, out)["chunks_written"] == 1
    with pytest.raises(UserError, match="another extraction.*resolution: 32 there, 64 now"):
        run(images, encoders, out, resolution=64)


def test_chunks_carry_a_checksum_and_a_flipped_bit_is_named(encoders, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run(make_images(tmp_path / "images"), encoders, out)
    for k in range(3):
        path = out / chunk_name(k)
        manifest = json.loads((out / f"chunk-{k:06d}.manifest.json").read_text())
        assert manifest == {"files": {path.name: {"bytes": path.stat().st_size, "crc32": crc32(path)}}}
    chunk = out / chunk_name(1)
    raw = bytearray(chunk.read_bytes())
    raw[data_offset(chunk, "2.mean")] ^= 1  # the lowest mantissa bit of a float32 latent
    chunk.write_bytes(raw)
    data = FeatureDataset(out)
    with pytest.raises(UserError, match=rf"feature chunk {re.escape(str(chunk))} is damaged \(CRC-32 [0-9a-f]{{8}}, "
                                        r"extract wrote [0-9a-f]{8}\); delete it and rerun pixart_fast.extract"):
        data.batch([2])
    assert data.batch([0, 1, 4]).images.shape[0] == 3  # the other chunks read on
    chunk.write_bytes(raw[:-10])
    with pytest.raises(UserError, match=rf"feature chunk {re.escape(str(chunk))} is not a readable safetensors file "
                                        r"\(.* bytes, extract wrote .*: cut short or overwritten"):
        FeatureDataset(out)


def test_a_nan_is_named_and_a_folder_without_manifests_is_read_unverified(encoders, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run(make_images(tmp_path / "images"), encoders, out)
    for manifest in out.glob("*.manifest.json"):  # a folder extracted before chunks had manifests
        manifest.unlink()
    chunk = out / chunk_name(1)
    raw = bytearray(chunk.read_bytes())
    at = data_offset(chunk, "3.text") + 4 * 5
    raw[at:at + 4] = struct.pack("<f", float("nan"))
    chunk.write_bytes(raw)
    with pytest.warns(UserWarning, match=r"3 of 3 chunks have no manifest .* read unverified; rerun "
                                         "pixart_fast.extract with the same arguments to write them"):
        data = FeatureDataset(out)
    assert torch.isfinite(data.batch([0, 1, 2, 4]).text).all()
    with pytest.raises(UserError, match=rf"feature chunk {re.escape(str(chunk))}: record 3 \('3.png', caption "
                                        r"'picture 3'\) holds NaN or inf in '3.text'"):
        data.batch([0, 3])
    # a rerun of the extraction adds the missing manifests; the damage is then the chunk's own
    assert run(tmp_path / "images", encoders, out)["chunks_written"] == 0
    assert sorted(p.name for p in out.glob("*.manifest.json")) == [f"chunk-{k:06d}.manifest.json" for k in range(3)]


def test_a_16_bit_greyscale_png_keeps_its_tones(tmp_path):
    levels = np.array([0, 64, 128, 255])
    Image.fromarray((levels * 257).astype(np.uint16)[None].repeat(4, 0)).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as f:
        assert f.mode in ("I;16", "I")
    image, hw, _ = load_image(tmp_path / "grey16.png", 4, None)
    assert hw == (4, 4)
    assert torch.equal(image, (torch.from_numpy(levels).float() / 127.5 - 1).expand(3, 4, 4))


def test_the_missing_data_folder_is_the_users_to_fix(tmp_path):
    with pytest.raises(UserError, match=rf"--data {re.escape(str(tmp_path))}: no index.json; extract features"):
        FeatureDataset(tmp_path)


def test_the_command_line_names_a_bad_caption_in_one_line_and_writes_nothing(encoders, tmp_path):  # noqa: F811
    vae, t5 = encoders
    images, out = make_images(tmp_path / "images", lines={2: SURROGATE}), tmp_path / "out"
    args = ["--images", images, "--vae", vae, "--t5", t5, "--out", out, "--resolution", 32, "--workers", 0]
    done = command(*args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.fullmatch(r"error: .*metadata.jsonl, line 2, record 1: caption 'bad \\ud83d' is not valid Unicode .*\n",
                        done.stderr), done.stderr
    assert not out.exists()
    # encoders that do not load (a VAE folder with its config but no weights): named, nothing written either
    write_metadata(images, CAPTIONS)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text((vae / "config.json").read_text())
    done = command(*args[:2], "--vae", tmp_path / "vae", *args[4:])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.splitlines()[-1]  # after diffusers' own log lines
    assert last.startswith(f"error: --vae {tmp_path / 'vae'}: cannot load it (") and not out.exists()
