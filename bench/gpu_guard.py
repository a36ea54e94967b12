"""The GPU check's guard: every part and item runs guarded (an error is recorded and the check goes on), nothing
starts past the time budget, a part that outlives its own limit is interrupted, an alarm (or SIGTERM) interrupts
whatever runs at the hard limit, and the report is saved before and after each part and item, so that a run killed
outright still names, in gpu_check.json, the part and item it was in and when they started.

A hang inside C code (a CUDA synchronize that never returns) cannot be interrupted from Python: there the shell's
`timeout` kills the process, and `gpu_check.py --finalize` marks what was running as killed.
"""
import gc
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from gpu_report import LABELS, SCHEMA, error_trace, short_error, write_report

OUT_OF_TIME = "skipped: time budget"
PART_OUT_OF_TIME = "skipped: the part's time limit"
RUNNING = "running"


class BudgetExceeded(BaseException):
    """Raised at the hard time limit (the alarm, or SIGTERM from the shell's `timeout`): a BaseException, so no
    library's `except Exception` eats it."""


class PartLimitExceeded(BaseException):
    """Raised when a part outlives its own limit (Check.part's limit_s)."""


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
        self.part_deadline = None  # seconds after t0 at which the running part is interrupted
        self.device = None  # "cuda", or "cpu" in a dry run; set by gpu_env.environment()
        self.gpu_key = None
        self.report = {
            "schema": SCHEMA, "started": now(), "datetime": now(), "finished": None, "complete": False,
            "gpu_ran": False, "dry_run": self.dry, "t0_epoch": self.t0,
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
        """Interrupt whatever runs at the hard limit or the running part's limit, and on SIGTERM (the shell's
        `timeout` sends it a few seconds before it kills)."""
        if not hasattr(signal, "setitimer"):
            return

        def on_alarm(signum, frame):
            if self.elapsed() >= self.args.limit - 0.05:
                self.interrupted = True
                raise BudgetExceeded(f"hard time limit: {self.args.limit:.0f} s after the start")
            if self.part_deadline is not None and self.elapsed() >= self.part_deadline - 0.05:
                self.part_deadline = None
                self._set_timer()
                raise PartLimitExceeded("the part's time limit")
            self._set_timer()  # a timer left from a part that has ended: wait for the next deadline

        def on_term(signum, frame):
            self.interrupted = True
            raise BudgetExceeded(f"terminated by signal {signal.Signals(signum).name} "
                                 f"{self.elapsed():.0f} s after the start")
        signal.signal(signal.SIGALRM, on_alarm)
        signal.signal(signal.SIGTERM, on_term)
        self._set_timer()

    def _set_timer(self):
        deadline = min(self.args.limit, self.part_deadline if self.part_deadline is not None else float("inf"))
        signal.setitimer(signal.ITIMER_REAL, max(deadline - self.elapsed(), 0.01))

    def disarm_alarm(self):
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def log(self, message: str):
        print(f"[gpu_check {self.elapsed():6.1f}s] {message}", flush=True)

    # reporting
    def save(self):
        self.report["elapsed_s"] = round(self.elapsed(), 2)
        write_report(self.out, self.report)

    def part(self, name: str, fn, limit_s: float | None = None):
        """Run part `name` (fn(check, part)) guarded, interrupted after limit_s seconds; fn may set part["status"]
        itself (a skip). The part is saved as running, with its start, before fn runs."""
        part = {"label": LABELS.get(name, name), "status": RUNNING, "started_s": round(self.elapsed(), 2),
                "limit_s": limit_s, "seconds": None, "notes": [], "items": [], "rows": []}
        self.report["parts"][name] = part
        if self.past_budget():
            part["status"] = OUT_OF_TIME
            self.log(f"{name}: {OUT_OF_TIME}")
            self.save()
            return
        self.log(f"{name}: start" + (f" (limit {limit_s:.0f} s)" if limit_s else ""))
        self.save()
        start = time.time()
        try:
            if limit_s and hasattr(signal, "setitimer"):
                self.part_deadline = self.elapsed() + limit_s
                self._set_timer()
            fn(self, part)
        except PartLimitExceeded:
            part["status"] = part["error"] = f"error: interrupted at the part's limit of {limit_s:.0f} s"
        except BudgetExceeded as e:
            part["status"], part["error"] = "error: interrupted at the time limit", short_error(e)
        except Exception as e:  # noqa: BLE001 - a failing part records its error and the check goes on
            part["status"], part["error"], part["traceback"] = "error", short_error(e), error_trace(e)
            self.log(f"{name}: error {short_error(e)}")
        finally:
            self.part_deadline = None
            self.free(part)
        part["seconds"] = round(time.time() - start, 2)
        if part["status"] == RUNNING:  # from its items: skips for a stated reason (no diffusers) are fine
            states = [i["status"] for i in part["items"]]
            bad = [s for s in states if s.startswith("error") or s in (OUT_OF_TIME, PART_OUT_OF_TIME)]
            part["status"] = "ok" if states and not bad and "ok" in states else \
                "partial" if "ok" in states else \
                (states[0] if states and len(set(states)) == 1 else "failed")
        self.log(f"{name}: {part['status']} ({part['seconds']} s)")
        self.save()

    def item(self, part: dict, name: str, fn, skip: str | None = None):
        """Run one measurement fn() -> its result (or None) guarded; returns the result, or None. The item is
        saved as running, with its start, before fn runs. At the part's limit the item records it and the
        interruption goes on to end the part."""
        entry = {"name": name, "status": RUNNING, "started_s": round(self.elapsed(), 2), "seconds": None}
        part["items"].append(entry)
        if skip is None and self.past_budget():
            skip = OUT_OF_TIME
        if skip is not None:
            entry["status"] = skip
            return None
        self.save()
        start = time.time()
        result = None
        try:
            result = fn()
            entry["status"] = "ok"
        except PartLimitExceeded:
            entry["status"] = "error: interrupted at the part's time limit"
            entry["seconds"] = round(time.time() - start, 2)
            raise
        except BudgetExceeded as e:
            entry["status"], entry["error"] = "error: interrupted at the time limit", short_error(e)
        except Exception as e:  # noqa: BLE001
            entry["status"], entry["error"], entry["traceback"] = "error", short_error(e), error_trace(e)
            self.log(f"  {name}: error {short_error(e)}")
        finally:
            if entry["status"] != RUNNING:
                self.free(entry)
        entry["seconds"] = round(time.time() - start, 2)
        if entry["status"] == "ok":
            self.log(f"  {name}: ok ({entry['seconds']} s)")
        self.save()
        return result

    def free(self, entry: dict):
        """_free, and if a limit strikes meanwhile, say so in the part or item just finished."""
        try:
            _free()
        except (BudgetExceeded, PartLimitExceeded) as e:
            if entry["status"] in (RUNNING, "ok"):
                entry["status"], entry["error"] = "error: interrupted at the time limit", short_error(e)


def finalize(report: dict, note: str) -> dict:
    """After the process was killed: the report marked incomplete with `note`, and what was running marked
    "error: killed" with the seconds it ran until now."""
    report["complete"] = False
    report["notes"].append(note)
    elapsed = time.time() - report.get("t0_epoch", time.time())
    report["elapsed_s"] = round(elapsed, 2)
    for part in report["parts"].values():
        for entry in [part, *part.get("items", [])]:
            if entry.get("status") == RUNNING:
                entry["status"] = "error: killed"
                entry["seconds"] = round(elapsed - entry.get("started_s", elapsed), 2)
    return report


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
