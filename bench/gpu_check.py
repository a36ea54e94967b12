"""The one-shot GPU check: everything a GPU machine without network should measure, in one run of at most
7 minutes, into one folder. Normally started by `bash bench/gpu_check.sh` (which installs the project first);
`python bench/gpu_check.py --help` lists the options.

Parts, run in this order (the cheap, most telling numbers first; bench/gpu_parts.py says what each measures):
train_steps_256, energy, profile, kernels, largest_batch, train_steps_512. Each runs guarded (bench/gpu_guard.py):
a part or item that fails records its error and traceback and the check goes on; past the time budget the
remaining items are skipped, and an item still running at the hard limit is interrupted.

Output, in --out (bench/gpu_report.py): gpu_check.json (one document; "benchmarks" holds the measured rows in the
extra_info format of `pytest bench/`, so `python bench/summary.py gpu_check.json` and `python -m pixart_fast.plan
--mfu-from gpu_check.json` read it) and summary.md. Both are rewritten after every item, so a killed run leaves
them too.

--dry-run: the same script on the CPU, in seconds: every CUDA part is marked "skipped: no CUDA", and each part's
code runs at tiny shapes on the CPU instead ("smoke" in the JSON) so that the plumbing is proved before any GPU
time is spent. Triton's interpreter is never used.
"""
import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for _path in (str(ROOT), str(BENCH)):  # bench/'s modules, and the checkout's pixart_fast where it is not installed
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_guard import BudgetExceeded, Check, now  # noqa: E402 - importable once bench/ is on the path
from gpu_report import JSON_NAME, PARTS, SUMMARY_NAME, error_trace, short_error, write_report  # noqa: E402


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
    write_report(out, report)
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
            check.report["environment"] = gpu_env.environment(check, project)
            from gpu_parts import PART_FUNCTIONS
        except Exception as e:  # noqa: BLE001 - without torch or the project nothing else can run
            check.report["environment"]["error"] = error_trace(e)
            check.report["notes"].append(f"environment failed: {short_error(e)}")
            check.save()
            raise
        check.log(f"device {check.report['environment'].get('device')}, gpu {check.gpu_key}")
        check.save()
        for name in args.parts:
            check.part(name, PART_FUNCTIONS[name])
    except BudgetExceeded as e:
        check.report["notes"].append(short_error(e))
    finally:
        check.disarm_alarm()
    check.report["finished"] = now()
    check.report["complete"] = not check.interrupted
    check.save()
    check.log(f"done: {check.out / JSON_NAME}, {check.out / SUMMARY_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
