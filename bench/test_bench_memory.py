"""Activation memory: the bytes a training forward saves for backward, per image, ours (PyTorch and Triton
kernels) against diffusers' PixArtTransformer2DModel.

Measured with torch.autograd.graph.saved_tensors_hooks, so it does not depend on the device: the distinct
storages of the saved tensors are summed (parameters and buffers excluded). PixArt-XL/2 does not fit a CPU's
memory, so the measurement runs at XL width (D = 1152, 256 px, 120 caption tokens, batch 1, fp32) with 0 and
1 blocks: one block's share is the difference, and XL/2's total is extrapolated as base + 28 blocks.
The Triton kernels run through the interpreter in a subprocess (TRITON_INTERPRET=1 must be set before Triton
is imported): that executes their autograd Functions, which decide what is saved, exactly as on a GPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pixart_fast.model import CONFIGS
from workloads import activation_bytes, xl_width

VARIANTS = {"ours": ("ours", "torch"), "ours+triton": ("ours", "triton"), "diffusers": ("diffusers", "torch")}
XL_DEPTH = CONFIGS["PixArt-XL/2-256"].depth
MIB = 2**20


def measure(model: str, kernels: str) -> list[int]:
    """Saved bytes per image at XL width, 256 px, with 0 and 1 blocks."""
    return [activation_bytes(model, xl_width(depth), 1, "cpu", kernels) for depth in (0, 1)]


def measure_interpreted(model: str, kernels: str) -> list[int]:
    """`measure` in a subprocess with TRITON_INTERPRET=1, so Triton kernels run on the CPU."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_bench_memory import measure; print(json.dumps(measure({model!r}, {kernels!r})))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_memory_per_image(benchmark, variant):
    model, kernels = VARIANTS[variant]
    run = measure_interpreted if kernels == "triton" else measure
    base, one_block = benchmark.pedantic(run, args=(model, kernels), rounds=1, iterations=1)
    per_block = one_block - base
    xl_total = base + XL_DEPTH * per_block
    benchmark.extra_info.update(
        kind="activation_memory", model=model, kernels=kernels, variant=variant, device="cpu", precision="fp32",
        resolution=256, config="PixArt-XL/2 width, 0 and 1 blocks, batch 1", base_bytes=base,
        per_block_bytes=per_block, xl2_extrapolated_bytes=xl_total)
    print(f"\n{variant}: {per_block / MIB:.2f} MiB per block per 256-px image (fp32); PixArt-XL/2 extrapolated "
          f"{xl_total / MIB:.0f} MiB per image")
    assert per_block > 0
