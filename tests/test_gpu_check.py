"""bench/gpu_check.sh, the one-shot GPU check, proved without a GPU.

- The dry run runs every part's code on the CPU at tiny shapes in well under a minute, writes the JSON and
  summary.md (whose first line says no GPU ran), puts no row among the GPU figures, and never calls pip.
- The failure modes, rehearsed through the command line: no usable CUDA exits non-zero with torch.cuda.init()'s
  error recorded (after the documented pip commands, recorded by a stand-in pip); a part that raises is recorded
  and the others go on; a part that hangs is interrupted at its own limit; a part that cannot be interrupted
  (signals blocked, as in a hang inside C code) is killed by the shell at the hard limit, and the JSON still
  names it, with when it started and how long it ran.
- The card's identification (SXM, NVL, PCIe) and the peak MFU is taken against; the step breakdown's categories;
  summary.md's GPU tables; and the JSON's compatibility with bench/summary.py and `plan --mfu-from`, on
  synthetic rows.

The subprocesses run with TRITON_INTERPRET removed (the check must never use Triton's interpreter), one OpenMP
thread, and a stand-in diffusers that cannot be imported where the test says so (the GPU machine has none).
"""
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
PARTS = ["warmup", "kernels", "train_steps_256", "profile", "token_levers", "fp8_gemm", "energy", "largest_batch",
         "train_steps_512"]
KERNELS = {"modulate", "gated_residual", "gated_residual_modulate", "cross_attention", "patchify", "unpatchify"}
CATEGORIES = ["matmul", "attention", "modulation family", "optimizer", "EMA", "other"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    """bench/'s modules of the check (guard, parts, report), imported as gpu_check.py imports them."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield SimpleNamespace(**{name: importlib.import_module(f"gpu_{name}")
                                 for name in ("guard", "parts", "report")})
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _run(tmp_path, *args, no_diffusers=False, **env_extra):
    """bash bench/gpu_check.sh ARGS with a pip stand-in that records its calls (tmp_path/pip_calls), exits 0 and
    installs nothing; no_diffusers: a stand-in diffusers package that raises ImportError shadows the real one.
    Returns (completed process, the recorded pip calls)."""
    calls = tmp_path / "pip_calls"
    fake_pip = tmp_path / "fake_pip.sh"
    fake_pip.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 0\n')
    fake_pip.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "WHEELS")}
    if no_diffusers:
        shadow = tmp_path / "shadow" / "diffusers"
        shadow.mkdir(parents=True, exist_ok=True)
        (shadow / "__init__.py").write_text('raise ImportError("simulated: diffusers is not installed")\n')
        env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, PIP=str(fake_pip), HF_HUB_OFFLINE="1", **env_extra)
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    return result, calls.read_text().splitlines() if calls.exists() else []


def _output(result) -> str:
    return result.stdout[-3000:] + result.stderr[-3000:]


def test_dry_run_runs_every_part_at_tiny_shapes(tmp_path):
    out = tmp_path / "out"
    result, pip_calls = _run(tmp_path, "--dry-run", "--out", str(out))
    assert result.returncode == 0, _output(result)
    assert pip_calls == [], f"the dry run called pip: {pip_calls}"
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "summary.md", "gpu_check.log", "install.log"}

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == "pixart_fast.gpu_check/2"
    assert report["dry_run"] is True and report["complete"] is True and report["finished"]
    assert report["gpu_ran"] is False
    env = report["environment"]
    assert env["device"] == "cpu" and env["gpu"] is None and "usable" in env["cuda"]
    assert env["TRITON_INTERPRET"] is None, "the check must not run with Triton's interpreter"
    assert report["install"]["project"].startswith("skipped: dry run")
    assert report["benchmarks"] == [], "a dry run measures nothing that could pass for a GPU figure"

    parts = report["parts"]
    assert list(parts) == report["parts_order"] == PARTS
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("traceback"),
                                                     [i for i in part["items"] if i.get("traceback")])
        assert part["started_s"] > 0 and part["seconds"] is not None and part["limit_s"] > 0
        assert part["label"].startswith("(")
    rows = {name: part["rows"] for name, part in parts.items()}
    assert {r["kernel"] for r in rows["warmup"]} == KERNELS and all(r["kind"] == "cold_start" for r in rows["warmup"])

    kernels = rows["kernels"]
    assert {r["kernel"] for r in kernels} == KERNELS and {r["impl"] for r in kernels} == {"eager", "compile"}
    assert len(kernels) == len(KERNELS) * 2 * 2 * 2  # two token counts, two implementations, two directions
    assert all(r["seconds_per_call"] > 0 and r["stream_seconds_per_call"] > 0 and r["bytes"] > 0 for r in kernels)
    assert all(r["timing"].startswith("torch.profiler") for r in kernels)
    triton = [i for i in parts["kernels"]["items"] if i["name"].endswith(" triton")]
    assert len(triton) == len(KERNELS) * 2 and {i["status"] for i in triton} == {"skipped: no CUDA"}
    roofline = parts["kernels"]["roofline_s"]  # computed at PixArt-XL/2 shapes even in the dry run
    assert roofline["modulate-T256"]["fwd"] > 0 and roofline["patchify-T256"]["fwd+bwd"] is None

    train = rows["train_steps_256"] + rows["train_steps_512"]
    variants = {r["variant"] for r in train}
    assert variants >= {"ours", "ours+triton", "ours+compile", "ours+triton+compile"}
    for row in train:
        assert row["kind"] == "train_step" and row["precision"] == "bf16 autocast" and row["mfu"] is None
        assert row["images_per_s"] > 0 and row["cold_start_s"] >= 0 and row["host_seconds_per_step"] > 0
        assert (row["stand_in"] is not None) == (row["kernels"] == "triton")

    levers = {r["levers"]: r for r in rows["token_levers"]}
    assert list(levers) == ["full", "mask 0.5", "route 0.5", "mask 0.5 + route 0.5"]
    assert all(r["kind"] == "token_levers" and r["images_per_s"] > 0 for r in levers.values())
    assert levers["full"]["speedup_vs_full"] == 1.0 and levers["mask 0.5"]["mask_ratio"] == 0.5
    # the FLOPs a masked or routed step runs are fewer: its TFLOP/s counts them, not the full step's
    assert levers["mask 0.5"]["tflops"] * levers["mask 0.5"]["seconds_per_step"] < \
        levers["full"]["tflops"] * levers["full"]["seconds_per_step"]

    table = parts["profile"]["table"]
    assert list(table["categories"]) == CATEGORIES
    assert sum(c["pct"] for c in table["categories"].values()) == pytest.approx(100, abs=0.5)
    assert table["categories"]["optimizer"]["ms"] > 0 and table["categories"]["EMA"]["ms"] > 0
    assert table["categories"]["matmul"]["ms"] > 0 and 0 < len(table["top"]) <= 25

    gemms = rows["fp8_gemm"]
    assert len(gemms) == 5 * 3 and all(r["rel_error"] < 0.1 and r["fp8_total_s"] > 0 for r in gemms)
    gain = {g["layer"]: g for g in parts["fp8_gemm"]["step_gain"]}
    assert "all layers" in gain and gain["all layers"]["step_ms"] > 0
    assert rows["energy"][0]["joules_per_image"] == 0.0  # the dry run's stand-in meter
    largest = rows["largest_batch"][0]
    assert (largest["batch"], largest["simulated"]) == (6, True)  # the simulated memory limit, found by bisection

    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[0].startswith("# GPU ran: NO (dry run")
    for section in ("## Parts", "## Cold start", "## PixArt-XL/2 training step", "## Kernels", "## Step breakdown",
                    "## GEMMs in bf16 and FP8", "## Largest batch", "## Energy"):
        assert section in summary
    for name in PARTS:
        assert f"| {name} |" in summary
    assert "## Errors" not in summary
    assert "done:" in (out / "gpu_check.log").read_text()


def test_no_usable_cuda_exits_non_zero_with_the_error_recorded(tmp_path):
    """A real run (not --dry-run) where CUDA does not start: after the documented installs (the project editable,
    no deps, no index; diffusers from the wheel folder), the check records torch.cuda.init()'s error and the
    versions, marks every part skipped, says so in summary.md's first line, and exits with status 3."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    out = tmp_path / "out"
    result, pip_calls = _run(tmp_path, "--wheels", str(wheels), no_diffusers=True, OUT=str(out),
                             CUDA_VISIBLE_DEVICES="")  # no GPU visible, even on a machine that has one
    assert result.returncode == 3, _output(result)
    assert pip_calls[0] == f"install --no-deps --no-build-isolation --no-index -e {ROOT}"
    assert f"install --no-index --find-links {wheels} diffusers" in pip_calls
    assert all("--no-index" in call for call in pip_calls)

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is False and report["complete"] is False and report["gpu_ran"] is False
    env = report["environment"]
    assert env["cuda"]["usable"] is False and env["cuda_error"] == env["cuda"]["error"] and env["cuda_error"]
    assert "torch_cuda" in env["cuda"] and env["device"] is None
    assert env["diffusers_importable"] is False and "simulated" in env["diffusers_import_error"]
    assert [p["status"] for p in report["parts"].values()] == ["skipped: no usable CUDA"] * len(PARTS)
    assert report["benchmarks"] == [] and any(n.startswith("NO USABLE CUDA") for n in report["notes"])
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[0] == f"# GPU ran: NO (no usable CUDA: {env['cuda_error']})"
    assert "## CUDA did not start" in summary
    assert "FAILED" in result.stdout


def test_a_failing_part_and_a_hanging_part_are_recorded_and_the_others_go_on(tmp_path):
    out = tmp_path / "out"
    result, _ = _run(tmp_path, "--dry-run", "--out", str(out), "--parts", "profile,kernels,largest_batch",
                     "--simulate", "profile=raise,kernels=hang", "--part-limit", "kernels=2", no_diffusers=True)
    assert result.returncode == 0, _output(result)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["complete"] is True
    parts = report["parts"]
    assert parts["profile"]["status"] == "error" and "simulated failure" in parts["profile"]["error"]
    assert "RuntimeError" in parts["profile"]["traceback"]
    assert parts["kernels"]["status"] == "error: interrupted at the part's limit of 2 s"
    assert 1.5 < parts["kernels"]["seconds"] < 10
    assert parts["largest_batch"]["status"] == "ok"  # diffusers' item skipped for a stated reason
    assert [i["status"] for i in parts["largest_batch"]["items"]] == ["ok", "skipped: diffusers not importable"]
    summary = (out / "summary.md").read_text()
    assert "simulated failure" in summary and "## Errors" in summary


def test_a_kill_at_the_hard_limit_leaves_the_running_part_named_in_the_json(tmp_path):
    """A part that no signal interrupts (a hang inside C code, simulated by blocking SIGALRM and SIGTERM) is
    killed by the shell's `timeout` at the hard limit; the JSON, finalized afterwards, names it, when it started
    and how long it ran, and marks the run incomplete."""
    out = tmp_path / "out"
    limit = 35
    start = time.time()
    result, _ = _run(tmp_path, "--dry-run", "--out", str(out), "--parts", "energy,kernels",
                     "--simulate", "kernels=block", GPU_CHECK_LIMIT_S=str(limit))
    assert time.time() - start < limit + 15
    assert result.returncode == 0, _output(result)
    assert "killed at the hard limit" in result.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["complete"] is False
    assert any("killed by gpu_check.sh at the hard limit" in n for n in report["notes"])
    killed = report["parts"]["kernels"]
    assert killed["status"] == "error: killed" and killed["started_s"] > 0
    assert killed["seconds"] > 5 and killed["started_s"] + killed["seconds"] <= limit + 5
    assert report["parts"]["energy"]["status"] == "ok"
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[0].startswith("# GPU ran: NO (dry run") and "| kernels |" in summary


def _args(tmp_path, **kw):
    base = dict(out=str(tmp_path), dry_run=False, budget=100.0, limit=100.0, t0=time.time(), parts=[],
                compile_mode="regional", install_project="-", install_diffusers="-")
    return SimpleNamespace(**{**base, **kw})


def test_the_guard_records_errors_part_limits_and_the_hard_limit(bench, tmp_path):
    bench.guard._free()  # its first call imports torch and dynamo: before the clock starts
    check = bench.guard.Check(_args(tmp_path, limit=6.0))

    def items(check, part):
        check.item(part, "fine", lambda: {"x": 1})
        check.item(part, "oom", lambda: (_ for _ in ()).throw(MemoryError("out of memory")))
        check.item(part, "not here", lambda: None, skip="skipped: no CUDA")

    def slow_item(check, part):
        check.item(part, "sleeps", lambda: time.sleep(30))

    def seen_running(check, part):  # what a kill at this moment would leave on disk
        saved = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["seen"]
        part["on_disk"] = (saved["status"], saved["started_s"])

    check.arm_alarm()
    try:
        check.part("seen", seen_running)
        check.part("items", items)
        start = time.time()
        check.part("part limit", slow_item, limit_s=1.0)
        assert time.time() - start < 5
        check.part("hard limit", slow_item)
        check.part("after", items)
    finally:
        check.disarm_alarm()
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["seen"]["on_disk"][0] == "running" and parts["seen"]["on_disk"][1] >= 0
    assert parts["items"]["status"] == "partial"
    assert [i["status"] for i in parts["items"]["items"]] == ["ok", "error", "skipped: no CUDA"]
    assert parts["part limit"]["status"] == "error: interrupted at the part's limit of 1 s"
    assert parts["part limit"]["items"][0]["status"] == "error: interrupted at the part's time limit"
    assert parts["hard limit"]["status"] == "error: interrupted at the time limit"
    assert parts["after"]["status"] == "skipped: time budget"
    finalized = bench.guard.finalize({"parts": {"p": {"status": "running", "started_s": 1.0, "items": [
        {"name": "i", "status": "running", "started_s": 2.0}]}}, "notes": [], "t0_epoch": time.time() - 10}, "killed")
    p = finalized["parts"]["p"]
    assert (p["status"], p["items"][0]["status"]) == ("error: killed", "error: killed")
    assert p["seconds"] == pytest.approx(9, abs=1) and p["items"][0]["seconds"] == pytest.approx(8, abs=1)


def test_the_card_is_identified_and_its_peak_shown(bench):
    """SXM, NVL and PCIe boards of the H100 and H200 by name, SM count and power limit; the summary prints the
    table entry and the peak MFU is taken against next to the card."""
    from pixart_fast.gpus import GPUS, identify
    cases = {("NVIDIA H200", 150e9, 132, 700.0): "H200", ("NVIDIA H200", 150e9, 132, 600.0): "H200-NVL",
             ("NVIDIA H200 NVL", 150e9, 132, None): "H200-NVL", ("NVIDIA H100 80GB HBM3", 85e9, 132, 700.0): "H100",
             ("NVIDIA H100 PCIe", 85e9, 114, 350.0): "H100-PCIe", ("NVIDIA H100", 85e9, 114, None): "H100-PCIe",
             ("NVIDIA H100 NVL", 100e9, 132, 400.0): "H100-NVL", ("NVIDIA H100", 100e9, 132, 400.0): "H100-NVL",
             ("NVIDIA H200", 150e9, None, None): "H200", ("NVIDIA A100-SXM4-80GB", 85e9, 108, 400.0): "A100-80GB",
             ("Tesla T4", 16e9, 40, 70.0): None}
    for args, key in cases.items():
        assert identify(*args)[0] == key, args
    assert "power limit 600 W" in identify("NVIDIA H200", 150e9, 132, 600.0)[1]
    assert (GPUS["H100-PCIe"].tflops, GPUS["H100-NVL"].tflops, GPUS["H200-NVL"].tflops) == (756.5, 835.5, 835.5)

    env = dict(device="NVIDIA H200", gpu="H200-NVL", identified_as=identify("NVIDIA H200", 150e9, 132, 600.0)[1],
               sm_count=132,
               memory_gb=150.0, power_limit_w=600.0, power_limit_source="NVML max power limit",
               peak_name=GPUS["H200-NVL"].name, peak_bf16_tflops=835.5, peak_bandwidth_gbs=4800.0)
    summary = bench.report.summarize({"environment": env, "parts": {}, "finished": "now", "complete": True})
    card = next(line for line in summary.splitlines() if line.startswith("Card:"))
    assert "H200-NVL" in card and "835.5 TFLOP/s" in card and "600 W" in card
    assert summary.splitlines()[0].startswith("# GPU ran: NO measurement (CUDA started on NVIDIA H200")


def _train(variant, resolution, batch, seconds, mfu, kind="train_step", **extra):
    model = "diffusers" if variant.startswith("diffusers") else "ours"
    return dict(kind=kind, measured=True, device="NVIDIA H200", gpu="H200", model=model, kernels="triton",
                compile="compile" in variant, compile_mode="regional" if "compile" in variant else None,
                variant=variant, resolution=resolution, batch=batch, precision="bf16 autocast",
                seconds_per_step=seconds, host_seconds_per_step=seconds * 0.9, images_per_s=batch / seconds,
                tflops=100.0, mfu=mfu, peak_memory_gb=40.0, cold_start_s=3.0, build_s=0.5, **extra)


def _kernel(impl, direction, seconds, kernel="modulate", pct_roofline=None):
    return dict(kind="kernel", measured=True, device="NVIDIA H200", gpu="H200", kernel=kernel, tokens=256, batch=128,
                impl=impl, direction=direction, seconds_per_call=seconds, stream_seconds_per_call=seconds * 1.5,
                launches_per_call=2.0, bytes=10**8, gb_per_s=10**8 / seconds / 1e9, tflops=0.0,
                pct_peak_bandwidth=50.0, roofline_s=None if pct_roofline is None else seconds * pct_roofline / 100,
                pct_roofline=pct_roofline)


def _event(name, us, device_type, parent=None, kernels=(), annotation=False):
    return SimpleNamespace(name=name, device_type=device_type, time_range=SimpleNamespace(elapsed_us=lambda: us),
                           is_user_annotation=annotation, cpu_parent=parent, cpu_children=[],
                           kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels], self_cpu_time_total=0)


def test_the_step_breakdown_sorts_kernels_into_categories(bench):
    """Optimizer and EMA: the kernels launched inside their record_function ranges; matmul, attention and the
    modulation family by kernel name; the rest is other. GPU-side annotation events are not kernels."""
    from torch.autograd import DeviceType
    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    opt = _event("pixart::optimizer", 0, cpu, annotation=True)
    ema = _event("pixart::ema", 0, cpu, annotation=True)
    events = [opt, ema,
              _event("aten::_fused_adamw_", 0, cpu, parent=opt, kernels=[("multi_tensor_apply_kernel<Adam>", 300)]),
              _event("aten::_foreach_lerp_", 0, cpu, parent=ema, kernels=[("multi_tensor_apply_kernel<Lerp>", 100)]),
              _event("multi_tensor_apply_kernel<Adam>", 300, cuda), _event("multi_tensor_apply_kernel<Lerp>", 100, cuda),
              _event("sm90_xmma_gemm_bf16bf16_bf16f32", 1000, cuda), _event("_cross_attn_fwd_kernel", 200, cuda),
              _event("_modulate_fwd_kernel", 250, cuda), _event("_gated_residual_bwd_kernel", 50, cuda),
              _event("vectorized_elementwise_kernel", 100, cuda), _event("pixart::optimizer", 400, cuda, annotation=True)]
    table = bench.parts.step_breakdown(SimpleNamespace(events=lambda: events), "cuda", steps=2)
    ms = {k: v["ms"] for k, v in table["categories"].items()}
    assert list(ms) == CATEGORIES
    assert ms == pytest.approx({"matmul": 0.5, "attention": 0.1, "modulation family": 0.15, "optimizer": 0.15,
                                "EMA": 0.05, "other": 0.05})
    assert table["kernel_ms_per_step"] == pytest.approx(1.0) and table["top"][0]["category"] == "matmul"


def test_the_gpu_tables_and_the_json_format_on_synthetic_rows(bench, tmp_path):
    """What a GPU run writes, on made-up rows: summary.md's first line and tables, and the JSON read by
    bench/summary.py and by `pixart_fast.plan --mfu-from`."""
    from pixart_fast.plan import mfu_from_bench

    trains = [_train("ours+triton", 256, 32, 0.08, 0.36), _train("diffusers", 256, 32, 0.1, 0.29),
              _train("ours+triton+compile", 256, 32, 0.07, 0.41)]
    kernels = [_kernel("triton", "fwd", 1e-4, pct_roofline=85.0), _kernel("eager", "fwd", 3e-4),
               _kernel("compile", "fwd", 2e-4), _kernel("triton", "fwd+bwd", 4e-4, pct_roofline=70.0),
               _kernel("compile", "fwd+bwd", 4.4e-4), _kernel("eager", "fwd+bwd", 9e-4),
               *(_kernel(impl, "fwd+bwd", seconds, "cross_attention")
                 for impl, seconds in (("triton", 2e-4), ("eager", 3e-4), ("compile", 2.6e-4)))]
    gemm = dict(kind="gemm_fp8", layer="mlp fc1", gemm="fwd", tokens=8192, m=8192, k=1152, n=4608, per_block=1,
                bf16_s=1e-4, fp8_gemm_s=5e-5, fp8_total_s=8e-5, bf16_tflops=800.0, fp8_tflops=1400.0,
                speedup_gemm=2.0, speedup_total=1.25, rel_error=0.02)
    gain = bench.parts.fp8_step_gain([gemm], 0.08, depth=28, tokens=8192)
    assert gain[0]["saved_ms"] == pytest.approx(28 * 0.02) and gain[0]["step_speedup"] == pytest.approx(80 / 79.44)
    profile = {"what": "CUDA kernels by device time", "variant": "ours+triton", "batch": 32, "config": "XL 256 px",
               "kernel_ms_per_step": 70.0, "step_ms": 80.0, "steps": 2, "distinct": 1,
               "categories": {c: {"ms": 10.0, "pct": 100 / 6} for c in CATEGORIES},
               "top": [{"name": "sm90_xmma_gemm", "category": "matmul", "calls": 10, "self_us": 5e4, "pct": 60.0,
                        "avg_us": 5e3}]}
    largest = _train("ours+triton", 256, 80, 0.2, 0.36, kind="largest_batch", probes=8, search_seconds=9.0)
    energy = _train("ours+triton", 256, 32, 0.08, 0.36, kind="energy", joules_per_image=0.5, mean_watts=600.0)
    parts = {"warmup": {"status": "ok", "rows": [dict(kind="cold_start", kernel="modulate", tokens=256,
                                                      impl="triton", first_fwd_s=1.5, first_fwd_bwd_s=2.5)]},
             "kernels": {"status": "ok", "rows": kernels}, "train_steps_256": {"status": "ok", "rows": trains},
             "profile": {"status": "ok", "rows": [], "table": profile},
             "fp8_gemm": {"status": "ok", "rows": [gemm], "step_gain": gain, "step_gain_note": "the 256-px step"},
             "largest_batch": {"status": "ok", "rows": [largest]}, "energy": {"status": "partial", "rows": [energy]}}
    report = {"schema": "pixart_fast.gpu_check/2", "started": "now", "datetime": "now", "finished": "later",
              "complete": True, "dry_run": False, "environment": {"device": "NVIDIA H200", "gpu": "H200"},
              "install": {}, "notes": [], "parts": parts,
              "benchmarks": [{"name": "x", "extra_info": r} for p in parts.values() for r in p["rows"]
                             if r["kind"] != "cold_start"]}
    summary = bench.report.summarize(report)
    assert summary.splitlines()[0] == "# GPU ran: yes, NVIDIA H200 as H200: 15 rows measured, 6 of 7 parts ok; finished"
    assert "| ours+triton | 256 | 32 | 80.0 | 72.0 | 400.0 | 1.25x | 100.0 | 36.0% | 40.0 | 3.0 |" in summary
    assert "| modulate | 256 | 128 | fwd | 100.0 | 300.0 | 200.0 | 3.00x | 2.00x | 150.0 | 85.0 | 85 | 1000 | 2 |" \
        in summary
    assert "| modulate T256 (triton) | 1.50 | 2.50 | - |" in summary
    assert "| step ours+triton 256 px | - | 3.00 | 0.50 |" in summary
    goals = summary.split("## Kernel goals at 256 tokens")[1].split("##")[0]
    assert "| >= 80 % of roofline | modulate | fwd | 85 | 80 | yes |" in goals
    assert "| >= 80 % of roofline | modulate | fwd+bwd | 70 | 80 | no |" in goals
    assert "| >= 1.2x torch.compile | modulate | fwd+bwd | 1.10 | 1.20 | no |" in goals
    assert "| >= 1.2x torch.compile | cross_attention | fwd+bwd | 1.30 | 1.20 | yes |" in goals
    assert "| faster than SDPA (same mask) | cross_attention | fwd+bwd | 1.50 | 1.00 | yes |" in goals
    assert "| matmul | 10.00 | 16.7 |" in summary and "kernels 70.0 ms per step against a step of 80.0 ms" in summary
    assert "| mlp fc1 | fwd | 8192 | 8192x1152x4608 | 100.0 | 50.0 | 80.0 | 2.00x | 1.25x |" in summary
    assert "| mlp fc1 | 0.56 | 80.0 | 1.007 |" in summary
    assert "## Largest batch at 256 px" in summary and "| 8 | 9.0 |" in summary
    assert "## Energy per training image" in summary and "| 0.50 | 600 |" in summary

    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    assert mfu_from_bench(path) == ("H200", {256: 0.41})
    bench_summary = _load("bench_summary_under_test", ROOT / "bench" / "summary.py")
    text = bench_summary.summarize(report)
    assert "## PixArt-XL/2 training step on the GPU (measured)" in text and "## Kernels on the GPU (measured)" in text
