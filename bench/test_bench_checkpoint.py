"""What verified checkpoints cost: writing and verifying the manifest of a PixArt-XL/2-sized checkpoint folder
(611 M parameters: model and EMA weights in fp32, AdamW's two moments: about 9.8 GB) against saving it, on this
machine's disk, with the project's own writers (pixart_fast.checkpoints, pixart_fast.files).

Needs about 10 GB of memory and of free disk in the temporary folder; skips where there is less.
"""
import os
import shutil
import time

import pytest
import torch

from pixart_fast.checkpoints import save_safetensors
from pixart_fast.files import atomic_path, verify_manifest, write_manifest
from pixart_fast.model import CONFIGS, PixArt

GB = 1e9


def test_manifest_cost_against_a_save(benchmark, tmp_path):
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if available < 14 * GB or shutil.disk_usage(tmp_path).free < 12 * GB:
        pytest.skip("needs about 14 GB of free memory and 12 GB of free disk")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PixArt(CONFIGS["PixArt-XL/2-256"], kernels="torch").state_dict().items()}
    weights = {k: torch.randn(s) for k, s in shapes.items()}
    moments = {k: {"exp_avg": torch.randn(s), "exp_avg_sq": torch.rand(s)} for k, s in shapes.items()}
    folder = tmp_path / "step-0000001"
    folder.mkdir()

    def save():
        save_safetensors(weights, folder / "model.safetensors")
        save_safetensors(weights, folder / "ema.safetensors")
        with atomic_path(folder / "trainer.pt") as path:
            torch.save({"optimizer": moments}, path)

    start = time.perf_counter()
    save()
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    write_manifest(folder)
    manifest_s = time.perf_counter() - start
    problems = benchmark.pedantic(verify_manifest, args=(folder,), rounds=1, iterations=1)
    assert problems == []
    size = sum(p.stat().st_size for p in folder.iterdir())
    verify_s = benchmark.stats.stats.median
    benchmark.extra_info.update(kind="checkpoint_manifest", bytes=size, save_s=save_s, manifest_s=manifest_s,
                                verify_s=verify_s, checksum="crc32")
    print(f"\ncheckpoint of {size / GB:.2f} GB: save {save_s:.1f} s, manifest {manifest_s:.1f} s "
          f"({manifest_s / save_s:.0%} of the save), verify {verify_s:.1f} s (warm page cache)")
