"""How every `python -m pixart_fast.*` command ends: a mistake the user can fix is one clear message and exit 2.

A command's `main` raises `UserError` (or a subclass: `CheckpointDamaged`, `CheckpointMismatch`, `FeatureError`;
or `FileNotFoundError`, which names the path) and `run(main)` prints it as `error: ...` with no traceback. `PIXART_DEBUG=1` in the environment, or `--debug` on the command line, shows the traceback.
"""
import os
import sys
from typing import Callable


class UserError(ValueError):
    """A mistake the user can fix: the message names the offending value and what to do instead."""


# What is the user's to fix: UserError (the checkpoint errors among its subclasses) and a path that is not there
# or not readable.
USER_ERRORS = (UserError, FileNotFoundError, IsADirectoryError, PermissionError)


def debugging(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("PIXART_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """main(argv) with user errors printed on one line (exit 2) and the traceback kept for --debug.
    A full disk is reported as such, whatever library noticed it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into the user's and the program's below
        if debug:
            raise
        if _disk_full(e):
            print(f"error: no space left on the device ({_first_line(e)}); free some space or pass another "
                  "--out, then run the same command again", file=sys.stderr)
            return 2
        if isinstance(e, USER_ERRORS):
            print(f"error: {_first_line(e) if not isinstance(e, UserError) else e}", file=sys.stderr)
            return 2
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _disk_full(e: BaseException) -> bool:
    import errno
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "file write failed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
