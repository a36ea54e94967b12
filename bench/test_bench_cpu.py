"""A training step on the CPU, ours against diffusers' PixArtTransformer2DModel with the same weights, timed
alternately in one run so that both see the same machine load.

One intra-op thread: on a shared machine with more runnable processes than cores, PyTorch's OpenMP threads
wait on each other at every barrier and a step's time swings 50-fold (measured on a 2-core CI machine: 90 ms
with one thread, 0.2 to 7 s with two), which would time the scheduler instead of the models.
"""
import statistics
import time

import torch

from workloads import CPU_BATCH, CPU_CONFIG, adamw, build_diffusers, build_ours, make_batch, train_step

ROUNDS, WARMUP = 15, 3


def test_cpu_train_step_ours_vs_diffusers(benchmark):
    ours = build_ours(CPU_CONFIG, "cpu", kernels="auto")
    ref = build_diffusers(ours)
    batch = make_batch(CPU_CONFIG, CPU_BATCH, "cpu")
    step_ours, step_ref = train_step(ours, batch, adamw(ours)), train_step(ref, batch, adamw(ref))
    ref_seconds = []

    def time_ref_step():  # pytest-benchmark runs this before every round, untimed: diffusers' step, timed here
        start = time.perf_counter()
        step_ref()
        ref_seconds.append(time.perf_counter() - start)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.pedantic(step_ours, setup=time_ref_step, rounds=ROUNDS, warmup_rounds=WARMUP)
    finally:
        torch.set_num_threads(threads)
    assert len(ref_seconds) == ROUNDS + WARMUP
    ours_s, ref_s = benchmark.stats.stats.median, statistics.median(ref_seconds[WARMUP:])
    c = CPU_CONFIG
    config = f"hidden {c.hidden_size}, depth {c.depth}, {(c.input_size // 2) ** 2} image / {c.max_tokens} caption tokens"
    benchmark.extra_info.update(
        kind="cpu_train_step", device="cpu", threads=1, config=config, batch=CPU_BATCH, precision="fp32",
        ours_median_s=ours_s, diffusers_median_s=ref_s, ratio_ours_over_diffusers=ours_s / ref_s)
    print(f"\nCPU training step (1 thread), batch {CPU_BATCH}, {config}: ours {ours_s * 1e3:.1f} ms, "
          f"diffusers {ref_s * 1e3:.1f} ms (median of {ROUNDS}); ours / diffusers = {ours_s / ref_s:.3f}")
