"""The GPU check's measurements, one function per part, in PARTS' order (most telling first; bench/gpu_check.py).
Each part(check, part) runs its items through the guard (check.item) and keeps its rows in part["rows"]; a real
run also adds them to check.report["benchmarks"] in the extra_info format of `pytest bench/`. A dry run runs the
same code on the CPU at tiny shapes (DRY): Triton kernels need CUDA (their items are skipped; a model "with
Triton" runs PyTorch's kernels, marked stand_in), torch.compile uses dynamo's "eager" backend, and its rows never
reach "benchmarks".

Timing is the device's: training steps by CUDA events between back-to-back steps (median), kernels by the summed
duration of the kernels torch.profiler records (no launch gaps, no host time; compared with kernels/roofline.py's
roofline), with the CUDA-event time between back-to-back calls beside it ("stream"). First calls (Triton's
compilation and autotuning, torch.compile, allocation) are timed apart as the cold start and left out.

- warmup: every Triton kernel's first call at the shapes the timed parts use (Triton compiles them once for the
  whole run), each timed: the cold-start cost.
- kernels: every Triton kernel of bench/cases.py at 256 and 1024 tokens against eager PyTorch and torch.compile
  of its reference, forward and forward + backward; % of roofline.
- train_steps_256 / train_steps_512: PixArt-XL/2 training steps (batch 32 / 8; forward, diffusion loss, backward,
  fused AdamW; bf16 autocast, fp32 weights) for each variant, cheap ones first, torch.compile's last; images/s,
  TFLOP/s, MFU (pixart_fast.flops over the card's dense bf16 peak in pixart_fast.gpus.GPUS), peak memory.
- profile: one 256-px ours+triton step with the trainer's EMA update, from torch.profiler: ms and % of the step
  in matmul, attention, the modulation family, optimizer, EMA and other; the top 25 kernels.
- fp8_gemm: each GEMM of a PixArt-XL/2 block (forward, input gradient, weight gradient) at 8k and 32k tokens in
  bf16 and in FP8 (torch._scaled_mm, per-tensor scales: amax, scale and cast timed with it), and the speed-up
  each layer's GEMMs in FP8 would give the 256-px step.
- energy: board energy per 256-px training image (NVML).
- largest_batch: the largest 256-px batch whose training step fits (bench/workloads.largest_batch).
- token_levers: the 256-px XL step with token masking and routing (pixart_fast.model) at MaskDiT's and TREAD's
  ratios, images/s against the full step.

"compile" is regional by default (`--compile-mode regional`): each transformer block is compiled in place
(`block.compile()`; the identical blocks share their compiled code), the embedders and the loss stay eager;
`--compile-mode full` compiles the whole model as bench/test_bench_train.py does.
"""
import contextlib
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import cases
from gpu_guard import Check
from gpus import EnergyMeter
from pixart_fast.flops import flops_per_image
from pixart_fast.gpus import GPUS
from pixart_fast.model import PixArtConfig
from workloads import (TRAIN_VARIANTS, XL, PixArtTransformer2DModel, adamw, build_diffusers, build_ours,
                       largest_batch, make_batch, token_levers, train_step)

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = "skipped: no CUDA"
NO_DIFFUSERS = "skipped: diffusers not importable"
# workloads.TRAIN_VARIANTS (name: (model, kernels, compile)) in the order they run: cheap and telling first, the
# torch.compile variants (tens of seconds of compilation each) last.
VARIANT_ORDER = ("ours+triton", "ours", "diffusers", "ours+triton+compile", "ours+compile", "diffusers+compile")
TOP_KERNELS = 25
STEP_CATEGORIES = ("matmul", "attention", "modulation family", "optimizer", "EMA", "other")
ANNOTATIONS = {"pixart::optimizer": "optimizer", "pixart::ema": "EMA"}  # bench/workloads.train_step's ranges
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# The Linear layers of a PixArt block as (K, N) in units of the width D, the layers per block, and their tokens
# per image token (the cross-attention's kv_linear runs on the 120 caption tokens, not the image tokens).
GEMM_LAYERS = {"qkv": (1, 3, 1, 1.0), "proj, cross q, cross proj": (1, 1, 3, 1.0), "mlp fc1": (1, 4, 1, 1.0),
               "mlp fc2": (4, 1, 1, 1.0), "cross kv (caption tokens)": (1, 2, 1, 120 / 256)}


@dataclass(frozen=True)
class Scale:
    """What the parts run at: PixArt-XL/2 on the GPU (GPU), or tiny shapes on the CPU (DRY)."""
    device: str
    train: dict  # resolution px -> (PixArtConfig, batch)
    kernel_shapes: dict  # bench/cases.py's shape constants
    kernel_tokens: tuple
    kernel_calls: int  # calls per timing (profiled, and between CUDA events)
    warmup_steps: int  # untimed steps before the timed ones, the first timed apart as the cold start
    step_rounds: int
    energy_rounds: int
    profile_steps: int
    gemm_width: int
    gemm_tokens: tuple
    compile_backend: str
    largest_start: int
    simulated_memory_limit: int | None  # the dry run's batch limit: larger batches raise OutOfMemoryError


def tiny_config(side: int) -> PixArtConfig:
    return PixArtConfig(input_size=side, in_channels=4, hidden_size=64, depth=2, num_heads=2, caption_channels=32,
                        max_tokens=8)


GPU = Scale("cuda", {256: (XL[256], 32), 512: (XL[512], 8)},
            dict(D=1152, HEADS=16, HEAD_DIM=72, CAPTION_TOKENS=120, TOKENS=(256, 1024, 4096), TOKENS_PER_CALL=32768),
            kernel_tokens=(256, 1024), kernel_calls=20, warmup_steps=3, step_rounds=8, energy_rounds=20,
            profile_steps=2, gemm_width=1152, gemm_tokens=(8192, 32768), compile_backend="inductor",
            largest_start=32, simulated_memory_limit=None)
DRY = Scale("cpu", {256: (tiny_config(8), 4), 512: (tiny_config(16), 2)},
            dict(D=64, HEADS=2, HEAD_DIM=32, CAPTION_TOKENS=8, TOKENS=(16, 64), TOKENS_PER_CALL=128),
            kernel_tokens=(16, 64), kernel_calls=2, warmup_steps=2, step_rounds=2, energy_rounds=2, profile_steps=1,
            gemm_width=64, gemm_tokens=(64,), compile_backend="eager", largest_start=2, simulated_memory_limit=6)


def scale(check: Check) -> Scale:
    return DRY if check.dry else GPU


def diffusers_ok() -> bool:
    return PixArtTransformer2DModel is not None


def record(check: Check, part: dict, name: str, row: dict | None):
    """A measured row into the part, and (a real run only) into report["benchmarks"]."""
    if row is None:
        return
    part["rows"].append(row)
    if not check.dry:
        check.report["benchmarks"].append({"name": f"gpu_check {name}", "extra_info": row})


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def wall(fn, device: str) -> float:
    """Seconds of one call of fn, finished work included: for first calls (compilation), not for speed."""
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def stream_times(fn, calls: int, device: str) -> list[float]:
    """Seconds of each of `calls` back-to-back calls of fn: CUDA events between them (the device's time; the host
    runs ahead, so its overhead shows only where it outlasts the device work), or on the CPU the host clock."""
    if device != "cuda":
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
    events[0].record()
    for i in range(calls):
        fn()
        events[i + 1].record()
    events[-1].synchronize()
    return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(calls)]


def work_events(prof, device: str) -> list[tuple[str, float, object]]:
    """(name, us, event) of the work a profile recorded: every kernel, copy and memset on a GPU (its duration;
    the device-side spans of record_function ranges left out), or on the CPU (dry run) every op's self CPU time."""
    events = list(prof.events())
    ranges = {e.name for e in events if getattr(e, "is_user_annotation", False)} | set(ANNOTATIONS)
    if device == "cuda":
        return [(e.name, e.time_range.elapsed_us(), e) for e in events
                if e.device_type == DeviceType.CUDA and e.name not in ranges]
    return [(e.name, e.self_cpu_time_total, e) for e in events
            if e.device_type == DeviceType.CPU and e.name not in ranges and e.self_cpu_time_total > 0]


def profiled(fn, calls: int, device: str):
    """torch.profiler over `calls` calls of fn: (device seconds per call, the profile). Device seconds: the summed
    duration of the work recorded (work_events) / calls."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    events = work_events(prof, device)
    if not events:
        raise RuntimeError("the profiler recorded no kernel (is CUPTI unavailable?)")
    return sum(us for _, us, _ in events) / calls / 1e6, prof


# ----------------------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------------------


def compile_model(model, mode: str, backend: str):
    """torch.compile: "full" wraps the whole model; "regional" compiles each transformer block in place."""
    if mode == "full":
        return torch.compile(model, backend=backend)
    blocks = getattr(model, "blocks", None) or getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise AttributeError(f"{type(model).__name__} has neither .blocks nor .transformer_blocks")
    for block in blocks:
        block.compile(backend=backend)
    return model


def build(check: Check, variant: str, cfg):
    """The variant's model on the scale's device; in a dry run "triton" builds PyTorch's kernels instead."""
    sc = scale(check)
    name, kernels, compiled = TRAIN_VARIANTS[variant]
    ours = build_ours(cfg, sc.device, "torch" if kernels == "triton" and sc.device != "cuda" else kernels)
    model = ours if name == "ours" else build_diffusers(ours)
    del ours
    return compile_model(model, check.args.compile_mode, sc.compile_backend) if compiled else model


def make_step(model, cfg, batch_size: int, device: str, optimizer=None, ema=None):
    """bench/workloads.train_step: bf16 autocast, the paper's AdamW (fused on CUDA); no synchronize."""
    return train_step(model, make_batch(cfg, batch_size, device), optimizer or adamw(model), torch.bfloat16, ema=ema)


def train_row(check: Check, kind: str, variant: str, resolution: int, batch: int, times: list[float],
              **extra) -> dict:
    """One row in the extra_info format of bench/test_bench_train.py (plus the timing's details)."""
    sc = scale(check)
    cfg = sc.train[resolution][0]
    name, kernels, compiled = TRAIN_VARIANTS[variant]
    seconds = statistics.median(times)
    resolution = cfg.input_size * 8  # the dry run's tiny models: 64 and 128 px
    flops = batch * flops_per_image(cfg, resolution)
    gpu = GPUS.get(check.gpu_key)
    cuda = sc.device == "cuda"
    stand_in = "PyTorch's kernels (Triton needs CUDA)" if kernels == "triton" and not cuda else None
    return dict(
        kind=kind, measured=True, device=check.report["environment"].get("device"), gpu=check.gpu_key, model=name,
        kernels=kernels, compile=compiled, compile_mode=check.args.compile_mode if compiled else None,
        variant=variant, resolution=resolution, batch=batch, precision="bf16 autocast",
        timing="CUDA events between back-to-back steps" if cuda else "host clock (CPU)",
        seconds_per_step=seconds, step_seconds=[round(t, 6) for t in times], images_per_s=batch / seconds,
        tflops=flops / seconds / 1e12, mfu=None if gpu is None else flops / seconds / (gpu.tflops * 1e12),
        peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if cuda else None, stand_in=stand_in, **extra)


def measure_train(check: Check, variant: str, resolution: int, kind: str = "train_step", rounds: int | None = None,
                  meter=None) -> dict:
    """Build, one cold step (compilation, autotuning, the optimizer's state, the allocator's pools), the other
    warm-up steps, then `rounds` steps timed back to back (and the board's energy over them, given a meter)."""
    sc = scale(check)
    cfg, batch = sc.train[resolution]
    start = time.perf_counter()
    model = build(check, variant, cfg)
    build_s = time.perf_counter() - start
    step = make_step(model, cfg, batch, sc.device)
    cold_s = wall(step, sc.device)
    warm = [wall(step, sc.device) for _ in range(sc.warmup_steps - 1)]
    if sc.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rounds = rounds or sc.step_rounds
    joules = meter.joules() if meter else None
    start = time.perf_counter()
    times = stream_times(step, rounds, sc.device)
    host_s = (time.perf_counter() - start) / rounds
    extra = {}
    if meter:
        joules = meter.joules() - joules
        extra = dict(joules_per_image=joules / (rounds * batch), mean_watts=joules / sum(times))
    return train_row(check, kind, variant, resolution, batch, times, build_s=round(build_s, 3),
                     cold_start_s=round(cold_s, 3), warmup_steps=sc.warmup_steps,
                     warmup_s=round(cold_s + sum(warm), 3), host_seconds_per_step=host_s, **extra)


def part_train_steps(resolution: int):
    def run(check: Check, part: dict):
        have_diffusers = diffusers_ok()
        if not have_diffusers:
            part["notes"].append("diffusers is not importable: its variants are skipped (gpu_check.sh --wheels DIR)")
        for variant in VARIANT_ORDER:
            skip = NO_DIFFUSERS if TRAIN_VARIANTS[variant][0] == "diffusers" and not have_diffusers else None
            row = check.item(part, f"{variant} {resolution}px",
                             lambda v=variant: measure_train(check, v, resolution), skip)
            record(check, part, f"train_step {variant} {resolution}px", row)
    return run


# ----------------------------------------------------------------------------------------------------------
# Warm-up and kernels
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def case_shapes(sc: Scale):
    """bench/cases.py at the scale's shapes: its shape constants swapped for the duration."""
    saved = {k: getattr(cases, k) for k in sc.kernel_shapes}
    for k, v in sc.kernel_shapes.items():
        setattr(cases, k, v)
    try:
        yield [c for c in cases.cases() if c.tokens in sc.kernel_tokens]
    finally:
        for k, v in saved.items():
            setattr(cases, k, v)


def kernel_fn(case, impl: str, backend: str):
    return {"triton": case.triton, "eager": case.ref}.get(impl) or torch.compile(case.ref, dynamic=False,
                                                                                  backend=backend)


def first_calls(case, impl: str, sc: Scale) -> dict:
    """Seconds of the first forward and the first forward + backward of a case (compilation included)."""
    fn, inputs = kernel_fn(case, impl, sc.compile_backend), case.inputs(torch.device(sc.device))
    return {direction: round(wall(cases.kernel_call(fn, inputs, direction == "fwd+bwd"), sc.device), 3)
            for direction in ("fwd", "fwd+bwd")}


def part_warmup(check: Check, part: dict):
    """Each Triton kernel's first calls at the kernels part's shapes: Triton compiles (and caches) every kernel
    here, timed, so that no timed part pays for it. The dry run times the PyTorch references' first calls."""
    sc = scale(check)
    impl = "triton" if sc.device == "cuda" else "eager"
    if impl == "eager":
        part["notes"].append("dry run: the PyTorch references stand in for the Triton kernels")
    with case_shapes(sc) as kernel_cases:
        for case in kernel_cases:
            result = check.item(part, f"{case.name} {impl} first calls", lambda c=case: first_calls(c, impl, sc))
            if result:
                part["rows"].append(dict(kind="cold_start", kernel=case.kernel, tokens=case.tokens, impl=impl,
                                         first_fwd_s=result["fwd"], first_fwd_bwd_s=result["fwd+bwd"]))


def roofline_table(gpu_key: str | None) -> dict:
    """{"kernel T tokens": {"fwd": s, "fwd+bwd": s}}: kernels/roofline.py's roofline of each case at PixArt-XL/2
    shapes on this GPU (the dry run: on an H200, to prove the code)."""
    table = {}
    with case_shapes(GPU) as kernel_cases:
        for case in kernel_cases:
            table[case.name] = {d: cases.roofline_seconds(case, d == "fwd+bwd", gpu_key) for d in ("fwd", "fwd+bwd")}
    return table


def kernel_rows(check: Check, case, impl: str, roofline: dict) -> list[dict]:
    """Both directions of one case and implementation, in test_bench_kernels.py's extra_info format; the device
    time (profiler) is seconds_per_call, the CUDA-event time between back-to-back calls stream_seconds_per_call."""
    sc = scale(check)
    fn = kernel_fn(case, impl, sc.compile_backend)
    inputs = case.inputs(torch.device(sc.device))
    gpu = GPUS.get(check.gpu_key)
    rows = []
    for direction in ("fwd", "fwd+bwd"):
        backward = direction == "fwd+bwd"
        call = cases.kernel_call(fn, inputs, backward)
        cold_s = wall(call, sc.device)  # compilation (torch.compile) or a first launch (Triton: the warmup part's)
        wall(call, sc.device)
        stream_s = statistics.median(stream_times(call, sc.kernel_calls, sc.device))
        seconds, prof = profiled(call, sc.kernel_calls, sc.device)
        launches = len(work_events(prof, sc.device)) / sc.kernel_calls
        nbytes = case.bytes(False) + (case.bytes(True) if backward else 0)
        flops = case.flops(False) + (case.flops(True) if backward else 0)
        roof = roofline.get(case.name, {}).get(direction) if cases.D == GPU.kernel_shapes["D"] else None
        rows.append(dict(
            kind="kernel", measured=True, device=check.report["environment"].get("device"), gpu=check.gpu_key,
            kernel=case.kernel, tokens=case.tokens, batch=case.batch, impl=impl, direction=direction,
            timing="torch.profiler kernel time" if sc.device == "cuda" else "torch.profiler CPU op time",
            seconds_per_call=seconds, stream_seconds_per_call=stream_s, launches_per_call=launches,
            cold_start_s=round(cold_s, 4), bytes=nbytes, gb_per_s=nbytes / seconds / 1e9,
            tflops=flops / seconds / 1e12,
            pct_peak_bandwidth=None if gpu is None else 100 * nbytes / seconds / 1e9 / gpu.bandwidth_gbs,
            roofline_s=roof, pct_roofline=None if roof is None else 100 * roof / seconds))
    return rows


def part_kernels(check: Check, part: dict):
    sc = scale(check)
    key = check.gpu_key if sc.device == "cuda" else "H200"
    roofline = check.item(part, f"roofline at PixArt-XL/2 shapes ({key})", lambda: roofline_table(key)) or {}
    part["roofline_s"] = roofline
    if not roofline or not any(v for r in roofline.values() for v in r.values()):
        part["notes"].append(f"no roofline for {check.gpu_key}: no % of roofline")
    with case_shapes(sc) as kernel_cases:
        # Triton and eager at every token count first, then torch.compile (seconds of compilation each)
        order = [(c, i) for i in ("triton", "eager") for c in kernel_cases] + \
                [(c, "compile") for t in sc.kernel_tokens for c in kernel_cases if c.tokens == t]
        for case, impl in order:
            skip = NO_CUDA if impl == "triton" and sc.device != "cuda" else None
            rows = check.item(part, f"{case.name} {impl}", lambda c=case, i=impl: kernel_rows(check, c, i, roofline),
                              skip)
            for row in rows or []:
                record(check, part, f"kernel {case.name} {impl} {row['direction']}", row)


# ----------------------------------------------------------------------------------------------------------
# Step profile
# ----------------------------------------------------------------------------------------------------------


def _kernel_files() -> dict[str, str]:
    """Our @triton.jit kernels by name -> the step category of their file."""
    category = {"modulation.py": "modulation family", "cross_attn.py": "attention", "patch_copy.py": "other"}
    names = {}
    for path in (ROOT / "kernels").glob("*.py"):
        for name in re.findall(r"@triton\.jit[^\n]*\n\s*def (\w+)", path.read_text()):
            names[name] = category.get(path.name, "other")
    return names


def name_category(name: str, ours: dict[str, str]) -> str:
    """The step category of a kernel (or, in a dry run, a CPU op) by its name."""
    for kernel, category in ours.items():
        if name == kernel or name.startswith(kernel + "_"):
            return category
    low = name.lower()
    if "adam" in low:
        return "optimizer"
    if "lerp" in low:  # the EMA's foreach lerp (AdamW's own lerp on the CPU is told apart by its range)
        return "EMA"
    if any(s in low for s in ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "sm90_", "sm80_", "aten::mm",
                              "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")):
        return "matmul"
    if any(s in low for s in ("flash", "fmha", "attention", "sdpa", "mem_eff")):
        return "attention"
    if any(s in low for s in ("layer_norm", "layernorm", "modulat", "gated_residual")):
        return "modulation family"
    return "other"


def _annotation(event) -> str | None:
    """The step category of the record_function range (ANNOTATIONS) an event ran inside, if any."""
    while event is not None:
        if event.name in ANNOTATIONS:
            return ANNOTATIONS[event.name]
        event = event.cpu_parent
    return None


def step_breakdown(prof, device: str, steps: int) -> dict:
    """The profiled steps' device time per step by STEP_CATEGORIES (ms and %), and the top kernels. Optimizer and
    EMA: the work launched inside their record_function ranges (by name where the profile links no kernel to
    them); the others by kernel name; what is left is other."""
    events = work_events(prof, device)
    total = sum(us for _, us, _ in events) or 1.0
    us = dict.fromkeys(STEP_CATEGORIES, 0.0)
    in_range = dict.fromkeys(ANNOTATIONS.values(), 0.0)
    if device == "cuda":  # kernels hang off the CPU op that launched them
        for e in prof.events():
            if e.device_type == DeviceType.CPU and e.kernels:
                category = _annotation(e)
                if category:
                    in_range[category] += sum(k.duration for k in e.kernels)
    ours = _kernel_files()
    by_name = {}
    for name, t, e in events:
        category = (_annotation(e) if device != "cuda" else None) or name_category(name, ours)
        if device != "cuda" and category in in_range:
            in_range[category] += t
        else:
            us[category] += t
        row = by_name.setdefault(name, {"name": name, "calls": 0, "self_us": 0.0, "category": category})
        row["calls"] += 1
        row["self_us"] += t
    for category, t in in_range.items():
        us[category] = t or us[category]
    us["other"] = max(total - sum(v for k, v in us.items() if k != "other"), 0.0)
    top = sorted(by_name.values(), key=lambda r: -r["self_us"])[:TOP_KERNELS]
    for r in top:
        r.update(pct=100 * r["self_us"] / total, avg_us=r["self_us"] / max(r["calls"], 1))
    what = "CUDA kernels by device time" if device == "cuda" else "CPU ops by self CPU time (dry run)"
    return {"what": what, "steps": steps, "kernel_ms_per_step": total / steps / 1e3,
            "categories": {k: {"ms": v / steps / 1e3, "pct": 100 * v / total} for k, v in us.items()},
            "distinct": len(by_name), "top": top}


def ema_update(model):
    """The trainer's EMA update (pixart_fast.train.loop.update_ema: one foreach lerp over the parameters) on a
    copy of the model's parameters, as a callable."""
    from pixart_fast.train.loop import update_ema  # here: the trainer imports much the other parts never need
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = [p.detach().clone() for p in params]
    apply = torch.ones((), dtype=torch.bool, device=params[0].device)
    return lambda: update_ema(ema_params, params, 0.9999, 1000, apply)


def profile_step(check: Check, variant: str = "ours+triton", resolution: int = 256) -> dict:
    sc = scale(check)
    cfg, batch = sc.train[resolution]
    model = build(check, variant, cfg)
    step = make_step(model, cfg, batch, sc.device, ema=ema_update(model))
    for _ in range(sc.warmup_steps):
        wall(step, sc.device)
    step_s = statistics.median(stream_times(step, sc.step_rounds, sc.device))
    _, prof = profiled(step, sc.profile_steps, sc.device)
    table = step_breakdown(prof, sc.device, sc.profile_steps)
    table.update(variant=variant, batch=batch, resolution=resolution, step_ms=step_s * 1e3,
                 config=f"PixArt-XL/2 {resolution} px" if sc.device == "cuda" else "tiny (dry run)")
    return table


def part_profile(check: Check, part: dict):
    part["table"] = check.item(part, "ours+triton 256px with EMA, profiled", lambda: profile_step(check))


# ----------------------------------------------------------------------------------------------------------
# FP8 GEMMs
# ----------------------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor):
    """x in FP8 (e4m3) with one per-tensor scale from its amax, row-major: (x_fp8, scale)."""
    scale_ = x.abs().amax().float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale_).to(FP8).contiguous(), scale_


def gemm_shapes(layer: str, width: int, tokens: int) -> list[dict]:
    """The three GEMMs of a layer of GEMM_LAYERS at `tokens` image tokens: output = a @ b.T with a (m, k) and
    b (n, k); `a_t` / `b_t`: the operand is stored transposed (its FP8 cast writes the transpose)."""
    k_mult, n_mult, per_block, token_ratio = GEMM_LAYERS[layer]
    M, K, N = int(tokens * token_ratio) // 16 * 16, k_mult * width, n_mult * width
    return [dict(layer=layer, gemm=gemm, tokens=tokens, m=m, k=k, n=n, a_t=a_t, b_t=b_t, per_block=per_block)
            for gemm, (m, k, n, a_t, b_t) in {"fwd": (M, K, N, False, False),  # y = x W^T
                                              "dgrad": (M, N, K, False, True),  # dx = dy W
                                              "wgrad": (N, M, K, True, True)}.items()]  # dW = dy^T x


def measure_gemm(shape: dict, device: str, cast, calls: int) -> dict:
    m, k, n = shape["m"], shape["k"], shape["n"]
    a = torch.randn(k, m, device=device, dtype=torch.bfloat16).t() if shape["a_t"] else \
        torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16).t() if shape["b_t"] else \
        torch.randn(n, k, device=device, dtype=torch.bfloat16)

    def bf16():
        return a @ b.t()

    qa, sa = cast(a)
    qb, sb = cast(b)

    def fp8_gemm():
        return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

    def fp8_total():
        qa_, sa_ = cast(a)
        qb_, sb_ = cast(b)
        return torch._scaled_mm(qa_, qb_.t(), scale_a=sa_, scale_b=sb_, out_dtype=torch.bfloat16)

    times = {}
    for name, fn in (("bf16", bf16), ("fp8_gemm", fp8_gemm), ("fp8_total", fp8_total)):
        wall(fn, device)
        times[name] = statistics.median(stream_times(fn, calls, device))
    ref = bf16().float()
    err = ((fp8_total().float() - ref).norm() / ref.norm()).item()
    flops = 2 * m * k * n
    return dict(kind="gemm_fp8", measured=True, **{k_: v for k_, v in shape.items() if k_ not in ("a_t", "b_t")},
                bf16_s=times["bf16"], fp8_gemm_s=times["fp8_gemm"], fp8_total_s=times["fp8_total"],
                bf16_tflops=flops / times["bf16"] / 1e12, fp8_tflops=flops / times["fp8_gemm"] / 1e12,
                speedup_gemm=times["bf16"] / times["fp8_gemm"], speedup_total=times["bf16"] / times["fp8_total"],
                rel_error=err)


def fp8_step_gain(rows: list[dict], step_s: float | None, depth: int, tokens: int) -> list[dict]:
    """Per layer (and all together): the step's speed-up if that layer's three GEMMs in every block ran in FP8,
    casts included: step / (step - depth x layers per block x sum over its GEMMs of (bf16 - FP8 total))."""
    saved = {}
    for r in rows:
        if r["tokens"] == tokens:
            saved[r["layer"]] = saved.get(r["layer"], 0.0) + depth * r["per_block"] * (r["bf16_s"] - r["fp8_total_s"])
    saved["all layers"] = sum(saved.values())
    return [dict(layer=layer, saved_ms=s * 1e3, step_ms=None if step_s is None else step_s * 1e3,
                 step_speedup=None if not step_s or s >= step_s else step_s / (step_s - s))
            for layer, s in saved.items()]


def measure_gemms(check: Check, tokens: int) -> list[dict]:
    """Every GEMM of GEMM_LAYERS at `tokens` tokens, with the FP8 cast compiled first (timed: cast_compile_s;
    eager, said so, where its compilation fails). One item: dynamo's caches are reset between items."""
    sc = scale(check)
    start = time.perf_counter()
    try:
        cast, compiled = _compiled_cast(sc), True
    except Exception:  # noqa: BLE001 - eager casts still measure the GEMMs; the rows say so
        cast, compiled = quantize, False
    compile_s = time.perf_counter() - start
    rows = []
    for layer in GEMM_LAYERS:
        for shape in gemm_shapes(layer, sc.gemm_width, tokens):
            rows.append(dict(measure_gemm(shape, sc.device, cast, sc.kernel_calls), cast_compiled=compiled,
                             cast_compile_s=round(compile_s, 2), device=check.report["environment"].get("device"),
                             gpu=check.gpu_key))
    return rows


def part_fp8_gemm(check: Check, part: dict):
    sc = scale(check)
    for tokens in sc.gemm_tokens:
        rows = check.item(part, f"GEMMs at {tokens} tokens, bf16 and FP8", lambda t=tokens: measure_gemms(check, t))
        for row in rows or []:
            record(check, part, f"fp8 {row['layer']} {row['gemm']} {tokens}", row)
    if any(not r["cast_compiled"] for r in part["rows"]):
        part["notes"].append("the FP8 cast ran eagerly (its compilation failed): FP8 totals are pessimistic")
    cfg, batch = sc.train[256]
    tokens = batch * (cfg.input_size // cfg.patch_size) ** 2
    step = next((r for r in check.report["parts"].get("train_steps_256", {}).get("rows", [])
                 if r["variant"] == "ours+triton"), None)
    part["step_gain"] = fp8_step_gain(part["rows"], step and step["seconds_per_step"], cfg.depth, tokens)
    part["step_gain_note"] = (f"the 256-px step (batch {batch}, {tokens} tokens) "
                              + ("timed by train_steps_256 (ours+triton)" if step else "not timed in this run"))


def _compiled_cast(sc: Scale):
    cast = torch.compile(quantize, dynamic=True, backend=sc.compile_backend)
    x = torch.randn(64, 32, device=sc.device, dtype=torch.bfloat16)
    cast(x), cast(x.t())  # compiled for both layouts
    sync(sc.device)
    return cast


# ----------------------------------------------------------------------------------------------------------
# Energy, largest batch, token routing
# ----------------------------------------------------------------------------------------------------------


class _NoMeter:
    """The dry run's stand-in for the NVML energy counter: always 0 J."""

    def joules(self) -> float:
        return 0.0


def part_energy(check: Check, part: dict):
    sc = scale(check)
    if sc.device == "cuda":
        try:
            meter = EnergyMeter()
        except RuntimeError as e:
            part["status"] = f"skipped: {e}"
            return
    else:
        meter = _NoMeter()
        part["notes"].append("dry run: no NVML, the energy reads 0 J")
    row = check.item(part, f"ours+triton 256px, {sc.energy_rounds} steps",
                     lambda: measure_train(check, "ours+triton", 256, "energy", sc.energy_rounds, meter))
    record(check, part, "energy ours+triton 256px", row)


def measure_largest(check: Check, variant: str, resolution: int) -> dict:
    """bench/workloads.largest_batch, then the step's timing at that batch. In a dry run batches above the
    scale's simulated limit raise torch.OutOfMemoryError, as a full GPU would."""
    sc = scale(check)
    cfg = sc.train[resolution][0]
    model = build(check, variant, cfg)
    optimizer = adamw(model)  # shared by the probes, as in bench/test_bench_train.py
    step_for = {}
    limit = sc.simulated_memory_limit

    def make(B):
        if limit is not None and B > limit:
            def oom():
                raise torch.OutOfMemoryError(f"simulated: batch {B} > {limit}")
            return oom
        step_for.clear()  # one step (and its batch) alive at a time; too large a batch raises at its allocation
        step_for[B] = make_step(model, cfg, B, sc.device, optimizer)
        return step_for[B]

    start = time.perf_counter()
    batch, probes = largest_batch(make, sc.largest_start)
    search_s = time.perf_counter() - start
    if batch == 0:
        raise RuntimeError(f"not even batch {sc.largest_start} fits at {resolution} px")
    step = make(batch)
    wall(step, sc.device)  # warm-up at this shape
    if sc.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = stream_times(step, 3, sc.device)
    return train_row(check, "largest_batch", variant, resolution, batch, times, probes=probes,
                     search_seconds=round(search_s, 2), simulated=limit is not None)


def part_largest_batch(check: Check, part: dict):
    have_diffusers = diffusers_ok()
    for variant in ("ours+triton", "diffusers"):
        skip = NO_DIFFUSERS if variant == "diffusers" and not have_diffusers else None
        row = check.item(part, f"{variant} 256px", lambda v=variant: measure_largest(check, v, 256), skip)
        record(check, part, f"largest_batch {variant} 256px", row)


TOKEN_LEVERS = {"full": {}, "mask 0.5": {"mask_ratio": 0.5}, "route 0.5": {"route_ratio": 0.5},
                "mask 0.5 + route 0.5": {"mask_ratio": 0.5, "route_ratio": 0.5}}  # MaskDiT's and TREAD's ratios


def measure_levers(check: Check, name: str, ratios: dict, resolution: int = 256) -> dict:
    """The XL training step (ours, Triton kernels, not compiled) with token masking and / or routing at the given
    ratios: images/s against the full step, and MFU from the FLOPs the step really runs."""
    sc = scale(check)
    cfg, batch = sc.train[resolution]
    model = build(check, "ours+triton", cfg)
    levers = token_levers(cfg, batch, sc.device, **ratios)
    step = train_step(model, make_batch(cfg, batch, sc.device), adamw(model), torch.bfloat16, levers=levers)
    cold_s = wall(step, sc.device)
    for _ in range(sc.warmup_steps - 1):
        wall(step, sc.device)
    times = stream_times(step, sc.step_rounds, sc.device)
    blocks = {"route_blocks": levers["route_blocks"]} if "route_blocks" in levers else {}
    flops = batch * flops_per_image(cfg, cfg.input_size * 8, **ratios, **blocks)
    row = train_row(check, "token_levers", "ours+triton", resolution, batch, times, levers=name,
                    cold_start_s=round(cold_s, 3), **ratios)
    gpu = GPUS.get(check.gpu_key)
    row.update(tflops=flops / row["seconds_per_step"] / 1e12,
               mfu=None if gpu is None else flops / row["seconds_per_step"] / (gpu.tflops * 1e12))
    return row


def part_token_levers(check: Check, part: dict):
    full = None
    for name, ratios in TOKEN_LEVERS.items():
        row = check.item(part, f"{name} 256px", lambda r=ratios, n=name: measure_levers(check, n, r))
        if row is not None:
            full = row["images_per_s"] if name == "full" else full
            row["speedup_vs_full"] = None if full is None else row["images_per_s"] / full
        record(check, part, f"token_levers {name} 256px", row)


PART_FUNCTIONS = {"warmup": part_warmup, "kernels": part_kernels, "train_steps_256": part_train_steps(256),
                  "profile": part_profile, "fp8_gemm": part_fp8_gemm, "energy": part_energy,
                  "largest_batch": part_largest_batch, "train_steps_512": part_train_steps(512),
                  "token_levers": part_token_levers}
