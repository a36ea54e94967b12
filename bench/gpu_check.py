"""The one-shot GPU check: everything a GPU machine without network should measure, in one run of at most
7 minutes, into one folder. Normally started by `bash bench/gpu_check.sh` (which installs the project first);
`python bench/gpu_check.py --help` lists the options; docs/gpu-day.md is the procedure.

First it finds out whether CUDA works: if not (and this is no dry run) it records torch.cuda.init()'s error with
the driver and CUDA versions, writes the report and exits with status 3. Then the parts, in this order (the most
telling first; bench/gpu_parts.py says what each measures, PART_LIMITS how long each may take): warmup, kernels,
train_steps_256, profile, token_levers, fp8_gemm, energy, largest_batch, train_steps_512. Each runs guarded
(bench/gpu_guard.py): a part or item that fails records its error and traceback and the check goes on; a part past
its own limit is interrupted; past the time budget the remaining items are skipped, and whatever runs at the hard
limit is interrupted.

Output, in --out (bench/gpu_report.py): gpu_check.json (one document; "benchmarks" holds the measured rows in the
extra_info format of `pytest bench/`, so `python bench/summary.py gpu_check.json` and `python -m pixart_fast.plan
--mfu-from gpu_check.json` read it) and summary.md, whose first line says whether the GPU ran. Both are replaced
whole before and after every part and item, so a killed run leaves them, naming what was running.

Exit status: 0 when the check ran (parts may have failed: the JSON says which), 3 when no usable CUDA was found,
4 when CUDA worked but nothing was measured, 1 when the environment could not be read.

--dry-run: the same code on the CPU at tiny shapes, in well under a minute, so that every code path is proved
before any GPU time is spent (bench/gpu_parts.py says what stands in for what). Triton's interpreter is never used.
"""
import argparse
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for _path in (str(ROOT), str(BENCH)):  # bench/'s modules, and the checkout's pixart_fast where it is not installed
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_guard import BudgetExceeded, Check, finalize, now  # noqa: E402 - importable once bench/ is on the path
from gpu_report import JSON_NAME, PARTS, SUMMARY_NAME, error_trace, short_error, write_report  # noqa: E402

# The most seconds each part may take (--part-limit NAME=S changes one); the budget and the hard limit apply too.
PART_LIMITS = {"warmup": 60, "kernels": 100, "train_steps_256": 120, "profile": 40, "token_levers": 60,
               "fp8_gemm": 50, "energy": 30, "largest_batch": 50, "train_steps_512": 90}
NO_CUDA_EXIT, NOTHING_MEASURED_EXIT = 3, 4


def ensure_importable() -> str:
    """pixart_fast.kernels importable: installed by gpu_check.sh, or (if that failed) straight from the checkout
    (pyproject.toml maps pixart_fast.kernels and pixart_fast.train to kernels/ and train/ at the root). The imports
    are made here, not at the top: whether and from where they succeed is what this finds out."""
    try:
        import pixart_fast
        import pixart_fast.kernels  # noqa: F401
        return f"pixart_fast from {Path(pixart_fast.__file__).parent}"
    except ImportError:
        import pixart_fast
        pixart_fast.__path__.append(str(ROOT))
        import pixart_fast.kernels  # noqa: F401
        return f"pixart_fast from the checkout {ROOT} (not installed: its __path__ extended to the root)"


def finalize_out(out: Path, note: str) -> int:
    """After the shell killed the run: the JSON marked incomplete with `note` (what was running: killed, with the
    seconds it ran), and summary.md rewritten."""
    path = out / JSON_NAME
    if not path.exists():
        print(f"gpu_check: no {path} to finalize", file=sys.stderr)
        return 1
    write_report(out, finalize(json.loads(path.read_text()), note))
    return 0


def simulated(how: str):
    """A stand-in part for the rehearsal of failures (--simulate): "raise" fails, "hang" sleeps until the part's
    limit interrupts it, "block" sleeps with SIGALRM and SIGTERM blocked, as a hang inside C code does, so that only
    the shell's kill ends it."""
    def run(check, part):
        if how == "raise":
            raise RuntimeError("simulated failure")
        if how == "block":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
        while True:
            time.sleep(0.5)
    return run


def _pairs(text: str, what: str, parser) -> dict:
    out = {}
    for pair in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = pair.partition("=")
        if name not in PARTS or not value:
            raise SystemExit(f"gpu_check: {what} takes PART=VALUE with PART one of {', '.join(PARTS)}: {pair!r}")
        out[name] = parser(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and summary.md")
    p.add_argument("--dry-run", action="store_true", help="CPU only, tiny shapes: every code path, in well under a minute")
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
    p.add_argument("--part-limit", default="", metavar="PART=S,...",
                   help="the most seconds a part may take, e.g. kernels=60 (defaults: " +
                        ", ".join(f"{k} {v}" for k, v in PART_LIMITS.items()) + ")")
    p.add_argument("--simulate", default="", help=argparse.SUPPRESS)  # PART=raise|hang|block: the failure rehearsal
    p.add_argument("--finalize", metavar="NOTE", help="only mark an existing JSON in --out as killed, with NOTE")
    args = p.parse_args(argv)
    if args.finalize:
        return finalize_out(Path(args.out), args.finalize)
    limits = {**PART_LIMITS, **_pairs(args.part_limit, "--part-limit", float)}
    simulate = _pairs(args.simulate, "--simulate", lambda v: v if v in ("raise", "hang", "block") else
                      p.error(f"--simulate: {v!r} is not raise, hang or block"))
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in args.parts if s not in PARTS]
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
            project = ensure_importable()
            # Imported here, not at the top: they import the project, importable once ensure_importable() has run.
            import gpu_env
            env = check.report["environment"] = gpu_env.environment(check, project)
            from gpu_parts import PART_FUNCTIONS
        except Exception as e:  # noqa: BLE001 - without torch or the project nothing else can run
            check.report["environment"]["error"] = error_trace(e)
            check.report["notes"].append(f"environment failed: {short_error(e)}")
            check.save()
            raise
        if check.device is None:
            cuda = env["cuda"]
            check.report["notes"].append(
                f"NO USABLE CUDA: {env['cuda_error']} (torch {env['torch']} built for CUDA {cuda['torch_cuda']}; "
                f"driver {cuda.get('driver') or cuda.get('proc_driver') or 'unknown'}, driver CUDA "
                f"{cuda.get('driver_cuda', 'unknown')}); nothing was measured")
            check.log(check.report["notes"][-1])
            for name in args.parts:
                check.report["parts"][name] = {"status": "skipped: no usable CUDA", "items": [], "rows": []}
            return NO_CUDA_EXIT
        check.log(f"device {env.get('device')}, gpu {check.gpu_key} ({env.get('identified_as', 'dry run')})")
        check.save()
        gc.collect()
        gc.freeze()  # what the imports made is never garbage: the collections after each item skip it
        for name in args.parts:
            fn = simulated(simulate[name]) if name in simulate else PART_FUNCTIONS[name]
            check.part(name, fn, limits.get(name))
    except BudgetExceeded as e:
        check.report["notes"].append(short_error(e))
    finally:
        gc.unfreeze()
        check.disarm_alarm()
        check.report["finished"] = now()
        check.report["complete"] = not check.interrupted and check.device is not None
        check.report["gpu_ran"] = check.device == "cuda" and bool(check.report["benchmarks"])
        check.save()
        check.log(f"done: {check.out / JSON_NAME}, {check.out / SUMMARY_NAME}")
    if check.device == "cuda" and not check.report["benchmarks"]:
        check.log("FAILED: CUDA worked but no part measured anything (see summary.md's errors)")
        return NOTHING_MEASURED_EXIT
    return 0

if __name__ == "__main__":
    sys.exit(main())
