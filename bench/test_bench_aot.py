"""The ahead-of-time kernel report (kernels/aot.py): every kernel compiled for sm_80 and sm_90 as Triton's JIT
compiles it for PixArt-XL/2's launches (alignment / divisibility specialisation, the autocast dtypes), without a
GPU: registers, spills, shared memory, programs per SM, global access widths and tensor-core instructions. Runs in a
subprocess with TRITON_INTERPRET unset: interpreted kernels cannot compile."""
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
    out = json.loads(report.read_text())
    rows = out["compiles"]
    spilling = [f"{r['kernel']} {r['target']}: {r['spill_bytes']} B" for r in rows if r["spill_bytes"]]
    # Findings, not bars: tensor-core instructions of cross-attention and the kernels held to one program per SM.
    tensor_cores = {f"{r['kernel']} {'/'.join(x.split()[0] for x in r['regimes'])} {r['target']}":
                    {"wgmma": r["wgmma"], "mma": r["mma"]} for r in rows if r["module"] == "cross_attn"}
    one_program = sorted({f"{r['kernel']} {r['target']}" for r in rows if r["programs_per_sm"] <= 1})
    benchmark.extra_info.update(kind="aot", rows=rows, compilations=len(rows), spilling=spilling,
                                max_registers=max(r["registers"] for r in rows),
                                launches=sum(len(r["calls"]) for r in rows),
                                cross_attn_tensor_cores=tensor_cores, one_program_per_sm=one_program,
                                roofline=out["roofline"])
    print(f"\n{result.stdout}")
