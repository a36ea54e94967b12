"""PixArt-XL/2 training steps on a GPU (forward, diffusion loss, backward, AdamW; bf16 autocast, fp32 weights):
our model with the Triton kernels on and off, each with torch.compile on and off, and diffusers'
PixArtTransformer2DModel with the same weights; the largest batch that fits; energy per image. CUDA only.

MFU = model FLOPs (pixart_fast.flops.flops_per_image: 3 x forward, matrix products only) per second / the GPU's
dense bf16 peak from the planner's table; None on a GPU missing from the table.
"""
import pytest
import torch

from gpus import EnergyMeter
from pixart_fast.flops import flops_per_image
from pixart_fast.gpus import GPUS
from workloads import TRAIN_VARIANTS, XL, XL_BATCH, adamw, build_diffusers, build_ours, largest_batch, make_batch, train_step

VARIANTS = TRAIN_VARIANTS  # name: (model, kernels, torch.compile)
WARMUP_STEPS, ROUNDS = 3, 5


def build(variant: str, resolution: int):
    name, kernels, compiled = VARIANTS[variant]
    ours = build_ours(XL[resolution], "cuda", kernels)
    model = ours if name == "ours" else build_diffusers(ours)
    del ours  # diffusers' copy holds the weights now
    return torch.compile(model) if compiled else model


def record(benchmark, device, variant, resolution, batch):
    """Throughput, MFU and peak memory of the benchmark just run, into extra_info."""
    name, kernels, compiled = VARIANTS[variant]
    seconds = benchmark.stats.stats.median
    flops = batch * flops_per_image(XL[resolution], resolution)
    gpu = GPUS.get(device["gpu"])
    benchmark.extra_info.update(
        kind="train_step", measured=True, device=device["name"], gpu=device["gpu"], model=name, kernels=kernels,
        compile=compiled, variant=variant, resolution=resolution, batch=batch, precision="bf16 autocast",
        seconds_per_step=seconds, images_per_s=batch / seconds, tflops=flops / seconds / 1e12,
        mfu=None if gpu is None else flops / seconds / (gpu.tflops * 1e12),
        peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9)


def _skip_unless_selected(resolution, train_resolutions):
    if resolution not in train_resolutions:
        pytest.skip(f"{resolution} px is not in --train-res")


@pytest.mark.parametrize("resolution", list(XL))
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step_xl(benchmark, cuda_device, train_resolutions, variant, resolution):
    _skip_unless_selected(resolution, train_resolutions)
    model, batch_size = build(variant, resolution), XL_BATCH[resolution]
    step = train_step(model, make_batch(XL[resolution], batch_size, "cuda"), adamw(model), torch.bfloat16,
                      sync=torch.cuda.synchronize)
    for _ in range(WARMUP_STEPS):  # compilation, autotuning, AdamW state, the allocator's pools
        step()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    record(benchmark, cuda_device, variant, resolution, batch_size)


@pytest.mark.parametrize("resolution", list(XL))
@pytest.mark.parametrize("variant", ["ours+triton", "diffusers"])
def test_largest_batch_xl(benchmark, cuda_device, train_resolutions, variant, resolution):
    """The largest batch whose training step fits (doubling from the timing batch, then bisecting; at most
    8 probes), and the step's throughput at that batch."""
    _skip_unless_selected(resolution, train_resolutions)
    model = build(variant, resolution)
    optimizer = adamw(model)

    def make_step(B):
        return train_step(model, make_batch(XL[resolution], B, "cuda"), optimizer, torch.bfloat16,
                          sync=torch.cuda.synchronize)

    batch_size, probes = largest_batch(make_step, XL_BATCH[resolution])
    if batch_size == 0:
        pytest.fail(f"not even batch {XL_BATCH[resolution]} fits at {resolution} px")
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(make_step(batch_size), rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, cuda_device, variant, resolution, batch_size)
    benchmark.extra_info.update(kind="largest_batch", probes=probes)


def test_train_step_energy_xl(benchmark, cuda_device):
    """Board energy per 256-px training image (NVML counter difference over the timed steps)."""
    try:
        meter = EnergyMeter()
    except RuntimeError as e:
        pytest.skip(str(e))
    resolution, variant = 256, "ours+triton"
    model, batch_size = build(variant, resolution), XL_BATCH[resolution]
    step = train_step(model, make_batch(XL[resolution], batch_size, "cuda"), adamw(model), torch.bfloat16,
                      sync=torch.cuda.synchronize)
    for _ in range(WARMUP_STEPS):
        step()
    rounds = 20
    joules = meter.joules()
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    joules = meter.joules() - joules
    record(benchmark, cuda_device, variant, resolution, batch_size)
    benchmark.extra_info.update(kind="energy", joules_per_image=joules / (rounds * batch_size),
                                mean_watts=joules / (rounds * benchmark.stats.stats.mean))
