"""The ahead-of-time kernel report (kernels/aot.py): registers and spills of every kernel compiled for sm_80 and
sm_90, without a GPU. Runs in a subprocess with TRITON_INTERPRET unset: interpreted kernels cannot compile."""
import json
import os
import subprocess
import sys


def test_aot_kernel_report(benchmark, tmp_path):
    report = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pixart_fast.kernels.aot", "--json", str(report)]

    def compile_all():
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)

    result = benchmark.pedantic(compile_all, rounds=1, iterations=1)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}"
    rows = json.loads(report.read_text())
    spilling = [f"{r['kernel']} {r['target']}: {r['spill_bytes']} B" for r in rows if r["spill_bytes"]]
    benchmark.extra_info.update(kind="aot", rows=rows, compilations=len(rows), spilling=spilling,
                                max_registers=max(r["registers"] for r in rows))
    print(f"\n{result.stdout}")
