"""Ahead-of-time compile report: every kernel compiled for A100 (sm_80) and H100 (sm_90) as the JIT compiles it.

    python -m pixart_fast.kernels.aot [--json FILE]     (FILE: {"compiles": [rows], "roofline": [rows]})

No GPU is needed. Each kernel module's aot_specs(sms) runs the real launchers on meta tensors shaped, strided and
typed as PixArt-XL/2's calls (bf16 and fp16 autocast, fp32) and records the arguments each launch hands the JIT.
Those are specialised by Triton's own binder for the target (triton.runtime.jit.create_function_from_signature:
16-byte aligned pointers and integers divisible by 16 get the tt.divisibility = 16 attribute, integers equal to 1
become constants, None pointers constexprs), exactly what JITFunction.run does before it compiles; each distinct
specialisation is compiled once, with triton.compile, to a cubin. One row per compiled kernel lists the calls it
serves.

Per row: registers per thread and spill bytes (ptxas runs once more, with -v, on the same PTX and flags Triton used,
because Triton reads them from the driver only when it loads the kernel on a GPU), shared memory, programs per SM
(the occupancy its registers, shared memory and warps allow: 65536 registers allocated per warp in units of 256,
2048 threads, 32 blocks, 164 KB (sm_80) / 228 KB (sm_90) shared memory with 1 KB reserved per block), and
counts read from the PTX and from the SASS (cuobjdump, bundled with Triton): global loads and stores by width in
bits (ld.global.v4.b32 = 128), wgmma vs mma.sync instructions (SASS: HGMMA vs HMMA).
docs/ARCHITECTURE.md section 4 asks for zero spills everywhere.

After the compile table, kernels/roofline.py's table: bytes and FLOPs of each launch at PixArt-XL/2 training shapes
(32768 tokens per call) and its roofline time on A100, H100 and H200.

Run it with TRITON_INTERPRET unset: under the interpreter @triton.jit functions cannot be compiled.
"""
import argparse
import collections
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from pixart_fast.cli import UserError, run
from pixart_fast.tables import text_table

from .backend import interpreting
from .roofline import format_roofline, roofline_rows
from .targets import KERNEL_MODULES, SHARED_MEMORY_LIMIT, SM_COUNT, SM_SHARED_MEMORY, SM_THREADS
from .utils import programs_per_sm

# The compile targets: A100 (sm_80), H100 and H200 (sm_90).
TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))

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


_PTX_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16, "b32": 32, "u32": 32,
             "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64, "b128": 128}


def ptx_counts(ptx: str) -> dict:
    """Global loads / stores of a kernel's PTX by access width in bits ({"128": n, ...}; ld.global.v4.b32 = 128,
    ld.global.b16 = 16), its asynchronous global -> shared copies by width (cp.async, what software-pipelined
    loops load with; cp.async.cg.shared.global [..], [..], 16 = 128) and its tensor-core instructions: wgmma
    (wgmma.mma_async, sm_90) and mma (mma.sync)."""
    counts = {"ld": collections.Counter(), "st": collections.Counter(), "cp": collections.Counter()}
    for op, suffixes in re.findall(r"\b(ld|st)\.global((?:\.[\w:]+)*)", ptx):
        parts = suffixes.split(".")[1:]
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        bits = next((_PTX_BITS[p] for p in reversed(parts) if p in _PTX_BITS), None)
        counts[op][str(vector * bits) if bits else "?"] += 1
    copy = r"\bcp\.async\.c[ag]\.shared(?:::cta)?\.global(?:\.[\w:]+)*\s*\[[^]]*\],\s*\[[^]]*\],\s*(\w+)"
    for size in re.findall(copy, ptx):
        counts["cp"][str(8 * int(size, 0))] += 1
    return {"ptx_ld": _by_width(counts["ld"]), "ptx_st": _by_width(counts["st"]), "ptx_cp": _by_width(counts["cp"]),
            "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)), "mma": len(re.findall(r"\bmma\.sync\b", ptx))}


def _by_width(counter: collections.Counter) -> dict:
    return dict(sorted(counter.items(), key=lambda item: -int(item[0]) if item[0].isdigit() else 0))


def sass_counts(cubin: bytes) -> dict | None:
    """The same counts from the SASS (cuobjdump -sass of the cubin): LDG / STG / LDGSTS (cp.async) by width (no
    suffix = 32 bits, .U16 = 16, .64, .128) and HGMMA vs HMMA instructions. None where Triton's cuobjdump cannot
    run."""
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", f.name], check=True,
                                  capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return None
    counts = {"LDG": collections.Counter(), "STG": collections.Counter(), "LDGSTS": collections.Counter()}
    for op, suffixes in re.findall(r"\b(LDGSTS|LDG|STG)\b((?:\.[\w]+)*)", sass):
        parts = suffixes.split(".")[1:]
        bits = 32
        for p in parts:
            if p in ("128", "64"):
                bits = int(p)
            elif p in ("U16", "S16"):
                bits = 16
            elif p in ("U8", "S8"):
                bits = 8
        counts[op][str(bits)] += 1
    return {"sass_ld": _by_width(counts["LDG"]), "sass_st": _by_width(counts["STG"]),
            "sass_cp": _by_width(counts["LDGSTS"]),
            "hgmma": len(re.findall(r"\bHGMMA\b", sass)), "hmma": len(re.findall(r"\bHMMA\b", sass))}


def specialize(spec: dict, target: GPUTarget) -> dict:
    """What the JIT compiles for one aot_specs() entry on `target`: {"signature", "constexprs", "attrs", "options"}.

    Entries with "args" / "kwargs" (a recorded launch) go through Triton's own binder and JITFunction._pack_args,
    as JITFunction.run does. Entries with "signature" / "constexprs" / "num_warps" / "num_stages" (kernels/utils.py
    aot_spec()) are compiled as given, with the attributes in "attrs" (none by default).
    """
    backend = make_backend(target)
    if "args" not in spec:
        options = backend.parse_options({"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        return {"signature": spec["signature"], "constexprs": spec["constexprs"], "attrs": spec.get("attrs", {}),
                "options": options}
    fn = spec["fn"]
    # The options JITFunction.run adds to the launch keywords before it binds them (fpsan_homomorphic_casts from
    # Triton 3.7 on; the GPU image has 3.6).
    kwargs = {**spec["kwargs"], "debug": spec["kwargs"].get("debug", fn.debug) or triton.knobs.runtime.debug,
              "instrumentation_mode": triton.knobs.compilation.instrumentation_mode}
    if hasattr(triton.knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*spec["args"], **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs, "options": options}


def _arg_name(fn, key) -> str:
    """The argument a signature / constexprs / attrs key names: an argument name, or a path whose first index is
    its position (the JIT's form)."""
    return key if isinstance(key, str) else fn.arg_names[key[0]]


def describe_specialization(fn, sig: dict) -> str:
    """The specialisation in words: "16: <arguments with tt.divisibility 16>; const: <non-constexpr arguments the JIT
    made constants, e.g. stride_iw=1 GATE=None>"."""
    divisible = [_arg_name(fn, key) for key, attr in sig["attrs"].items() if ["tt.divisibility", 16] in attr]
    params = {p.name for p in fn.params if p.is_constexpr}
    constants = [f"{_arg_name(fn, key)}={value}" for key, value in sig["constexprs"].items()
                 if _arg_name(fn, key) not in params]
    return f"16: {' '.join(divisible) or '-'}; const: {' '.join(constants) or '-'}"


def compile_spec(spec: dict, target: GPUTarget, sig: dict | None = None) -> dict:
    """Compile one aot_specs() entry for `target`; returns its report row.

    row: {"kernel", "config", "target" ("sm_80"), "signature", "specialization", "registers", "spill_bytes",
    "shared_bytes", "num_warps", "programs_per_sm", "occupancy_limit", "ptx_ld", "ptx_st", "wgmma", "mma", and
    "sass_ld", "sass_st", "hgmma", "hmma" where cuobjdump runs}.
    """
    if interpreting():
        raise RuntimeError(_INTERPRET_ERROR)
    sig = sig or specialize(spec, target)
    src = ASTSource(fn=spec["fn"], signature=sig["signature"], constexprs=sig["constexprs"], attrs=sig["attrs"])
    try:
        compiled = triton.compile(src, target=target, options=sig["options"].__dict__)
    except Exception as e:
        e.add_note(f"while compiling {spec['name']} for sm_{target.arch}")
        raise
    meta = compiled.metadata
    params = {p.name for p in spec["fn"].params if p.is_constexpr}
    config = " ".join([f"{_arg_name(spec['fn'], key)}={value}" for key, value in sig["constexprs"].items()
                       if _arg_name(spec["fn"], key) in params]
                      + [f"num_warps={meta.num_warps}", f"num_stages={meta.num_stages}"])
    name = f"sm_{target.arch}"
    row = {"kernel": spec["name"], "config": config, "target": name,
           "signature": " ".join(f"{k}:{v}" for k, v in sig["signature"].items() if v != "constexpr"),
           "specialization": describe_specialization(spec["fn"], sig),
           **ptxas_usage(compiled.asm["ptx"], target, meta.enable_fp_fusion, meta.ptx_options),
           "shared_bytes": meta.shared, "num_warps": meta.num_warps}
    row["programs_per_sm"], row["occupancy_limit"] = programs_per_sm(row["registers"], meta.shared, meta.num_warps,
                                                                     SM_SHARED_MEMORY[name], SM_THREADS)
    row.update(ptx_counts(compiled.asm["ptx"]))
    row.update(sass_counts(compiled.asm["cubin"]) or {})
    return row


def _key(spec: dict, sig: dict) -> tuple:
    return (spec["name"], id(spec["fn"]), repr(sorted(sig["signature"].items())), repr(sorted(sig["constexprs"].items())),
            repr(sorted(sig["attrs"].items())), repr(sorted(sig["options"].__dict__.items())))


def compile_report(modules=KERNEL_MODULES, targets=TARGETS) -> list[dict]:
    """Compile every distinct specialisation of every aot_specs() launch of `modules` for every target.

    Returns one row per (kernel specialisation, target): compile_spec()'s row plus "module", "calls" (the launches
    it serves, as aot_specs() labels them) and "regimes" (their precisions: "bf16 autocast", "fp16 autocast",
    "fp32").
    """
    rows = []
    for target in targets:
        name = f"sm_{target.arch}"
        for module_name in modules:
            module = importlib.import_module(f".{module_name}", __package__)
            if not hasattr(module, "aot_specs"):
                raise AttributeError(f"kernel module {module.__name__} defines no aot_specs(); add one "
                                     "(see docs/ARCHITECTURE.md section 4)")
            groups = {}
            for spec in module.aot_specs(sms=SM_COUNT[name], capability=target.arch):
                sig = specialize(spec, target)
                groups.setdefault(_key(spec, sig), (spec, sig, []))[2].append(spec.get("call", ""))
            # Rows of one kernel together, in the order aot_specs() first launches each kernel.
            order = list(dict.fromkeys(spec["name"] for spec, _, _ in groups.values()))
            for spec, sig, calls in sorted(groups.values(), key=lambda group: order.index(group[0]["name"])):
                regimes = list(dict.fromkeys(" ".join(c.split()[:2]) if "autocast" in c else c.split()[0]
                                             for c in calls if c))
                rows.append({"module": module_name, **compile_spec(spec, target, sig), "calls": calls,
                             "regimes": regimes})
    return rows


def _widths(counts: dict | None) -> str:
    return " ".join(f"{bits}x{n}" for bits, n in counts.items()) if counts else "-"


def _shapes(calls: list[str]) -> str:
    """The shape part of the calls ("T=256,1024"), their precision left to the regimes column."""
    shapes = list(dict.fromkeys(c.split()[-1] for c in calls if c))
    key = shapes[0].split("=")[0] + "=" if shapes and "=" in shapes[0] else ""
    return key + ",".join(s.removeprefix(key) for s in shapes)


TABLE_COLUMNS = {
    "kernel": lambda r: r["kernel"],
    "precision": lambda r: ",".join(x.replace(" autocast", "") for x in r.get("regimes", [])) or "-",
    "shapes": lambda r: _shapes(r.get("calls", [])),
    "target": lambda r: r["target"],
    "regs": lambda r: str(r["registers"]),
    "spill": lambda r: str(r["spill_bytes"]),
    "smem": lambda r: str(r["shared_bytes"]),
    "warps": lambda r: str(r["num_warps"]),
    "prog/SM": lambda r: f"{r['programs_per_sm']} ({r['occupancy_limit']})",
    "ld bits": lambda r: _widths(r["ptx_ld"]),
    "st bits": lambda r: _widths(r["ptx_st"]),
    "cp.async bits": lambda r: _widths(r["ptx_cp"]),
    "wgmma/mma": lambda r: f"{r['wgmma']}/{r['mma']}",
    "SASS LDG": lambda r: _widths(r.get("sass_ld")),
    "SASS STG": lambda r: _widths(r.get("sass_st")),
    "SASS LDGSTS": lambda r: _widths(r.get("sass_cp")),
    "HGMMA/HMMA": lambda r: f"{r['hgmma']}/{r['hmma']}" if "hgmma" in r else "-",
}


def format_table(rows: list[dict]) -> str:
    """The report rows as an aligned text table (ld / st bits: "128x6 32x2" = six 128-bit and two 32-bit accesses)."""
    return text_table(TABLE_COLUMNS, [[f(row) for f in TABLE_COLUMNS.values()] for row in rows], right=False)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pixart_fast.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the report to FILE as JSON: "
                        "{\"compiles\": [...], \"roofline\": [...]}")
    args = parser.parse_args(argv)
    if interpreting():
        raise UserError(_INTERPRET_ERROR)
    rows = compile_report()
    print(format_table(rows))
    spilling = [row for row in rows if row["spill_bytes"]]
    too_much_shared = [row for row in rows if row["shared_bytes"] > SHARED_MEMORY_LIMIT[row["target"]]]
    print(f"\n{len(rows)} compilations ({sum(len(row['calls']) for row in rows)} launches), {len(spilling)} with "
          f"register spills, {len(too_much_shared)} above the target's shared memory limit")
    roofline = roofline_rows()
    print(f"\n{format_roofline(roofline)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"compiles": rows, "roofline": roofline}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
