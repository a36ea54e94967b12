"""The GPU check's guard: every part and item runs guarded (an error is recorded and the check goes on), nothing
starts past the time budget, an alarm interrupts whatever runs at the hard limit, and the report is saved after
each part and item so that a killed run leaves it too.
"""
import gc
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from gpu_report import LABELS, SCHEMA, error_trace, short_error, write_report

OUT_OF_TIME = "skipped: time budget"


class BudgetExceeded(BaseException):
    """Raised by the alarm at the hard time limit: a BaseException, so no library's `except Exception` eats it."""


def now() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Check:
    """One run of the check: its clock, budget and hard limit (args.t0, args.budget, args.limit, s), the report it
    keeps (`report`, saved to args.out) and the device the environment found (`device`, `gpu_key`)."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.t0 = args.t0 if args.t0 is not None else time.time()
        self.dry = args.dry_run
        self.interrupted = False
        self.device = None  # "cuda" or "cpu", set by gpu_env.environment()
        self.gpu_key = None
        self.report = {
            "schema": SCHEMA, "started": now(), "datetime": now(), "finished": None, "complete": False,
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
        write_report(self.out, self.report)

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
            part["status"], part["error"] = "error: interrupted at the time limit", short_error(e)
        except Exception as e:  # noqa: BLE001 - a failing part records its error and the check goes on
            part["status"], part["error"], part["traceback"] = "error", short_error(e), error_trace(e)
            self.log(f"{name}: error {short_error(e)}")
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
            entry["status"], entry["error"] = "error: interrupted at the time limit", short_error(e)
        except Exception as e:  # noqa: BLE001
            entry["status"], entry["error"], entry["traceback"] = "error", short_error(e), error_trace(e)
            self.log(f"  {name}: error {short_error(e)}")
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
                entry["status"], entry["error"] = "error: interrupted at the time limit", short_error(e)


def _free():
    """Drop what the last item left: Python garbage, the CUDA cache, dynamo's compiled code."""
    gc.collect()
    try:
        import torch  # here, not at the top: the guard saves its report even where torch cannot be imported
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - cleanup must not fail a part
        pass
