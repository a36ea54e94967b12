"""Each Triton kernel against its eager PyTorch reference and torch.compile of that reference, forward and
forward + backward, at PixArt-XL/2 shapes (bench/cases.py). CUDA only: the interpreter times nothing useful.

Timing: pytest-benchmark times REPS calls followed by one torch.cuda.synchronize, so launch latency overlaps
as it does in training; extra_info holds the per-call time, GB/s, % of the GPU's peak bandwidth, TFLOP/s and,
for Triton, % of kernels/roofline.py's roofline time of its launches.
The forward runs with gradients enabled, as in a training step (torch.compile then runs its training forward).
"""
import pytest
import torch

from cases import cases, kernel_call, roofline_seconds
from pixart_fast.kernels.backend import interpreting
from pixart_fast.gpus import GPUS

CASES = {case.name: case for case in cases()}
REPS, ROUNDS = 10, 10


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["triton", "eager", "compile"])
@pytest.mark.parametrize("case", CASES)
def test_kernel(benchmark, cuda_device, case, impl, direction):
    if interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set: unset it to time compiled kernels")
    c, backward = CASES[case], direction == "fwd+bwd"
    fn = {"triton": c.triton, "eager": c.ref, "compile": torch.compile(c.ref, dynamic=False)}[impl]
    call = kernel_call(fn, c.inputs(torch.device("cuda")), backward)

    def run():
        for _ in range(REPS):
            call()
        torch.cuda.synchronize()

    run()  # compile, autotune, allocate
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    seconds = benchmark.stats.stats.median / REPS
    nbytes = c.bytes(False) + (c.bytes(True) if backward else 0)
    flops = c.flops(False) + (c.flops(True) if backward else 0)
    gpu = GPUS.get(cuda_device["gpu"])
    roofline = roofline_seconds(c, backward, cuda_device["gpu"])  # kernels/roofline.py, of the Triton launches
    benchmark.extra_info.update(
        kind="kernel", measured=True, device=cuda_device["name"], gpu=cuda_device["gpu"], kernel=c.kernel,
        tokens=c.tokens, batch=c.batch, impl=impl, direction=direction, seconds_per_call=seconds, bytes=nbytes,
        gb_per_s=nbytes / seconds / 1e9, tflops=flops / seconds / 1e12,
        pct_peak_bandwidth=None if gpu is None else 100 * nbytes / seconds / 1e9 / gpu.bandwidth_gbs,
        pct_roofline=None if impl != "triton" or roofline is None else 100 * roofline / seconds)
