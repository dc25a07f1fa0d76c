"""Crash safety of `torpor up`: nothing it starts outlives it, and a restart cleans up
after a run that was killed.

Two mechanisms:

- Parent-death signal (Linux only). Every child `torpor up` starts (Envoy, local
  replicas) asks the kernel, between fork and exec, for SIGKILL when its parent dies
  (`prctl(PR_SET_PDEATHSIG)`, set by a small Python wrapper that then execs the command
  in place), so even a `kill -9` of torpor takes them along. The signal follows the
  *thread* that forked: children are started from the event loop's thread, which lives
  as long as `torpor up`. Only the direct child is covered: processes a replica starts
  itself are its own business. Elsewhere than Linux there is no such signal: a
  warning is logged once and children are started as before.
- A lock and a pidfile in the log folder (`Config.log_dir()`): `torpor-up.lock` is held
  (flock) for the life of `torpor up`, so a second `torpor up` on the same folder is
  refused (`AlreadyRunningError`); `torpor-up.pids` lists the pid and start time
  (/proc/<pid>/stat field 22, so a reused pid is never mistaken for ours) of torpor and
  of each child it runs now. A restart that finds the lock free stops every listed child
  that still runs (SIGTERM to its process group, SIGKILL after a grace), then starts.

`TORPOR_NO_PDEATHSIG=1` turns the parent-death signal off (tests use it to leave orphans
behind on purpose).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from torpor.errors import TorporError
from torpor.logs import event

logger = logging.getLogger(__name__)

LOCK_NAME = "torpor-up.lock"
PIDS_NAME = "torpor-up.pids"
#: The test-only switch that disables the parent-death signal.
NO_PDEATHSIG_ENV = "TORPOR_NO_PDEATHSIG"
#: How long a leftover gets after SIGTERM before SIGKILL.
LEFTOVER_GRACE = 5.0

_warned = False


class AlreadyRunningError(TorporError):
    """Another `torpor up` holds the lock of this log folder."""


#: Run by the child between torpor and the real command: ask for SIGKILL when the parent
#: dies (kept across exec), follow a parent already gone, then exec the command in place
#: (same pid). A wrapper rather than a `preexec_fn`: that would make Python fork() instead
#: of vfork, which runs gRPC's fork handlers in the child and broke Envoy's start.
_WRAPPER = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,int(signal.SIGKILL),0,0,0)\n"
    "if os.getppid()!=int(sys.argv[1]):os._exit(137)\n"
    "try:os.execvp(sys.argv[2],sys.argv[2:])\n"
    "except OSError as e:sys.stderr.write(f'torpor: cannot run {sys.argv[2]}: {e}\\n')"
    ";os._exit(127)\n"
)


def die_with_parent(argv: list[str], env: Mapping[str, str] | None = None,
                    cwd: str | Path | None = None) -> list[str]:
    """`argv` run so that the child receives SIGKILL when this process dies, even by
    SIGKILL (Linux); elsewhere, or with TORPOR_NO_PDEATHSIG=1, `argv` unchanged (a
    warning is logged once). Raises FileNotFoundError for a command that cannot be
    found, as starting it directly would."""
    global _warned
    _check_runnable(argv[0], env, cwd)
    if os.environ.get(NO_PDEATHSIG_ENV) == "1":
        return argv
    if not sys.platform.startswith("linux"):
        if not _warned:
            _warned = True
            event(logger, "supervision.no_pdeathsig", level=logging.WARNING,
                  platform=sys.platform, hint="children of a killed torpor keep running; "
                  "the next `torpor up` stops them")
        return argv
    return [sys.executable, "-I", "-S", "-c", _WRAPPER, str(os.getpid()), *argv]


def _check_runnable(command: str, env: Mapping[str, str] | None,
                    cwd: str | Path | None) -> None:
    if os.sep in command:
        path = Path(command) if Path(command).is_absolute() else Path(cwd or ".") / command
        found = path.is_file() and os.access(path, os.X_OK)
    else:
        search = (env if env is not None else os.environ).get("PATH", os.defpath)
        found = shutil.which(command, path=search) is not None
    if not found:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)


def start_time(pid: int) -> int | None:
    """/proc/<pid>/stat field 22 (start time in clock ticks since boot); None when the
    process is gone, a zombie, or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # fields from 3 (state) on
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _pgid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[2])


@dataclasses.dataclass(frozen=True)
class Child:
    kind: str  # "envoy" or "replica"
    name: str
    pid: int
    start: int | None


class RunFile:
    """The lock and pidfile of one `torpor up`; `track`/`untrack` keep the pidfile up to
    date (written whole, atomically, on every change)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lock_path = folder / LOCK_NAME
        self.pids_path = folder / PIDS_NAME
        self._lock: IO[bytes] | None = None
        self._children: dict[int, Child] = {}

    def acquire(self) -> list[Child]:
        """Take the lock (AlreadyRunningError if another `torpor up` holds it); returns
        the children the previous run listed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self.lock_path.open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            previous = self._read().get("up", {})
            raise AlreadyRunningError(
                f"torpor up is already running with the log folder {self.folder} "
                f"(pid {previous.get('pid', '?')}); stop it first"
            ) from None
        self._lock = lock
        previous_children = [Child(c["kind"], c["name"], int(c["pid"]), c.get("start"))
                             for c in self._read().get("children", [])]
        self._write()
        return previous_children

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.pids_path.unlink()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def track(self, kind: str, name: str, pid: int) -> None:
        self._children[pid] = Child(kind, name, pid, start_time(pid))
        self._write()

    def untrack(self, pid: int) -> None:
        if self._children.pop(pid, None) is not None:
            self._write()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.pids_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self) -> None:
        data = {"up": {"pid": os.getpid(), "start": start_time(os.getpid())},
                "children": [dataclasses.asdict(c) for c in self._children.values()]}
        tmp = self.pids_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data))
            tmp.replace(self.pids_path)
        except OSError as exc:
            event(logger, "supervision.pidfile_failed", level=logging.WARNING,
                  path=str(self.pids_path), error=str(exc))


_current: RunFile | None = None


def set_current(run_file: RunFile | None) -> None:
    """The run file children are recorded in (`torpor up` only; None: not recorded)."""
    global _current
    _current = run_file


def track(kind: str, name: str, pid: int) -> None:
    if _current is not None:
        _current.track(kind, name, pid)


def untrack(pid: int) -> None:
    if _current is not None:
        _current.untrack(pid)


def _ours(child: Child) -> bool:
    return child.start is not None and start_time(child.pid) == child.start


def _signal(child: Child, sig: signal.Signals) -> None:
    """Its whole process group when it leads one (Envoy and replicas start sessions)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if _pgid(child.pid) == child.pid:
            os.killpg(child.pid, sig)
        else:
            os.kill(child.pid, sig)


def stop_leftovers(children: list[Child], report: Callable[[str], None],
                   grace: float = LEFTOVER_GRACE) -> list[Child]:
    """Stop the children a previous run left running (only those whose pid still has
    the recorded start time): SIGTERM, SIGKILL after `grace`. Returns those stopped."""
    left = [c for c in children if _ours(c)]
    for child in left:
        report(f"stopping {child.kind} {child.name} (pid {child.pid}) left running by a "
               "previous torpor up")
        event(logger, "supervision.leftover_stopping", kind=child.kind, service=child.name,
              pid=child.pid)
        _signal(child, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_ours(c) for c in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    for child in left:
        killed = _ours(child)
        if killed:
            _signal(child, signal.SIGKILL)
        event(logger, "supervision.leftover_stopped", kind=child.kind, service=child.name,
              pid=child.pid, killed=killed)
    deadline = time.monotonic() + 2.0
    while any(_ours(c) for c in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
