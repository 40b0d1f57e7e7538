"""An output folder that never mixes runs and is never left half-written.

:func:`staged` wraps a command's ``run(args)``: the run writes into a
temporary folder beside ``--out`` (``args.staged_out``), which replaces
``--out`` only when the run has finished. So

- an interrupted or failed run leaves the previous outputs whole (and the CLI
  says so in one line); the temporary folder is deleted, or, after a hard
  kill, by the next run (its name holds the owner's PID);
- a re-run with other options replaces the whole folder: no stale part of an
  earlier run (a ``neurons/`` folder, say) is left beside the new files;
- a lock file beside ``--out`` refuses a second run into the same folder while
  the first is running;
- a folder holding files that no run wrote is refused, never replaced.

Each finished folder holds ``.sfc-run.json``: the command line and the files the run wrote.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".sfc-run.json"
# What `sfc discover` wrote before runs were marked, so such folders can be replaced too.
LEGACY_OUTPUTS = {"circuit.json", "metrics.json", "effects.npz", "circuit.html", "neurons"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(out: Path) -> Path:
    return out.absolute().parent / f".{out.name}.lock"


@contextmanager
def locked(out: Path, command: str = "discover") -> Iterator[None]:
    """Hold ``.<out>.lock`` beside ``out`` (holding this PID) while the block runs.

    A lock held by a running process refuses with one sentence; one left by a
    process that no longer exists is taken over.
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = -1
            if pid > 0 and pid != os.getpid() and _alive(pid):
                raise ValueError(f"another sfc {command} (process {pid}) is writing into --out {out}: wait for it "
                                 f"to finish or choose another --out (if it is gone, delete {path}).") from None
            path.unlink(missing_ok=True)  # left by a run that no longer exists
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        break
    else:
        raise ValueError(f"could not lock --out {out}: delete {path} and retry.")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def check_replaceable(out: Path) -> None:
    """``out`` is new, empty, or a previous run's outputs (and nothing else)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder: choose another path.")
    present = {p.name for p in out.iterdir()}
    if not present:
        return
    known = set(LEGACY_OUTPUTS) | {MARKER}
    if (out / MARKER).exists():
        try:
            known |= set(json.loads((out / MARKER).read_text()).get("files", []))
        except (OSError, ValueError, AttributeError):
            pass
    elif not present & LEGACY_OUTPUTS:
        raise ValueError(f"--out {out} is a folder of other files ({', '.join(sorted(present)[:3])}...): "
                         "give a new or empty folder, so that nothing in it is replaced.")
    foreign = sorted(present - known)
    if foreign:
        raise ValueError(f"--out {out} holds files that no sfc run wrote ({', '.join(foreign[:3])}): move them "
                         "away or give a new folder, so that nothing in it is replaced.")


def staged(run: Callable, command: str = "discover") -> Callable:
    """``run(args)`` writing into ``args.staged_out``, a temporary folder that replaces ``args.out``
    when ``run`` returns 0 (see the module docstring)."""

    @functools.wraps(run)
    def wrapper(args) -> int:
        from attribution.cache import atomic_dir, atomic_write_text
        from sfc.cli.checks import check_writable

        out = Path(args.out)
        check_writable(out, "--out")
        check_writable(out.absolute().parent, "--out")  # the temporary folder goes beside it
        check_replaceable(out)
        had = out.exists() and any(out.iterdir())
        args.interrupt_note = (f"--out {out} was left as it was: the previous run's outputs are whole."
                               if had else f"nothing was written to --out {out}.")
        try:
            with locked(out, command):
                _remove_stale(out)
                with atomic_dir(out) as tmp:
                    args.staged_out = str(tmp)
                    rc = int(run(args) or 0)
                    if rc != 0:
                        raise _Failed(rc)
                    files = sorted(p.name for p in tmp.iterdir())
                    atomic_write_text(tmp / MARKER, json.dumps(
                        {"command": ["sfc", command, *_argv_tail(command)],
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}, indent=2) + "\n")
        except _Failed as failed:
            return failed.rc
        if had:
            print(f"[sfc] replaced the previous outputs in {out}.", file=sys.stderr)
        return rc

    return wrapper


def _argv_tail(command: str) -> list[str]:
    """The flags after ``command`` on this process's command line (``[]`` if it is not there)."""
    argv = sys.argv[1:]
    return argv[argv.index(command) + 1:] if command in argv else []


def _remove_stale(out: Path) -> None:
    """Delete temporary folders of earlier runs into ``out`` whose process is gone (a hard kill).
    Only this folder's own ``.<name>.pid<N>.*.tmp`` siblings are touched."""
    import shutil

    for p in out.absolute().parent.glob(f".{out.name}.pid*.tmp"):
        try:
            pid = int(p.name[len(out.name) + 5:].split(".")[0])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


class _Failed(Exception):
    """A run that returned a non-zero code: its outputs are discarded."""

    def __init__(self, rc: int) -> None:
        super().__init__(rc)
        self.rc = rc
