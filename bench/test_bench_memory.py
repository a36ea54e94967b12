"""Activation memory: the bytes a training forward leaves allocated for the backward pass, per image, ours (PyTorch
and Triton kernels, each recomputation mode) against diffusers' PixArtTransformer2DModel, in fp32 and under bf16
autocast (the real training dtype).

Measured with the PyTorch profiler's memory events: every allocation and free during the forward, summed, is what
the forward leaves behind for backward (tensors autograd saved, autocast's casts it saved, the outputs selective
recomputation keeps, the block inputs full recomputation keeps), whatever mechanism holds it. Parameters exist
before and are not counted. PixArt-XL/2 does not fit a CPU's memory, so the measurement runs at XL width
(D = 1152, 256 px, 120 caption tokens) with 0 and 1 blocks and batch 1 and 2: one block's share per image is the
difference of differences. That leaves out what a step holds once whatever the batch (under autocast the bf16
copies of the weights that the backward needs, 2 bytes a parameter), reported on its own as per_block_fixed_bytes.
XL/2's per-image total is extrapolated as base + 28 blocks. The Triton kernels run through the interpreter in a subprocess
(TRITON_INTERPRET=1 must be set before Triton is imported): that executes their autograd Functions, which decide
what is saved, exactly as on a GPU.
"""
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pixart_fast.model import CONFIGS, PixArt
from pixart_fast.plan import largest_batch
from workloads import build_diffusers, make_batch, model_fn, xl_width

# variant: (model, kernels, recompute)
VARIANTS = {"ours": ("ours", "torch", "none"), "ours selective": ("ours", "torch", "selective"),
            "ours full": ("ours", "torch", "full"), "ours+triton": ("ours", "triton", "none"),
            "ours+triton selective": ("ours", "triton", "selective"), "diffusers": ("diffusers", "torch", "none")}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
XL_DEPTH = CONFIGS["PixArt-XL/2-256"].depth
XL_PARAMS = 610_856_096
MIB = 2**20


def retained_bytes(model: str, kernels: str, recompute: str, precision: str, depth: int, B: int) -> int:
    """Bytes a training forward at XL width with `depth` blocks (256 px, batch B) leaves allocated."""
    torch.manual_seed(0)
    ours = PixArt(xl_width(depth), kernels=kernels, recompute=recompute).train()
    net = ours if model == "ours" else build_diffusers(ours)
    batch = make_batch(ours.config, B, "cpu")
    fn = model_fn(net, batch)
    dtype = PRECISIONS[precision]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
            out = fn(batch.x0, batch.t)
    assert out.requires_grad
    return sum(e.self_cpu_memory_usage for e in prof.events())  # allocations minus frees


def measure(model: str, kernels: str, recompute: str, precision: str) -> list[int]:
    """Bytes at XL width, 256 px: [0 blocks batch 1, 1 block batch 1, 0 blocks batch 2, 1 block batch 2]."""
    return [retained_bytes(model, kernels, recompute, precision, depth, B) for B in (1, 2) for depth in (0, 1)]


def measure_interpreted(*args) -> list[int]:
    """`measure` in a subprocess with TRITON_INTERPRET=1, so Triton kernels run on the CPU."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_bench_memory import measure; print(json.dumps(measure(*{list(args)!r})))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_memory_per_image(benchmark, variant, precision):
    model, kernels, recompute = VARIANTS[variant]
    run = measure_interpreted if kernels == "triton" else measure
    base1, block1, base2, block2 = benchmark.pedantic(run, args=(model, kernels, recompute, precision), rounds=1,
                                                      iterations=1)
    per_block = (block2 - base2) - (block1 - base1)  # per image
    fixed = (block1 - base1) - per_block  # per step, whatever the batch
    base = base2 - base1
    xl_total = base + XL_DEPTH * per_block
    benchmark.extra_info.update(
        kind="activation_memory", model=model, kernels=kernels, recompute=recompute, variant=variant, device="cpu",
        precision=precision if precision == "fp32" else "bf16 autocast", resolution=256,
        config="PixArt-XL/2 width, 0 and 1 blocks, batch 1 and 2", base_bytes=base, per_block_bytes=per_block,
        per_block_fixed_bytes=fixed, xl2_extrapolated_bytes=xl_total,
        # what the planner's memory model makes of it (an estimate, not a measurement on a GPU)
        largest_batch_estimate={f"{res}px_{gb}GB": largest_batch(gb, XL_PARAMS, res, xl_total, XL_DEPTH * fixed)
                                for res in (256, 512, 1024) for gb in (80, 141)})
    print(f"\n{variant}, {precision}: {per_block / MIB:.2f} MiB per block per 256-px image (+ {fixed / MIB:.1f} MiB "
          f"per block per step); PixArt-XL/2 extrapolated {xl_total / MIB:.0f} MiB per image; largest batch "
          f"(planner estimate) " + ", ".join(f"{k}: {v}" for k, v in benchmark.extra_info["largest_batch_estimate"].items()))
    assert per_block > 0
