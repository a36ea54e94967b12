"""The ahead-of-time compile report (kernels/aot.py): every kernel compiles for sm_80 and sm_90 without register
spills, and the numbers it reads from ptxas are real.

The test process runs with TRITON_INTERPRET=1 (conftest.py), under which kernels cannot be compiled, so the
compiling happens in subprocesses with the variable removed.
"""
import importlib
import json
import os
import subprocess
import sys

from pixart_fast.kernels.aot import KERNEL_MODULES, SHARED_MEMORY_LIMIT


def _run(args, interpret=False, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    """Every aot_specs() entry of every kernel module compiles for both targets with 0 spill bytes and within the
    target's shared memory (which Triton would otherwise only find out at launch, on a GPU)."""
    report = tmp_path / "aot.json"
    result = _run(["-m", "pixart_fast.kernels.aot", "--json", str(report)])
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(report.read_text())

    expected = {(name, spec["name"], target) for name in KERNEL_MODULES
                for spec in importlib.import_module(f"pixart_fast.kernels.{name}").aot_specs()
                for target in ("sm_80", "sm_90")}
    assert {(row["module"], row["kernel"], row["target"]) for row in rows} == expected
    assert len(rows) == len(expected)
    for row in rows:
        assert 0 < row["registers"] <= 255, row
        assert row["spill_bytes"] == 0, f"register spills: {row}"
        assert row["shared_bytes"] <= SHARED_MEMORY_LIMIT[row["target"]], f"too much shared memory: {row}"


def test_refuses_to_run_under_the_interpreter():
    result = _run(["-m", "pixart_fast.kernels.aot"], interpret=True)
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1 is set" in result.stderr


HUNGRY_KERNEL = '''
import json, subprocess, tempfile
import triton, triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pixart_fast.kernels.aot import compile_spec

@triton.jit
def hungry(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # All BLOCK values stay live across the reduction: BLOCK / 32 registers per thread with one warp.
    x = tl.load(x_ptr + tl.arange(0, BLOCK))
    tl.store(y_ptr + tl.arange(0, BLOCK), x / tl.sum(x * x, axis=0))

out = []
for block in (1024, 8192):  # 32 values per thread fit in registers, 256 cannot (at most 255)
    spec = dict(name=f"hungry{block}", fn=hungry, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                constexprs={"BLOCK": block}, num_warps=1, num_stages=1)
    for arch in (80, 90):
        target = GPUTarget("cuda", arch, 32)
        row = compile_spec(spec, target)
        # The cubin Triton itself built, read back by cuobjdump: REG:<registers> STACK:<stack frame bytes>
        cubin = triton.compile(ASTSource(fn=hungry, signature=spec["signature"], constexprs=spec["constexprs"]),
                               target=target, options={"num_warps": 1, "num_stages": 1}).asm["cubin"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                                   capture_output=True, text=True).stdout
        fields = dict(item.split(":") for item in usage.split("Function hungry:")[1].split())
        out.append({**row, "block": block, "cubin_registers": int(fields["REG"]), "cubin_stack": int(fields["STACK"])})
print(json.dumps(out))
'''


def test_report_reads_real_register_and_spill_counts(tmp_path):
    """A kernel that must spill shows spills, one that fits shows none, and the register counts are those of
    the cubin Triton built (so re-running ptxas on its PTX reproduces Triton's allocation)."""
    script = tmp_path / "hungry.py"  # @triton.jit needs its source in a file
    script.write_text(HUNGRY_KERNEL)
    result = _run([str(script)])
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    assert len(rows) == 4
    for row in rows:
        assert row["registers"] == row["cubin_registers"], row
        if row["block"] == 1024:
            assert row["spill_bytes"] == 0 and row["cubin_stack"] == 0, row
        else:
            assert row["spill_bytes"] > 0 and row["cubin_stack"] > 0, row
