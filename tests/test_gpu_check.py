"""bench/gpu_check.sh, the one-shot GPU check, proved without a GPU: its --dry-run writes the JSON and summary.md
with every CUDA part marked "skipped: no CUDA" and each part's code run at tiny shapes on the CPU, and never calls
pip; a real run installs with the documented pip commands (a stand-in pip records them here), takes diffusers
from the wheel folder, and lives without diffusers; the time budget and the hard limit stop parts as documented;
the GPU tables of summary.md, and the JSON's compatibility with bench/summary.py and `plan --mfu-from`, are
checked on synthetic rows.

The subprocesses run with TRITON_INTERPRET removed (the check must never use Triton's interpreter) and one
OpenMP thread.
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
PARTS = {"train_steps_256", "energy", "profile", "kernels", "largest_batch", "train_steps_512"}
KERNELS = {"modulate", "gated_residual", "gated_residual_modulate", "cross_attention", "patchify", "unpatchify"}


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


def _run(tmp_path, *args, **env_extra):
    """bash bench/gpu_check.sh ARGS with a pip stand-in that records its calls (tmp_path/pip_calls), exits 0 and
    installs nothing. Returns (completed process, the recorded pip calls)."""
    calls = tmp_path / "pip_calls"
    fake_pip = tmp_path / "fake_pip.sh"
    fake_pip.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 0\n')
    fake_pip.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "WHEELS")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, PIP=str(fake_pip), HF_HUB_OFFLINE="1", **env_extra)
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_dry_run_writes_the_json_and_summary_and_installs_nothing(tmp_path):
    out = tmp_path / "out"
    start = time.time()
    result, pip_calls = _run(tmp_path, "--dry-run", "--out", str(out))
    seconds = time.time() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert pip_calls == [], f"the dry run called pip: {pip_calls}"
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "summary.md", "gpu_check.log", "install.log"}

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == "pixart_fast.gpu_check/1"
    assert report["dry_run"] is True and report["complete"] is True and report["finished"]
    env = report["environment"]
    assert env["device"] == "cpu" and env["gpu"] is None
    assert env["TRITON_INTERPRET"] is None, "the check must not run with Triton's interpreter"
    assert report["install"]["project"].startswith("skipped: dry run")
    assert report["install"]["diffusers"].startswith("skipped: dry run")
    assert report["benchmarks"] == [], "a dry run measures nothing that could pass for a GPU figure"

    parts = report["parts"]
    assert list(parts) == report["parts_order"] and set(parts) == PARTS
    for name, part in parts.items():
        assert part["status"].startswith("skipped: no CUDA"), (name, part)
        assert "error" not in part, (name, part.get("traceback"))
        assert part["label"].startswith("(")
    # each part's code ran at tiny shapes on the CPU
    smokes = {name: part["smoke"] for name, part in parts.items() if "smoke" in part}
    assert set(smokes) == {"train_steps_256", "profile", "kernels", "largest_batch"}
    for name, smoke in smokes.items():
        assert smoke["status"] == "ok", (name, [i for i in smoke["items"] if i.get("traceback")])
    train = smokes["train_steps_256"]
    variants = {r["variant"] for r in train["rows"]}
    assert variants == ({"ours", "diffusers"} if env["diffusers_importable"] else {"ours"})
    for row in train["rows"]:
        assert row["kind"] == "train_step" and row["precision"] == "bf16 autocast"
        assert row["images_per_s"] > 0 and row["tflops"] > 0 and row["mfu"] is None  # no GPU: no MFU
    skipped = {i["name"].split(" ")[0]: i["status"] for i in train["items"] if i["status"] != "ok"}
    assert {v: skipped[v] for v in ("ours+triton", "ours+compile", "ours+triton+compile", "diffusers+compile")} == \
        dict.fromkeys(("ours+triton", "ours+compile", "ours+triton+compile", "diffusers+compile"), "skipped: no CUDA")
    kernels = smokes["kernels"]["rows"]
    assert {r["kernel"] for r in kernels} == KERNELS and {r["impl"] for r in kernels} == {"eager"}
    assert len(kernels) == len(KERNELS) * 2 * 2  # two token counts, two directions
    assert all(r["seconds_per_call"] > 0 and r["bytes"] > 0 for r in kernels)
    largest = smokes["largest_batch"]["rows"][0]
    assert (largest["batch"], largest["simulated"]) == (6, True)  # the simulated memory limit, found by bisection
    table = smokes["profile"]["table"]
    assert 0 < len(table["top"]) <= 25 and table["total_us"] > 0

    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "## Parts" in summary and "## Dry-run smoke" in summary
    for name in PARTS:
        assert f"| {name} |" in summary
    assert summary.count("skipped: no CUDA") >= len(PARTS)
    assert "## Errors" not in summary
    log = (out / "gpu_check.log").read_text()
    assert "done:" in log
    print(f"dry run: {seconds:.1f} s")


def test_install_uses_the_wheel_folder_and_lives_without_diffusers(tmp_path):
    """A run on a machine without diffusers: pip installs the project (no deps, no index, editable) and diffusers
    from the wheel folder; diffusers stays unimportable here (a stand-in package raises ImportError), and the
    check still runs. Budget 0: every part is skipped for time, so this costs only the imports."""
    shadow = tmp_path / "shadow" / "diffusers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("simulated: diffusers is not installed")\n')
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    out = tmp_path / "out_env"
    pythonpath = os.pathsep.join([str(tmp_path / "shadow"), *filter(None, [os.environ.get("PYTHONPATH")])])
    result, pip_calls = _run(tmp_path, "--wheels", str(wheels), OUT=str(out), PYTHONPATH=pythonpath,
                             GPU_CHECK_BUDGET_S="0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert pip_calls[0] == f"install --no-deps --no-build-isolation --no-index -e {ROOT}"
    assert f"install --no-index --find-links {wheels} diffusers" in pip_calls
    assert all("--no-index" in call for call in pip_calls)

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is False and report["complete"] is True
    assert report["install"]["project"].startswith("ok")
    assert report["install"]["diffusers"].startswith(f"installed from {wheels}")
    env = report["environment"]
    assert env["diffusers_importable"] is False and "simulated" in env["diffusers_import_error"]
    assert "workloads_import_error" not in env  # bench/workloads.py imports without diffusers
    assert set(report["parts"]) == PARTS
    assert {p["status"] for p in report["parts"].values()} == {"skipped: time budget"}
    assert (out / "summary.md").read_text().count("skipped: time budget") == len(PARTS)


def _args(tmp_path, **kw):
    base = dict(out=str(tmp_path), dry_run=False, budget=100.0, limit=100.0, t0=time.time(), parts=[],
                compile_mode="regional", install_project="-", install_diffusers="-")
    return SimpleNamespace(**{**base, **kw})


def test_failing_parts_and_the_time_limit_are_recorded_and_the_check_goes_on(bench, tmp_path):
    bench.guard._free()  # its first call imports torch and dynamo: before the clock starts
    check = bench.guard.Check(_args(tmp_path, limit=5.0))

    def broken(check, part):
        raise ValueError("this part is broken")

    def items(check, part):
        check.item(part, "fine", lambda: {"x": 1})
        check.item(part, "oom", lambda: (_ for _ in ()).throw(MemoryError("out of memory")))
        check.item(part, "not here", lambda: None, skip="skipped: no CUDA")

    def slow(check, part):
        time.sleep(30)  # the alarm at the hard limit interrupts this

    check.arm_alarm()
    try:
        check.part("broken", broken)
        check.part("items", items)
        start = time.time()
        check.part("slow", slow)
        assert time.time() - start < 15
        check.part("after", items)
    finally:
        check.disarm_alarm()
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["broken"]["status"] == "error" and "this part is broken" in parts["broken"]["error"]
    assert "ValueError" in parts["broken"]["traceback"]
    assert parts["items"]["status"] == "partial"
    assert [i["status"] for i in parts["items"]["items"]] == ["ok", "error", "skipped: no CUDA"]
    assert parts["slow"]["status"] == "error: interrupted at the time limit"
    assert parts["after"]["status"] == "skipped: time budget"
    summary = (tmp_path / "summary.md").read_text()
    assert "this part is broken" in summary and "## Errors" in summary


def _train(variant, resolution, batch, seconds, mfu, kind="train_step", **extra):
    model = "diffusers" if variant.startswith("diffusers") else "ours"
    return {"name": f"{kind} {variant}", "extra_info": dict(
        kind=kind, measured=True, device="NVIDIA H200", gpu="H200", model=model, kernels="triton",
        compile="compile" in variant, compile_mode="regional" if "compile" in variant else None, variant=variant,
        resolution=resolution, batch=batch, precision="bf16 autocast", seconds_per_step=seconds,
        images_per_s=batch / seconds, tflops=100.0, mfu=mfu, peak_memory_gb=40.0, warmup_s=3.0, **extra)}


def _kernel(impl, direction, seconds, kernel="modulate", pct_roofline=None):
    return {"name": f"kernel {impl}", "extra_info": dict(
        kind="kernel", measured=True, device="NVIDIA H200", gpu="H200", kernel=kernel, tokens=256, batch=128,
        impl=impl, direction=direction, seconds_per_call=seconds, bytes=10**8, gb_per_s=10**8 / seconds / 1e9,
        tflops=0.0, pct_peak_bandwidth=50.0, pct_roofline=pct_roofline)}


def test_the_gpu_tables_and_the_json_format_on_synthetic_rows(bench, tmp_path):
    """What a GPU run writes, on made-up rows: summary.md's tables, profile categories, and the JSON read by
    bench/summary.py and by `pixart_fast.plan --mfu-from`."""
    from torch.autograd import DeviceType

    from pixart_fast.plan import mfu_from_bench

    events = [SimpleNamespace(key=k, count=c, device_type=d, self_device_time_total=t, self_cpu_time_total=0)
              for k, c, d, t in [("_modulate_fwd_kernel", 56, DeviceType.CUDA, 300.0),
                                 ("triton_poi_fused_add_mul_0", 10, DeviceType.CUDA, 100.0),
                                 ("sm90_xmma_gemm_bf16bf16_bf16f32", 300, DeviceType.CUDA, 600.0),
                                 ("aten::mm", 300, DeviceType.CPU, 600.0)]]
    table = bench.parts.profile_table(SimpleNamespace(key_averages=lambda: events), "cuda")
    assert [r["name"] for r in table["top"]] == ["sm90_xmma_gemm_bf16bf16_bf16f32", "_modulate_fwd_kernel",
                                                 "triton_poi_fused_add_mul_0"]
    assert {k: round(v["pct"]) for k, v in table["categories"].items()} == \
        {"matmul": 60, "ours (Triton)": 30, "inductor (Triton)": 10}
    table.update(variant="ours+triton", batch=32, step_seconds_profiled=0.1, config="PixArt-XL/2 256 px")

    rows = [_train("ours+triton", 256, 32, 0.08, 0.36), _train("diffusers", 256, 32, 0.1, 0.29),
            _train("ours+triton+compile", 256, 32, 0.07, 0.41),
            _train("ours+triton", 256, 80, 0.2, 0.36, kind="largest_batch", probes=8, search_seconds=9.0),
            _train("ours+triton", 256, 32, 0.08, 0.36, kind="energy", joules_per_image=0.5, mean_watts=600.0),
            _kernel("triton", "fwd", 1e-4, pct_roofline=85.0), _kernel("eager", "fwd", 3e-4),
            _kernel("compile", "fwd", 2e-4), _kernel("triton", "fwd+bwd", 4e-4, pct_roofline=70.0),
            _kernel("compile", "fwd+bwd", 4.4e-4), _kernel("eager", "fwd+bwd", 9e-4),
            *(_kernel(impl, "fwd+bwd", seconds, "cross_attention")
              for impl, seconds in (("triton", 2e-4), ("eager", 3e-4), ("compile", 2.6e-4)))]
    report = {"schema": "pixart_fast.gpu_check/1", "started": "now", "datetime": "now", "dry_run": False,
              "environment": {"device": "NVIDIA H200", "gpu": "H200"}, "install": {}, "notes": [],
              "parts": {"profile": {"label": "(e)", "status": "ok", "items": [], "table": table}},
              "benchmarks": rows}
    summary = bench.report.summarize(report)
    assert "| ours+triton | 256 | 32 | 80.0 | 400.0 | 1.25x | 100.0 | 36.0% | 40.0 | 3.0 |" in summary
    assert "| modulate | 256 | 128 | fwd | 100.0 | 300.0 | 200.0 | 3.00x | 2.00x | 1000 | 50 |" in summary
    goals = summary.split("## Kernel goals at 256 tokens")[1].split("##")[0]
    assert "| >= 80 % of roofline | modulate | fwd | 85 | 80 | yes |" in goals
    assert "| >= 80 % of roofline | modulate | fwd+bwd | 70 | 80 | no |" in goals
    assert "| >= 1.2x torch.compile | modulate | fwd+bwd | 1.10 | 1.20 | no |" in goals
    assert "| >= 1.2x torch.compile | cross_attention | fwd+bwd | 1.30 | 1.20 | yes |" in goals
    assert "| faster than SDPA (same mask) | cross_attention | fwd+bwd | 1.50 | 1.00 | yes |" in goals
    assert "## Largest batch at 256 px" in summary and "| 8 | 9.0 |" in summary
    assert "## Energy per training image" in summary and "| 0.50 | 600 |" in summary
    assert "sm90_xmma_gemm_bf16bf16_bf16f32" in summary and "| matmul | 0.60 | 60.0 |" in summary

    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    assert mfu_from_bench(path) == ("H200", {256: 0.41})
    bench_summary = _load("bench_summary_under_test", ROOT / "bench" / "summary.py")
    text = bench_summary.summarize(report)
    assert "## PixArt-XL/2 training step on the GPU (measured)" in text and "## Kernels on the GPU (measured)" in text
