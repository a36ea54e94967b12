"""Estimates, not measurements: the best the GPU benchmarks could show, from a stated roofline model. Every row
carries "estimate": true, and bench/summary.py prints them under an "estimate" heading.

Kernels: time >= max(FLOPs / dense bf16 peak, bytes / memory bandwidth), FLOPs and bytes from bench/cases.py.
Training step of PixArt-XL/2: time >= matrix-product FLOPs (pixart_fast.flops: 3 x forward) / dense bf16 peak
+ AdamW's traffic / bandwidth (28 bytes per fp32 parameter: read weight, gradient and two moments, write weight
and two moments). Elementwise work and launch overheads are left out, so these are lower bounds on time and
upper bounds on images/s; the MFU they imply is below 100 % only by the optimizer's share.
Peaks: pixart_fast.gpus.GPUS, each with its datasheet source.
"""
import torch

from cases import cases
from gpus import roofline_seconds
from pixart_fast.model import PixArt
from pixart_fast.flops import flops_per_image
from pixart_fast.gpus import GPUS
from workloads import XL, XL_BATCH

ADAMW_BYTES_PER_PARAM = 28


def kernel_rows(gpu_keys) -> list[dict]:
    rows = []
    for key in gpu_keys:
        for case in cases():
            for direction, parts in (("fwd", (False,)), ("fwd+bwd", (False, True))):
                flops = sum(case.flops(b) for b in parts)
                nbytes = sum(case.bytes(b) for b in parts)
                gpu = GPUS[key]
                compute_bound = flops / (gpu.tflops * 1e12) > nbytes / (gpu.bandwidth_gbs * 1e9)
                rows.append(dict(estimate=True, gpu=key, kernel=case.kernel, tokens=case.tokens, batch=case.batch,
                                 direction=direction, bytes=nbytes, flops=flops,
                                 seconds=roofline_seconds(flops, nbytes, gpu),
                                 bound="compute" if compute_bound else "memory"))
    return rows


def train_rows() -> list[dict]:
    rows = []
    for res, cfg in XL.items():
        with torch.device("meta"):
            params = sum(p.numel() for p in PixArt(cfg, kernels="torch").parameters())
        B = XL_BATCH[res]
        flops = B * flops_per_image(cfg, res)
        for key, gpu in GPUS.items():
            seconds = flops / (gpu.tflops * 1e12) + params * ADAMW_BYTES_PER_PARAM / (gpu.bandwidth_gbs * 1e9)
            rows.append(dict(estimate=True, gpu=key, resolution=res, batch=B, params=params, flops=flops,
                             seconds=seconds, images_per_s=B / seconds,
                             mfu=flops / seconds / (gpu.tflops * 1e12)))
    return rows


def test_roofline_estimates(benchmark, device):
    kernel_gpus = [device["gpu"]] if device["gpu"] else ["A100-80GB", "H100"]
    kernels, train = benchmark.pedantic(lambda: (kernel_rows(kernel_gpus), train_rows()), rounds=1, iterations=1)
    benchmark.extra_info.update(kind="estimates", estimate=True, device=device["name"], kernel_rows=kernels,
                                train_rows=train)
    a100 = {r["resolution"]: r for r in train if r["gpu"] == "A100-80GB"}
    print("\nestimate (roofline bound), PixArt-XL/2 training step on A100-80GB: "
          + ", ".join(f"{res} px {r['images_per_s']:.0f} images/s" for res, r in a100.items()))
    assert all(0 < r["mfu"] < 1 for r in train)
