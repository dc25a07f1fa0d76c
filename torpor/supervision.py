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

Children are started by `spawn` and watched without a thread each: asyncio's own
subprocesses on Python 3.11 wait for every child in a thread of its own
(ThreadedChildWatcher), which ran out of threads at a few thousand replicas. `spawn` starts
the child with `subprocess.Popen` on the event loop's thread and learns of its exit from a
pidfd the loop polls with the other sockets (Linux ≥ 5.3); where there is no pidfd, one
`waitpid(WNOHANG)` per child every 0.1 s on the loop does it. Restarting a child that died
is the caller's decision: `next_restart` is the pure backoff table both Envoy and replicas
use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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


# -- children watched without a thread ------------------------------------------------------

#: Where there is no pidfd: how often the loop asks whether a child exited.
EXIT_POLL_INTERVAL = 0.1


class ChildProcess:
    """A child started by `spawn`: its pid (also its process group id: it leads a session
    of its own), its exit status once reaped, and `wait()`. The exit is noticed on the event
    loop (pidfd, else a poll), never in a thread; the child leaves the run file then."""

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self._loop = loop
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # not Linux, or a kernel older than 5.3
            loop.call_later(EXIT_POLL_INTERVAL, self._poll)
        else:
            loop.add_reader(self._pidfd, self._check)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; negative: killed by that signal (as asyncio reports it)."""
        return self._popen.returncode

    async def wait(self) -> int:
        """Its exit status, once it exited and was reaped."""
        return await asyncio.shield(self._exited)

    def signal_group(self, sig: signal.Signals) -> None:
        """`sig` to its whole process group (nothing if the group is gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _check(self) -> None:
        """The pidfd is readable: the child exited (reap it)."""
        code = self._popen.poll()
        if code is None:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._done(code)

    def _poll(self) -> None:
        code = self._popen.poll()
        if code is None:
            self._loop.call_later(EXIT_POLL_INTERVAL, self._poll)
        else:
            self._done(code)

    def _done(self, code: int) -> None:
        untrack(self.pid)
        if not self._exited.done():
            self._exited.set_result(code)


def spawn(argv: list[str], *, kind: str, name: str, stdout: IO[bytes] | int,
          env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> ChildProcess:
    """Start `argv` in a session of its own (so that a stop can signal its whole group),
    dying with torpor (`die_with_parent`), recorded in the run file, stdout and stderr to
    `stdout`. Call it on the event loop's thread: the parent-death signal follows the
    thread that forked, and the loop's lives as long as torpor. Raises OSError
    (FileNotFoundError for a command that cannot be found) when it cannot start."""
    loop = asyncio.get_running_loop()
    popen = subprocess.Popen(
        die_with_parent(argv, env, cwd), stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True,
    )
    track(kind, name, popen.pid)
    return ChildProcess(popen, loop)


def describe_exit(returncode: int) -> str:
    """'exit code 1' or 'signal SIGKILL', for a person."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


# -- restarting with backoff --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """How a supervised child that keeps dying is restarted: the n-th exit within `window`
    seconds waits `first_delay * 2**(n-1)`, at most `max_delay`; the `give_up_after`-th
    exit within the window is not restarted."""

    first_delay: float = 0.5
    max_delay: float = 30.0
    give_up_after: int = 5
    window: float = 120.0


def next_restart(policy: RestartPolicy, exits: Sequence[float], now: float) -> float | None:
    """Seconds to wait before restarting a child whose exits happened at `exits` (the
    latest last; same clock as `now`), or None: it died too often, give up. Pure."""
    recent = sum(1 for at in exits if now - at <= policy.window)
    if recent >= policy.give_up_after:
        return None
    delay: float = policy.first_delay * 2.0 ** max(0, recent - 1)
    return min(delay, policy.max_delay)


def log_tail(path: Path, lines: int = 10, max_bytes: int = 8192) -> list[str]:
    """The last `lines` lines of a log file (what a person reads first when a child
    died); [] when it cannot be read."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - max_bytes))
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]
