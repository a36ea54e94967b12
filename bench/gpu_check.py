"""The one-shot GPU check: everything a GPU machine without network should measure, in one run of at most
7 minutes, into one folder. Normally started by `bash bench/gpu_check.sh` (which installs the project first);
`python bench/gpu_check.py --help` lists the options.

Parts, run in this order (the cheap, most telling numbers first), each guarded: a part or item that fails records
its error and traceback and the check goes on; past the time budget the remaining items are skipped, and an
item still running at the hard limit is interrupted.

- train_steps_256: PixArt-XL/2 training steps at 256 px (batch 32; forward, diffusion loss, backward, fused
  AdamW; bf16 autocast, fp32 weights): ours+triton, diffusers, ours+triton+compile, ours+compile,
  diffusers+compile, ours; images/s, TFLOP/s, MFU (pixart_fast.plan.flops_per_image over the GPU's dense bf16
  peak in pixart_fast.plan.GPUS) and peak memory.
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

Output, in --out: gpu_check.json (one document; "benchmarks" holds the measured rows in the extra_info format of
`pytest bench/`, so `python bench/summary.py gpu_check.json` and `python -m pixart_fast.plan --mfu-from
gpu_check.json` read it) and summary.md. Both are rewritten after every item, so a killed run leaves them too.

--dry-run: the same script on the CPU, in seconds: every CUDA part is marked "skipped: no CUDA", and each part's
code runs at tiny shapes on the CPU instead ("smoke" in the JSON) so that the plumbing is proved before any GPU
time is spent. Triton's interpreter is never used.
"""
import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCHEMA = "pixart_fast.gpu_check/1"
JSON_NAME, SUMMARY_NAME = "gpu_check.json", "summary.md"

NO_CUDA = "skipped: no CUDA"
OUT_OF_TIME = "skipped: time budget"
NO_DIFFUSERS = "skipped: diffusers not importable"

PARTS = ("train_steps_256", "energy", "profile", "kernels", "largest_batch", "train_steps_512")
LABELS = {
    "kernels": "(a) kernels against eager PyTorch and torch.compile, PixArt-XL/2 shapes, 256 and 1024 tokens",
    "train_steps_256": "(b) PixArt-XL/2 training step, 256 px",
    "train_steps_512": "(b) PixArt-XL/2 training step, 512 px",
    "largest_batch": "(c) largest batch at 256 px",
    "energy": "(d) energy per 256-px training image (NVML)",
    "profile": "(e) torch.profiler: top 25 CUDA kernels of one training step",
}
# workloads.TRAIN_VARIANTS (name: (model, kernels, compile)) in the order they run: the most telling first
VARIANT_ORDER = ("ours+triton", "diffusers", "ours+triton+compile", "ours+compile", "diffusers+compile", "ours")
KERNEL_TOKENS = (256, 1024)
WARMUP_STEPS, ROUNDS, ENERGY_ROUNDS = 3, 5, 20
KERNEL_REPS, KERNEL_ROUNDS = 10, 10
TOP_KERNELS = 25


def variants() -> dict:
    """workloads.TRAIN_VARIANTS in VARIANT_ORDER (workloads is imported once the project is installed)."""
    from workloads import TRAIN_VARIANTS
    return {name: TRAIN_VARIANTS[name] for name in VARIANT_ORDER}


class BudgetExceeded(BaseException):
    """Raised by the alarm at the hard time limit: a BaseException, so no library's `except Exception` eats it."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) < 600 else text[:600] + " ..."


def _trace(error: BaseException) -> str:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text if len(text) < 6000 else text[:1500] + "\n...\n" + text[-4000:]


# ----------------------------------------------------------------------------------------------------------
# The run: budget, guarded parts and items, the report
# ----------------------------------------------------------------------------------------------------------


class Check:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.t0 = args.t0 if args.t0 is not None else time.time()
        self.dry = args.dry_run
        self.interrupted = False
        self.device = None  # "cuda" or "cpu", set by environment()
        self.gpu_key = None
        self.report = {
            "schema": SCHEMA, "started": _now(), "datetime": _now(), "finished": None, "complete": False,
            "dry_run": self.dry,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "budget_s": args.budget, "limit_s": args.limit, "elapsed_s": None, "compile_mode": args.compile_mode,
            "parts_order": list(args.parts), "environment": {}, "install": {
                "project": args.install_project, "diffusers": args.install_diffusers, "log": "install.log"},
            "notes": [], "parts": {}, "benchmarks": []}

    # time
    def elapsed(self) -> float:
        return time.time() - self.t0

    def past_budget(self) -> bool:
        return self.interrupted or self.elapsed() > self.args.budget

    def arm_alarm(self):
        """Interrupt whatever runs at the hard limit (the shell's `timeout` kills us a few seconds later)."""
        def on_alarm(signum, frame):
            self.interrupted = True
            raise BudgetExceeded(f"hard time limit: {self.args.limit:.0f} s after the start")
        left = self.args.limit - self.elapsed()
        if hasattr(signal, "setitimer") and left > 0:
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, left)

    def disarm_alarm(self):
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)

    def log(self, message: str):
        print(f"[gpu_check {self.elapsed():6.1f}s] {message}", flush=True)

    # reporting
    def save(self):
        self.report["elapsed_s"] = round(self.elapsed(), 2)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (JSON_NAME + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        tmp.replace(self.out / JSON_NAME)
        (self.out / SUMMARY_NAME).write_text(safe_summary(self.report))

    def new_part(self, name: str) -> dict:
        part = {"label": LABELS.get(name, name), "status": "running", "seconds": None, "notes": [], "items": []}
        self.report["parts"][name] = part
        return part

    def part(self, name: str, fn):
        """Run part `name` (fn(check, part)) guarded; fn may set part["status"] itself (a skip)."""
        part = self.new_part(name)
        if self.past_budget():
            part["status"] = OUT_OF_TIME
            self.log(f"{name}: {OUT_OF_TIME}")
            self.save()
            return
        self.log(f"{name}: start")
        start = time.time()
        try:
            fn(self, part)
        except BudgetExceeded as e:
            part["status"], part["error"] = "error: interrupted at the time limit", _short(e)
        except Exception as e:  # noqa: BLE001 - a failing part records its error and the check goes on
            part["status"], part["error"], part["traceback"] = "error", _short(e), _trace(e)
            self.log(f"{name}: error {_short(e)}")
        finally:
            self.free(part)
        part["seconds"] = round(time.time() - start, 2)
        if part["status"] == "running":  # from its items: skips for a stated reason (no diffusers) are fine
            states = [i["status"] for i in part["items"]]
            bad = [s for s in states if s.startswith("error") or s == OUT_OF_TIME]
            part["status"] = "ok" if states and not bad else \
                "partial" if "ok" in states else \
                (states[0] if states and len(set(states)) == 1 else "failed")
        self.log(f"{name}: {part['status']} ({part['seconds']} s)")
        self.save()

    def item(self, part: dict, name: str, fn, skip: str | None = None):
        """Run one measurement fn() -> dict of fields (or None) guarded; returns its result or None."""
        entry = {"name": name, "status": "running", "seconds": None}
        part["items"].append(entry)
        if skip is None and self.past_budget():
            skip = OUT_OF_TIME
        if skip is not None:
            entry["status"] = skip
            return None
        start = time.time()
        result = None
        try:
            result = fn()
            entry["status"] = "ok"
        except BudgetExceeded as e:
            entry["status"], entry["error"] = "error: interrupted at the time limit", _short(e)
        except Exception as e:  # noqa: BLE001
            entry["status"], entry["error"], entry["traceback"] = "error", _short(e), _trace(e)
            self.log(f"  {name}: error {_short(e)}")
        finally:
            self.free(entry)
        entry["seconds"] = round(time.time() - start, 2)
        if entry["status"] == "ok":
            self.log(f"  {name}: ok ({entry['seconds']} s)")
        self.save()
        return result

    def free(self, entry: dict):
        """_free, and if the hard limit strikes meanwhile, say so in the part or item just finished."""
        try:
            _free()
        except BudgetExceeded as e:
            if entry["status"] in ("running", "ok"):
                entry["status"], entry["error"] = "error: interrupted at the time limit", _short(e)


def _free():
    """Drop what the last item left: Python garbage, the CUDA cache, dynamo's compiled code."""
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - cleanup must not fail a part
        pass


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------


def _version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_importable() -> str:
    """pixart_fast.kernels importable: installed by gpu_check.sh, or (if that failed) straight from the checkout
    (setup.py maps pixart_fast.kernels and pixart_fast.train to kernels/ and train/ at the root)."""
    for path in (str(ROOT), str(BENCH)):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        import pixart_fast
        import pixart_fast.kernels  # noqa: F401
        return f"pixart_fast from {Path(pixart_fast.__file__).parent}"
    except ImportError:
        import pixart_fast
        pixart_fast.__path__.append(str(ROOT))
        import pixart_fast.kernels  # noqa: F401
        return f"pixart_fast from the checkout {ROOT} (not installed: its __path__ extended to the root)"


def environment(check: Check) -> dict:
    import torch
    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"), "transformers": _version("transformers"), "diffusers": _version("diffusers"),
        "nvidia-ml-py": _version("nvidia-ml-py"), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    env["pixart_fast"] = ensure_importable()
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine, or no .git in the copy
        env["git_commit"] = None
    from gpus import device_info
    from pixart_fast.plan import GPUS
    cuda = torch.cuda.is_available()
    env["cuda_available"] = cuda
    if cuda and not check.dry:
        info = device_info()
        props = torch.cuda.get_device_properties(0)
        env.update(device=info["name"], gpu=info["gpu"],
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1),
                   device_count=torch.cuda.device_count())
        check.device, check.gpu_key = "cuda", info["gpu"]
        gpu = GPUS.get(info["gpu"])
        env["peak_bf16_tflops"] = None if gpu is None else gpu.tflops
        env["peak_bandwidth_gbs"] = None if gpu is None else gpu.bandwidth_gbs
        if gpu is None:
            check.report["notes"].append(f"{info['name']} is not in pixart_fast.plan.GPUS: no MFU or % of peak")
        try:
            import pynvml
            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # noqa: BLE001
            env["driver"] = f"unknown ({_short(e)})"
    else:
        check.device = "cpu"
        env["device"] = "cpu"
        env["gpu"] = None
        if cuda:
            check.report["notes"].append("dry run: a CUDA GPU is present but unused")
    try:
        import workloads
        env["diffusers_importable"] = workloads.PixArtTransformer2DModel is not None
        if workloads.DIFFUSERS_IMPORT_ERROR is not None:
            env["diffusers_import_error"] = _short(workloads.DIFFUSERS_IMPORT_ERROR)
    except Exception as e:  # noqa: BLE001
        env["diffusers_importable"] = False
        env["workloads_import_error"] = _short(e)
    return env


def diffusers_ok() -> bool:
    import workloads
    return workloads.PixArtTransformer2DModel is not None


# ----------------------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------------------

# The dry run's model: tiny, a few milliseconds a step on one CPU thread.
def tiny_config():
    from pixart_fast.model import PixArtConfig
    return PixArtConfig(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=2, caption_channels=32,
                        max_tokens=8)


def compile_model(model, mode: str):
    """torch.compile: "full" wraps the whole model; "regional" compiles each transformer block in place."""
    import torch
    if mode == "full":
        return torch.compile(model)
    blocks = getattr(model, "blocks", None) or getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise AttributeError(f"{type(model).__name__} has neither .blocks nor .transformer_blocks")
    for block in blocks:
        block.compile()
    return model


def build(variant: str, cfg, device: str, compile_mode: str):
    from workloads import build_diffusers, build_ours
    name, kernels, compiled = variants()[variant]
    ours = build_ours(cfg, device, kernels)
    model = ours if name == "ours" else build_diffusers(ours)
    del ours
    return compile_model(model, compile_mode) if compiled else model


def _sync():
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def make_step(model, cfg, batch_size: int, device: str, optimizer=None):
    """bench/workloads.train_step: bf16 autocast, the paper's AdamW (fused on CUDA), a synchronize at the end."""
    import torch
    from workloads import adamw, make_batch, train_step
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
    import torch
    from pixart_fast.plan import GPUS, flops_per_image
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
    import torch
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
        from workloads import XL, XL_BATCH
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
    from gpus import EnergyMeter
    try:
        meter = EnergyMeter()
    except RuntimeError as e:
        part["status"] = f"skipped: {e}"
        return
    from workloads import XL, XL_BATCH

    def measure():
        variant, resolution = "ours+triton", 256
        cfg, batch = XL[resolution], XL_BATCH[resolution]
        model = build(variant, cfg, "cuda", check.args.compile_mode)
        step = make_step(model, cfg, batch, "cuda")
        for _ in range(WARMUP_STEPS):
            step()
        import torch
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
    from torch.autograd import DeviceType
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
    from torch.profiler import ProfilerActivity, profile
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
    from workloads import XL, XL_BATCH
    part["table"] = check.item(part, "ours+triton 256px, one step",
                               lambda: profile_step(check, "ours+triton", XL[256], XL_BATCH[256], "cuda", WARMUP_STEPS))


def measure_largest(check: Check, variant: str, cfg, resolution: int, start: int, device: str,
                    simulated_limit: int | None = None) -> dict:
    """bench/workloads.largest_batch, then the step's timing at that batch. simulated_limit (dry run): batches
    above it raise torch.OutOfMemoryError, as a full GPU would."""
    import torch
    from workloads import adamw, largest_batch
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
    from workloads import XL, XL_BATCH
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
    import cases
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
    """100 x kernels/roofline.py's roofline time of the Triton launches / the measured time (issue 16's goal:
    >= 80 for the modulate family at 256 px); None at tiny shapes, on another GPU, or without that launch."""
    import cases
    if cases.D != 1152:  # the dry run's tiny shapes: the roofline table is for PixArt-XL/2's
        return None
    roofline = cases.roofline_seconds(case, backward, gpu_key)
    return None if roofline is None else 100 * roofline / seconds


def kernel_rows(check: Check, case, impl: str, device: str, reps: int, rounds: int) -> list[dict]:
    """Both directions of one case and implementation, in test_bench_kernels.py's extra_info format."""
    import cases
    import torch
    from pixart_fast.plan import GPUS
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
            with tiny_cases() as cases:
                for case in cases.cases():
                    for impl in ("triton", "eager", "compile"):
                        rows = check.item(smoke, f"{case.name} {impl}",
                                          lambda c=case, i=impl: kernel_rows(check, c, i, "cpu", 2, 2),
                                          None if impl == "eager" else NO_CUDA)
                        smoke["rows"] += rows or []
            smoke["status"] = "ok" if all(i["status"] in ("ok", NO_CUDA) for i in smoke["items"]) else "failed"
            part["smoke"] = smoke
        return
    from pixart_fast.kernels.backend import interpreting
    if interpreting():
        part["status"] = "skipped: TRITON_INTERPRET is set (unset it: the interpreter times nothing useful)"
        return
    import cases
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


# ----------------------------------------------------------------------------------------------------------
# summary.md
# ----------------------------------------------------------------------------------------------------------


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows] + [""]


def _f(value, spec):
    return "-" if value is None else format(value, spec)


def _train_table(rows, extra=()) -> list[str]:
    ref = {r["resolution"]: r["images_per_s"] for r in rows if r["variant"] == "diffusers"}
    header = ["variant", "px", "batch", "ms/step", "images/s", "vs diffusers", "TFLOP/s", "MFU", "peak GB",
              "warm-up s"]
    out = []
    for r in rows:
        vs = ref.get(r["resolution"])
        line = [r["variant"] + (f" ({r['compile_mode']})" if r.get("compile_mode") else ""), r["resolution"],
                r["batch"], _f(r["seconds_per_step"] * 1e3, ".1f"), _f(r["images_per_s"], ".1f"),
                "-" if not vs else f"{r['images_per_s'] / vs:.2f}x", _f(r["tflops"], ".1f"), _f(r["mfu"], ".1%"),
                _f(r.get("peak_memory_gb"), ".1f"), _f(r.get("warmup_s"), ".1f")]
        for _, key, spec in extra:
            line.append(_f(r.get(key), spec) if spec else r.get(key))
        out.append(line)
    return _table(header + [e[0] for e in extra], out)


def _kernel_table(rows) -> list[str]:
    by = {}
    for r in rows:
        by.setdefault((r["kernel"], r["tokens"], r["batch"], r["direction"]), {})[r["impl"]] = r
    out = []
    for (kernel, tokens, batch, direction), impls in by.items():
        us = {k: v["seconds_per_call"] * 1e6 for k, v in impls.items()}
        tri = impls.get("triton")
        out.append([kernel, tokens, batch, direction, *(_f(us.get(k), ".1f") for k in ("triton", "eager", "compile")),
                    "-" if "triton" not in us or "eager" not in us else f"{us['eager'] / us['triton']:.2f}x",
                    "-" if "triton" not in us or "compile" not in us else f"{us['compile'] / us['triton']:.2f}x",
                    "-" if tri is None else f"{tri['gb_per_s']:.0f}",
                    "-" if tri is None else _f(tri["pct_peak_bandwidth"], ".0f"),
                    "-" if tri is None else _f(tri.get("pct_roofline"), ".0f")])
    return _table(["kernel", "tokens", "batch", "direction", "triton us", "eager us", "compile us",
                   "triton speed-up vs eager", "vs compile", "triton GB/s", "triton % peak BW",
                   "triton % roofline"], out)


MODULATE_FAMILY = ("modulate", "gated_residual", "gated_residual_modulate")
GOAL_TOKENS = 256  # PixArt-XL/2 at 256 px


def _goal_table(rows) -> list[str]:
    """Issue 16's goals for the kernels at 256-px XL shapes, against what this run measured: every modulate-family
    kernel at >= 80 % of its roofline (forward, and forward + backward); the fused kernels (modulate family and
    cross-attention) >= 1.2x torch.compile of their references, forward + backward; cross-attention forward +
    backward faster than its reference, F.scaled_dot_product_attention with the same mask (eager)."""
    by = {}
    for r in rows:
        if r["tokens"] == GOAL_TOKENS:
            by.setdefault((r["kernel"], r["direction"]), {})[r["impl"]] = r
    out = []

    def add(goal, kernel, direction, value, target, fmt):
        out.append([goal, kernel, direction, "-" if value is None else format(value, fmt), format(target, fmt),
                    "-" if value is None else ("yes" if value >= target else "no")])

    for (kernel, direction), impls in by.items():
        tri, comp, eager = impls.get("triton"), impls.get("compile"), impls.get("eager")
        if kernel in MODULATE_FAMILY:
            add(">= 80 % of roofline", kernel, direction, tri and tri.get("pct_roofline"), 80, ".0f")
        if direction == "fwd+bwd" and (kernel in MODULATE_FAMILY or kernel == "cross_attention"):
            speedup = comp["seconds_per_call"] / tri["seconds_per_call"] if tri and comp else None
            add(">= 1.2x torch.compile", kernel, direction, speedup, 1.2, ".2f")
        if direction == "fwd+bwd" and kernel == "cross_attention":
            speedup = eager["seconds_per_call"] / tri["seconds_per_call"] if tri and eager else None
            add("faster than SDPA (same mask)", kernel, direction, speedup, 1.0, ".2f")
    return _table(["goal", "kernel", "direction", "measured", "goal value", "met"], out)


def _profile_lines(table: dict) -> list[str]:
    out = [f"{table['what']}; {table['variant']}, batch {table['batch']}, {table['config']}; total "
           f"{table['total_us'] / 1e3:.1f} ms over {table['distinct']} distinct names.", ""]
    out += _table(["category", "ms", "%"], [(k, f"{v['us'] / 1e3:.2f}", f"{v['pct']:.1f}")
                                           for k, v in table["categories"].items()])
    out += _table(["#", "name", "category", "calls", "self ms", "%", "avg us"],
                  [(i + 1, r["name"][:90].replace("|", "/"), r["category"], r["calls"], f"{r['self_us'] / 1e3:.2f}",
                    f"{r['pct']:.1f}", f"{r['avg_us']:.1f}") for i, r in enumerate(table["top"])])
    return out


def summarize(report: dict) -> str:
    env = report.get("environment", {})
    out = ["# pixart_fast one-shot GPU check" + (" (DRY RUN: CPU, tiny shapes, nothing measured on a GPU)"
                                                 if report.get("dry_run") else ""), "",
           f"Started {report.get('started')}, finished {report.get('finished') or 'not finished'}, "
           f"{report.get('elapsed_s')} s (budget {report.get('budget_s')} s, hard limit {report.get('limit_s')} s); "
           f"complete: {report.get('complete')}.",
           f"Device: {env.get('device', '?')} (planner key {env.get('gpu')}, bf16 peak {env.get('peak_bf16_tflops')} "
           f"TFLOP/s, {env.get('peak_bandwidth_gbs')} GB/s); torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, "
           f"triton {env.get('triton')}, diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, "
           f"python {env.get('python')}; commit {env.get('git_commit')}.",
           f"Command: `{report.get('command')}`; torch.compile mode for training steps: {report.get('compile_mode')}.",
           ""]
    inst = report.get("install", {})
    out += ["## Install", "", f"- project: {inst.get('project')}", f"- diffusers: {inst.get('diffusers')}", ""]
    for note in report.get("notes", []):
        out.append(f"- note: {note}")
    out += ["## Parts", ""]
    rows = []
    for name, part in report.get("parts", {}).items():
        bad = [i for i in part.get("items", []) if i["status"] not in ("ok",)]
        detail = "; ".join([*(part.get("notes") or []), *([part["error"]] if part.get("error") else []),
                            *(f"{i['name']}: {i.get('error') or i['status']}" for i in bad[:6]),
                            *([f"... {len(bad) - 6} more"] if len(bad) > 6 else [])])
        smoke = part.get("smoke")
        if smoke:
            detail = (detail + "; " if detail else "") + f"dry-run smoke on the CPU: {smoke.get('status')}"
        rows.append((name, part.get("label"), part.get("status"), part.get("seconds"),
                     detail.replace("|", "/").replace("\n", " ")[:700]))
    out += _table(["part", "what", "status", "s", "notes / errors"], rows)

    infos = [b["extra_info"] for b in report.get("benchmarks", [])]
    kinds = {}
    for i in infos:
        kinds.setdefault(i["kind"], []).append(i)
    if "train_step" in kinds:
        out += ["## PixArt-XL/2 training step (measured; bf16 autocast, fused AdamW)", "",
                "MFU = pixart_fast.plan.flops_per_image x batch / step time / the GPU's dense bf16 peak. "
                "Peak GB: torch.cuda.max_memory_allocated over the timed steps. Warm-up: the first "
                f"{WARMUP_STEPS} steps (compilation included).", ""]
        out += _train_table(kinds["train_step"])
    if "kernel" in kinds:
        out += ["## Kernels (measured; per call, median)", "",
                "Speed-up = other implementation's time / Triton's (above 1: Triton faster). Forward runs with "
                "gradients enabled, as in training.", ""]
        out += _kernel_table(kinds["kernel"])
        out += [f"## Kernel goals at {GOAL_TOKENS} tokens (issue 16; measured here against them)", "",
                "Measured: Triton's % of kernels/roofline.py's roofline time, or the other implementation's time "
                "/ Triton's.", ""]
        out += _goal_table(kinds["kernel"])
    if "largest_batch" in kinds:
        out += ["## Largest batch at 256 px (measured)", ""]
        out += _train_table(kinds["largest_batch"], [("probes", "probes", None), ("search s", "search_seconds", ".1f")])
    if "energy" in kinds:
        out += ["## Energy per training image (measured, NVML board counter)", ""]
        out += _train_table(kinds["energy"], [("J/image", "joules_per_image", ".2f"), ("mean W", "mean_watts", ".0f")])
    profile = report.get("parts", {}).get("profile", {}).get("table")
    if profile:
        out += ["## Profile of one training step (measured)", ""] + _profile_lines(profile)

    smokes = {n: p["smoke"] for n, p in report.get("parts", {}).items() if p.get("smoke")}
    if smokes:
        out += ["## Dry-run smoke (CPU, tiny shapes: proves the code paths, measures nothing of interest)", ""]
        for name, smoke in smokes.items():
            out += [f"### {name}: {smoke.get('status')}", ""]
            if smoke.get("note"):
                out += [smoke["note"], ""]
            srows = smoke.get("rows") or []
            if srows and srows[0]["kind"] == "kernel":
                out += _kernel_table(srows)
            elif srows:
                out += _train_table(srows, [("probes", "probes", None)] if srows[0]["kind"] == "largest_batch" else [])
            if smoke.get("table"):
                table = dict(smoke["table"], top=smoke["table"]["top"][:10])
                out += _profile_lines(table)
            not_run = {}
            for i in smoke.get("items", []):
                if i["status"] != "ok":
                    not_run.setdefault(i.get("error") or i["status"], []).append(i["name"])
            for why, names in not_run.items():
                out += [f"Not run ({why}): {len(names)}: " + ", ".join(names[:8]) +
                        (f", ... {len(names) - 8} more" if len(names) > 8 else ""), ""]

    errors = [(n, p) for n, p in report.get("parts", {}).items() if p.get("traceback")]
    errors += [(f"{n} / {i['name']}", i) for n, p in report.get("parts", {}).items()
               for i in [*p.get("items", []), *(p.get("smoke") or {}).get("items", [])] if i.get("traceback")]
    if errors:
        out += ["## Errors", ""]
        for name, e in errors[:12]:
            out += [f"### {name}", "", "```", e["traceback"].strip()[-2500:], "```", ""]
    return "\n".join(out) + "\n"


def safe_summary(report: dict) -> str:
    """summarize, or (should it fail) a page saying so: the JSON holds everything anyway."""
    try:
        return summarize(report)
    except Exception as e:  # noqa: BLE001
        return (f"# pixart_fast one-shot GPU check\n\nThe summary could not be written ({_short(e)}); "
                f"everything is in {JSON_NAME}.\n\n```\n{_trace(e)}\n```\n")


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def finalize(out: Path, note: str) -> int:
    """After the shell killed the run: mark the JSON incomplete, with `note`, and rewrite summary.md."""
    path = out / JSON_NAME
    if not path.exists():
        print(f"gpu_check: no {path} to finalize", file=sys.stderr)
        return 1
    report = json.loads(path.read_text())
    report["complete"] = False
    report["notes"].append(note)
    for part in report["parts"].values():
        if part.get("status") == "running":
            part["status"] = "error: killed"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / SUMMARY_NAME).write_text(safe_summary(report))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and summary.md")
    p.add_argument("--dry-run", action="store_true", help="CPU only, tiny shapes: prove the plumbing in seconds")
    p.add_argument("--budget", type=float, default=390.0,
                   help="seconds after the start past which no further item starts (default 390)")
    p.add_argument("--limit", type=float, default=410.0,
                   help="seconds after the start at which a running item is interrupted (default 410)")
    p.add_argument("--t0", type=float, default=None, help="the start, epoch seconds (default: now)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, in order (default {','.join(PARTS)})")
    p.add_argument("--compile-mode", choices=("regional", "full"), default="regional",
                   help="torch.compile of the training-step models: each block (default) or the whole model")
    p.add_argument("--install-project", default="not run by gpu_check.sh", help=argparse.SUPPRESS)
    p.add_argument("--install-diffusers", default="not run by gpu_check.sh", help=argparse.SUPPRESS)
    p.add_argument("--finalize", metavar="NOTE", help="only mark an existing JSON in --out as killed, with NOTE")
    args = p.parse_args(argv)
    if args.finalize:
        return finalize(Path(args.out), args.finalize)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in args.parts if s not in PART_FUNCTIONS]
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {list(PARTS)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_check: TRITON_INTERPRET is set; unsetting it (the interpreter must not run here)", flush=True)
        os.environ.pop("TRITON_INTERPRET")
    check = Check(args)
    check.arm_alarm()
    try:
        check.log(f"start: out {check.out}, dry run {check.dry}, budget {args.budget:.0f} s, limit {args.limit:.0f} s")
        try:
            check.report["environment"] = environment(check)
        except Exception as e:  # noqa: BLE001 - without torch or the project nothing else can run
            check.report["environment"]["error"] = _trace(e)
            check.report["notes"].append(f"environment failed: {_short(e)}")
            check.save()
            raise
        check.log(f"device {check.report['environment'].get('device')}, gpu {check.gpu_key}")
        check.save()
        for name in args.parts:
            check.part(name, PART_FUNCTIONS[name])
    except BudgetExceeded as e:
        check.report["notes"].append(_short(e))
    finally:
        check.disarm_alarm()
    check.report["finished"] = _now()
    check.report["complete"] = not check.interrupted
    check.save()
    check.log(f"done: {check.out / JSON_NAME}, {check.out / SUMMARY_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
