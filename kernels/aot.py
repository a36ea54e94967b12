"""Ahead-of-time compile report: every kernel's launch configurations compiled for A100 (sm_80) and H100 (sm_90).

    python -m pixart_fast.kernels.aot [--json FILE]

No GPU is needed: each spec of a kernel module's aot_specs() goes through triton.compile to a cubin. ptxas then
runs once more, with -v, on the same PTX and flags Triton used, because Triton only reads registers and spills
back from the driver when it loads the kernel on a GPU. The report lists registers per thread, spill bytes
(stores + loads) and shared memory bytes; docs/ARCHITECTURE.md section 4 asks for zero spills everywhere.

Run it with TRITON_INTERPRET unset: under the interpreter @triton.jit functions cannot be compiled.
"""
import argparse
import importlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from .backend import interpreting

# Modules of pixart_fast.kernels that define aot_specs().
KERNEL_MODULES = ("patch_copy", "modulation", "cross_attn")
TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))
# The most shared memory one block may use, in bytes (CUDA C++ Programming Guide, compute capability table:
# 163 KB on sm_80, 227 KB on sm_90); a kernel that needs more fails at launch with OutOfResources.
SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}

_INTERPRET_ERROR = ("TRITON_INTERPRET=1 is set: @triton.jit functions are interpreted and cannot be compiled ahead "
                    "of time. Run with it unset: env -u TRITON_INTERPRET python -m pixart_fast.kernels.aot")


def ptxas_usage(ptx: str, target: GPUTarget, enable_fp_fusion: bool = True, ptx_options: str | None = None) -> dict:
    """Registers per thread and spill bytes (stores + loads) ptxas reports for one kernel's PTX.

    Mirrors the ptxas flags of Triton's own PTX -> cubin step (triton/backends/nvidia/compiler.py, make_cubin)
    so the allocation is the one Triton's cubin has.
    """
    arch = sm_arch_from_capability(target.arch)
    fmad = [] if enable_fp_fusion else ["--fmad=false"]
    extra = ptx_options.split() if ptx_options else []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(target.arch).path, "-v", "--regAllocOptLevel=2", *fmad, *extra, f"--gpu-name={arch}",
               str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    # One "Used N registers" line per entry function (Triton emits one); one spill line per function, device
    # functions included, so the spills of everything the kernel calls are summed.
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if len(regs) != 1 or not spills:
        raise RuntimeError(f"could not read registers and spills from the ptxas log of {' '.join(cmd)}:\n{log}")
    return {"registers": int(regs[0]), "spill_bytes": sum(int(stores) + int(loads) for stores, loads in spills)}


def compile_spec(spec: dict, target: GPUTarget) -> dict:
    """Compile one aot_specs() entry for `target`; returns its report row.

    spec: {"name", "fn" (a JITFunction), "signature", "constexprs", "num_warps", "num_stages"}, as
    kernels/utils.py's aot_spec() builds it.
    row: {"kernel", "config", "target" ("sm_80"), "registers", "spill_bytes", "shared_bytes"}.
    """
    if interpreting():
        raise RuntimeError(_INTERPRET_ERROR)
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
    try:
        compiled = triton.compile(src, target=target,
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as e:
        e.add_note(f"while compiling {spec['name']} for sm_{target.arch}")
        raise
    meta = compiled.metadata
    config = " ".join([f"{k}={v}" for k, v in spec["constexprs"].items()]
                      + [f"num_warps={spec['num_warps']}", f"num_stages={spec['num_stages']}"])
    return {"kernel": spec["name"], "config": config, "target": f"sm_{target.arch}",
            **ptxas_usage(compiled.asm["ptx"], target, meta.enable_fp_fusion, meta.ptx_options),
            "shared_bytes": meta.shared}


def compile_report(modules=KERNEL_MODULES, targets=TARGETS) -> list[dict]:
    """Compile every aot_specs() entry of `modules` (names under pixart_fast.kernels) for every target.

    Returns one row per (spec, target): compile_spec()'s row plus "module".
    """
    rows = []
    for name in modules:
        module = importlib.import_module(f".{name}", __package__)
        if not hasattr(module, "aot_specs"):
            raise AttributeError(f"kernel module {module.__name__} defines no aot_specs(); add one (see docs/ARCHITECTURE.md section 4)")
        for spec in module.aot_specs():
            for target in targets:
                rows.append({"module": name, **compile_spec(spec, target)})
    return rows


def format_table(rows: list[dict]) -> str:
    """The report rows as an aligned text table."""
    columns = ("kernel", "config", "target", "registers", "spill_bytes", "shared_bytes")
    cells = [columns] + [tuple(str(row[c]) for c in columns) for row in rows]
    widths = [max(len(line[k]) for line in cells) for k in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pixart_fast.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list to FILE")
    args = parser.parse_args(argv)
    if interpreting():
        raise SystemExit(_INTERPRET_ERROR)
    rows = compile_report()
    print(format_table(rows))
    spilling = [row for row in rows if row["spill_bytes"]]
    too_much_shared = [row for row in rows if row["shared_bytes"] > SHARED_MEMORY_LIMIT[row["target"]]]
    print(f"\n{len(rows)} compilations, {len(spilling)} with register spills, "
          f"{len(too_much_shared)} above the target's shared memory limit")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
