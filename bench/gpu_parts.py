"""The GPU check's measurements, one function per part: part(check, part) fills the part's items through the guard
(check.item) and adds measured rows to check.report["benchmarks"], in the extra_info format of `pytest bench/`.
Without CUDA a part is marked "skipped: no CUDA"; in a dry run its code runs at tiny shapes on the CPU instead
(part["smoke"]).

- train_steps_256: PixArt-XL/2 training steps at 256 px (batch 32; forward, diffusion loss, backward, fused
  AdamW; bf16 autocast, fp32 weights): ours+triton, diffusers, ours+triton+compile, ours+compile,
  diffusers+compile, ours; images/s, TFLOP/s, MFU (pixart_fast.flops.flops_per_image over the GPU's dense bf16
  peak in pixart_fast.gpus.GPUS) and peak memory.
- energy: board energy per 256-px training image (NVML, bench/gpus.EnergyMeter), when NVML works.
- profile: torch.profiler over one ours+triton training step at 256 px, the top 25 CUDA kernels by device time.
- kernels: every Triton kernel of bench/cases.py at 256 and 1024 tokens against eager PyTorch and
  torch.compile of its reference, forward and forward + backward.
- largest_batch: the largest 256-px batch whose training step fits (bench/workloads.largest_batch).
- train_steps_512: as train_steps_256 at 512 px (batch 8).

"compile" is regional by default (`--compile-mode regional`): each transformer block is compiled in place
(`block.compile()`; the identical blocks share their compiled code, a graph or two rather than 28), the embedders
and the loss stay eager; that compiles in tens of seconds where the whole model can take minutes.
`--compile-mode full` compiles the whole model as bench/test_bench_train.py does.
"""
import contextlib
import re
import statistics
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import cases
from gpu_guard import Check
from gpu_report import WARMUP_STEPS
from gpus import EnergyMeter
from pixart_fast.flops import flops_per_image
from pixart_fast.gpus import GPUS
from pixart_fast.kernels.backend import interpreting
from pixart_fast.model import PixArtConfig
from workloads import (TRAIN_VARIANTS, XL, XL_BATCH, PixArtTransformer2DModel, adamw, build_diffusers, build_ours,
                       largest_batch, make_batch, train_step)

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = "skipped: no CUDA"
NO_DIFFUSERS = "skipped: diffusers not importable"

# workloads.TRAIN_VARIANTS (name: (model, kernels, compile)) in the order they run: the most telling first
VARIANT_ORDER = ("ours+triton", "diffusers", "ours+triton+compile", "ours+compile", "diffusers+compile", "ours")
ROUNDS, ENERGY_ROUNDS = 5, 20
KERNEL_TOKENS = (256, 1024)
KERNEL_REPS, KERNEL_ROUNDS = 10, 10
TOP_KERNELS = 25


def variants() -> dict:
    """workloads.TRAIN_VARIANTS in VARIANT_ORDER."""
    return {name: TRAIN_VARIANTS[name] for name in VARIANT_ORDER}


def diffusers_ok() -> bool:
    return PixArtTransformer2DModel is not None


# ----------------------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------------------

# The dry run's model: tiny, a few milliseconds a step on one CPU thread.
def tiny_config() -> PixArtConfig:
    return PixArtConfig(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=2, caption_channels=32,
                        max_tokens=8)


def compile_model(model, mode: str):
    """torch.compile: "full" wraps the whole model; "regional" compiles each transformer block in place."""
    if mode == "full":
        return torch.compile(model)
    blocks = getattr(model, "blocks", None) or getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise AttributeError(f"{type(model).__name__} has neither .blocks nor .transformer_blocks")
    for block in blocks:
        block.compile()
    return model


def build(variant: str, cfg, device: str, compile_mode: str):
    name, kernels, compiled = variants()[variant]
    ours = build_ours(cfg, device, kernels)
    model = ours if name == "ours" else build_diffusers(ours)
    del ours
    return compile_model(model, compile_mode) if compiled else model


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def make_step(model, cfg, batch_size: int, device: str, optimizer=None):
    """bench/workloads.train_step: bf16 autocast, the paper's AdamW (fused on CUDA), a synchronize at the end."""
    return train_step(model, make_batch(cfg, batch_size, device), optimizer or adamw(model), torch.bfloat16,
                      sync=_sync if device == "cuda" else None)


def time_steps(step, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def train_row(check: Check, kind: str, variant: str, cfg, resolution: int, batch: int, times: list[float],
              **extra) -> dict:
    """One row in the extra_info format of bench/test_bench_train.py (plus compile_mode, warm-up, all times)."""
    name, kernels, compiled = variants()[variant]
    seconds = statistics.median(times)
    flops = batch * flops_per_image(cfg, resolution)
    gpu = GPUS.get(check.gpu_key)
    cuda = check.device == "cuda"
    return dict(
        kind=kind, measured=True, device=check.report["environment"].get("device"), gpu=check.gpu_key, model=name,
        kernels=kernels, compile=compiled, compile_mode=check.args.compile_mode if compiled else None,
        variant=variant, resolution=resolution, batch=batch, precision="bf16 autocast",
        seconds_per_step=seconds, step_seconds=[round(t, 6) for t in times], images_per_s=batch / seconds,
        tflops=flops / seconds / 1e12, mfu=None if gpu is None else flops / seconds / (gpu.tflops * 1e12),
        peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if cuda else None, **extra)


def measure_train(check: Check, variant: str, cfg, resolution: int, batch: int, device: str,
                  warmup: int = WARMUP_STEPS, rounds: int = ROUNDS) -> dict:
    model = build(variant, cfg, device, check.args.compile_mode)
    step = make_step(model, cfg, batch, device)
    start = time.perf_counter()
    for _ in range(warmup):  # compilation, autotuning, AdamW state, the allocator's pools
        step()
    warmup_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, rounds)
    return train_row(check, "train_step", variant, cfg, resolution, batch, times, warmup_steps=warmup,
                     warmup_s=round(warmup_s, 3))


def part_train_steps(resolution: int):
    def run(check: Check, part: dict):
        have_diffusers = diffusers_ok()
        if not have_diffusers:
            part["notes"].append("diffusers is not importable: its variants are skipped (gpu_check.sh --wheels DIR)")
        if check.device != "cuda":
            part["status"] = NO_CUDA
            if check.dry and not any(p.get("smoke") for n, p in check.report["parts"].items()
                                     if n.startswith("train_steps")):
                part["smoke"] = smoke_train(check, have_diffusers)
            elif check.dry:
                part["notes"].append("dry run: the same code as the other resolution's smoke, not repeated")
            return
        for variant in variants():
            skip = NO_DIFFUSERS if variants()[variant][0] == "diffusers" and not have_diffusers else None
            row = check.item(part, f"{variant} {resolution}px",
                             lambda v=variant: measure_train(check, v, XL[resolution], resolution,
                                                             XL_BATCH[resolution], "cuda"), skip)
            if row:
                check.report["benchmarks"].append({"name": f"gpu_check train_step {variant} {resolution}px",
                                                   "extra_info": row})
    return run


def smoke_train(check: Check, have_diffusers: bool) -> dict:
    """The dry run's stand-in: the same measurement on the CPU, tiny model; Triton and compile variants need CUDA."""
    cfg = tiny_config()
    smoke = {"config": "tiny (hidden 64, depth 2, 16 tokens), CPU, bf16 autocast", "rows": [], "items": []}
    for variant, (name, kernels, compiled) in variants().items():
        skip = NO_CUDA if kernels == "triton" or compiled else \
            NO_DIFFUSERS if name == "diffusers" and not have_diffusers else None
        row = check.item(smoke, f"{variant} (tiny, CPU)",
                         lambda v=variant: measure_train(check, v, cfg, cfg.input_size * 8, 2, "cpu", 1, 2), skip)
        if row:
            smoke["rows"].append(row)
    smoke["status"] = "ok" if all(i["status"] in ("ok", NO_CUDA, NO_DIFFUSERS) for i in smoke["items"]) else "failed"
    return smoke


# ----------------------------------------------------------------------------------------------------------
# Energy, profile, largest batch
# ----------------------------------------------------------------------------------------------------------


def part_energy(check: Check, part: dict):
    if check.device != "cuda":
        part["status"] = NO_CUDA
        return
    try:
        meter = EnergyMeter()
    except RuntimeError as e:
        part["status"] = f"skipped: {e}"
        return

    def measure():
        variant, resolution = "ours+triton", 256
        cfg, batch = XL[resolution], XL_BATCH[resolution]
        model = build(variant, cfg, "cuda", check.args.compile_mode)
        step = make_step(model, cfg, batch, "cuda")
        for _ in range(WARMUP_STEPS):
            step()
        torch.cuda.reset_peak_memory_stats()
        joules = meter.joules()
        times = time_steps(step, ENERGY_ROUNDS)
        joules = meter.joules() - joules
        return train_row(check, "energy", variant, cfg, resolution, batch, times,
                         joules_per_image=joules / (ENERGY_ROUNDS * batch), mean_watts=joules / sum(times))

    row = check.item(part, "ours+triton 256px, 20 steps", measure)
    if row:
        check.report["benchmarks"].append({"name": "gpu_check energy ours+triton 256px", "extra_info": row})


def _our_kernel_names() -> set[str]:
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names.update(re.findall(r"@triton\.jit[^\n]*\n\s*def (\w+)", path.read_text()))
    return names


def kernel_category(name: str, ours: set[str]) -> str:
    low = name.lower()
    if any(name == k or name.startswith(k + "_") for k in ours):
        return "ours (Triton)"
    if low.startswith("triton_"):
        return "inductor (Triton)"
    if any(s in low for s in ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "sm90_", "sm80_")):
        return "matmul"
    if any(s in low for s in ("flash", "fmha", "attention", "sdpa", "mem_eff")):
        return "attention"
    if "memcpy" in low or "memset" in low:
        return "memcpy/memset"
    return "other"


def _device_us(evt) -> float:
    us = getattr(evt, "self_device_time_total", None)  # torch >= 2.4; self_cuda_time_total before
    return evt.self_cuda_time_total if us is None else us


def profile_table(prof, device: str, top: int = TOP_KERNELS) -> dict:
    """The top kernels (CUDA) or ops (CPU, dry run) by self time, and the time by category."""
    events = list(prof.key_averages())
    what = "CUDA kernels by self device time" if device == "cuda" else "CPU ops by self CPU time"

    def collect(keep, time_of):
        return [{"name": e.key, "calls": e.count, "self_us": float(time_of(e))} for e in events
                if keep(e) and time_of(e) > 0]

    if device == "cuda":
        rows = collect(lambda e: getattr(e, "device_type", None) == DeviceType.CUDA, _device_us)
        if not rows:  # no kernel events recorded: the operators that launched device work instead
            what = "operators by self device time (the profiler recorded no kernel events)"
            rows = collect(lambda e: True, _device_us)
    else:
        rows = collect(lambda e: True, lambda e: e.self_cpu_time_total)
    total = sum(r["self_us"] for r in rows) or 1.0
    ours = _our_kernel_names()
    categories = {}
    for r in rows:
        r["pct"] = 100 * r["self_us"] / total
        r["avg_us"] = r["self_us"] / max(r["calls"], 1)
        r["category"] = kernel_category(r["name"], ours) if device == "cuda" else "cpu op"
        categories[r["category"]] = categories.get(r["category"], 0.0) + r["self_us"]
    rows.sort(key=lambda r: -r["self_us"])
    return {"what": what, "total_us": total, "distinct": len(rows),
            "categories": {k: {"us": v, "pct": 100 * v / total}
                           for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
            "top": rows[:top]}


def profile_step(check: Check, variant: str, cfg, batch: int, device: str, warmup: int) -> dict:
    model = build(variant, cfg, device, check.args.compile_mode)
    step = make_step(model, cfg, batch, device)
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
    seconds = time.perf_counter() - start
    table = profile_table(prof, device)
    table.update(variant=variant, batch=batch, step_seconds_profiled=seconds,
                 config="PixArt-XL/2 256 px" if device == "cuda" else "tiny (dry run)")
    return table


def part_profile(check: Check, part: dict):
    if check.device != "cuda":
        part["status"] = NO_CUDA
        if check.dry:
            smoke = {"items": []}
            smoke["table"] = check.item(smoke, "ours (tiny, CPU)",
                                        lambda: profile_step(check, "ours", tiny_config(), 2, "cpu", 1))
            smoke["status"] = "ok" if smoke["table"] else "failed"
            part["smoke"] = smoke
        return
    part["table"] = check.item(part, "ours+triton 256px, one step",
                               lambda: profile_step(check, "ours+triton", XL[256], XL_BATCH[256], "cuda", WARMUP_STEPS))


def measure_largest(check: Check, variant: str, cfg, resolution: int, start: int, device: str,
                    simulated_limit: int | None = None) -> dict:
    """bench/workloads.largest_batch, then the step's timing at that batch. simulated_limit (dry run): batches
    above it raise torch.OutOfMemoryError, as a full GPU would."""
    model = build(variant, cfg, device, check.args.compile_mode)
    optimizer = adamw(model)  # shared by the probes, as in bench/test_bench_train.py
    step_for = {}

    def make(B):
        if simulated_limit is not None and B > simulated_limit:
            def oom():
                raise torch.OutOfMemoryError(f"simulated: batch {B} > {simulated_limit}")
            return oom
        step_for.clear()  # one step (and its batch) alive at a time
        step_for[B] = make_step(model, cfg, B, device, optimizer)
        return step_for[B]

    start_s = time.perf_counter()
    batch, probes = largest_batch(make, start)
    search_s = time.perf_counter() - start_s
    if batch == 0:
        raise RuntimeError(f"not even batch {start} fits at {resolution} px")
    step = make(batch)
    step()  # warm-up at this shape
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, 3)
    return train_row(check, "largest_batch", variant, cfg, resolution, batch, times, probes=probes,
                     search_seconds=round(search_s, 2), simulated=simulated_limit is not None)


def part_largest_batch(check: Check, part: dict):
    have_diffusers = diffusers_ok()
    if check.device != "cuda":
        part["status"] = NO_CUDA
        if check.dry:
            cfg, smoke = tiny_config(), {"items": [], "rows": [],
                                         "note": "batches above 6 raise a simulated torch.OutOfMemoryError"}
            row = check.item(smoke, "ours (tiny, CPU, simulated memory limit 6)",
                             lambda: measure_largest(check, "ours", cfg, cfg.input_size * 8, 2, "cpu", 6))
            if row:
                smoke["rows"].append(row)
            smoke["status"] = "ok" if row and row["batch"] == 6 else "failed"
            part["smoke"] = smoke
        return
    for variant in ("ours+triton", "diffusers"):
        skip = NO_DIFFUSERS if variant == "diffusers" and not have_diffusers else None
        row = check.item(part, f"{variant} 256px",
                         lambda v=variant: measure_largest(check, v, XL[256], 256, XL_BATCH[256], "cuda"), skip)
        if row:
            check.report["benchmarks"].append({"name": f"gpu_check largest_batch {variant} 256px", "extra_info": row})


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tiny_cases():
    """bench/cases.py at tiny shapes (the dry run): its shape constants swapped for the duration."""
    tiny = dict(D=64, HEADS=2, HEAD_DIM=32, CAPTION_TOKENS=8, TOKENS=(16, 64), TOKENS_PER_CALL=128)
    saved = {k: getattr(cases, k) for k in tiny}
    for k, v in tiny.items():
        setattr(cases, k, v)
    try:
        yield cases
    finally:
        for k, v in saved.items():
            setattr(cases, k, v)


def time_kernel(call, reps: int, rounds: int) -> float:
    """Median over rounds of (reps calls then one synchronize) / reps, after one warm-up round."""
    def run():
        for _ in range(reps):
            call()
        _sync()
    run()  # compile, autotune, allocate
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / reps


def _pct_roofline(case, backward: bool, gpu_key: str | None, seconds: float) -> float | None:
    """100 x kernels/roofline.py's roofline time of the Triton launches / the measured time (the modulate family's
    goal: >= 80 at 256 px); None at tiny shapes, on another GPU, or without that launch."""
    if cases.D != 1152:  # the dry run's tiny shapes: the roofline table is for PixArt-XL/2's
        return None
    roofline = cases.roofline_seconds(case, backward, gpu_key)
    return None if roofline is None else 100 * roofline / seconds


def kernel_rows(check: Check, case, impl: str, device: str, reps: int, rounds: int) -> list[dict]:
    """Both directions of one case and implementation, in test_bench_kernels.py's extra_info format."""
    fn = {"triton": case.triton, "eager": case.ref}.get(impl) or torch.compile(case.ref, dynamic=False)
    inputs = case.inputs(torch.device(device))
    gpu = GPUS.get(check.gpu_key)
    rows = []
    for direction in ("fwd", "fwd+bwd"):
        backward = direction == "fwd+bwd"
        seconds = time_kernel(cases.kernel_call(fn, inputs, backward), reps, rounds)
        nbytes = case.bytes(False) + (case.bytes(True) if backward else 0)
        flops = case.flops(False) + (case.flops(True) if backward else 0)
        rows.append(dict(
            kind="kernel", measured=True, device=check.report["environment"].get("device"), gpu=check.gpu_key,
            kernel=case.kernel, tokens=case.tokens, batch=case.batch, impl=impl, direction=direction,
            seconds_per_call=seconds, bytes=nbytes, gb_per_s=nbytes / seconds / 1e9, tflops=flops / seconds / 1e12,
            pct_peak_bandwidth=None if gpu is None else 100 * nbytes / seconds / 1e9 / gpu.bandwidth_gbs,
            pct_roofline=_pct_roofline(case, backward, check.gpu_key, seconds) if impl == "triton" else None))
    return rows


def part_kernels(check: Check, part: dict):
    if check.device != "cuda":
        part["status"] = NO_CUDA
        if check.dry:
            smoke = {"items": [], "rows": [], "note": "bench/cases.py at tiny shapes (D 64, 2 heads, 16 and 64 "
                                                      "tokens), eager only: Triton and compile need CUDA"}
            with tiny_cases():
                for case in cases.cases():
                    for impl in ("triton", "eager", "compile"):
                        rows = check.item(smoke, f"{case.name} {impl}",
                                          lambda c=case, i=impl: kernel_rows(check, c, i, "cpu", 2, 2),
                                          None if impl == "eager" else NO_CUDA)
                        smoke["rows"] += rows or []
            smoke["status"] = "ok" if all(i["status"] in ("ok", NO_CUDA) for i in smoke["items"]) else "failed"
            part["smoke"] = smoke
        return
    if interpreting():
        part["status"] = "skipped: TRITON_INTERPRET is set (unset it: the interpreter times nothing useful)"
        return
    for case in [c for c in cases.cases() if c.tokens in KERNEL_TOKENS]:
        for impl in ("triton", "eager", "compile"):
            rows = check.item(part, f"{case.name} {impl}",
                              lambda c=case, i=impl: kernel_rows(check, c, i, "cuda", KERNEL_REPS, KERNEL_ROUNDS))
            for row in rows or []:
                check.report["benchmarks"].append(
                    {"name": f"gpu_check kernel {case.name} {impl} {row['direction']}", "extra_info": row})


PART_FUNCTIONS = {"train_steps_256": part_train_steps(256), "train_steps_512": part_train_steps(512),
                  "energy": part_energy, "profile": part_profile, "kernels": part_kernels,
                  "largest_batch": part_largest_batch}
