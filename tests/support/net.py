"""Loopback helpers for tests: ports reserved for the test run, and waiting with deadlines.

Why ports are reserved, not "found free"
----------------------------------------
Tests start real servers (Envoy, etcd, torpor, backends) whose ports must be known before
they bind: they are written into config files and bootstraps. The old way, bind port 0,
read the port, close the socket and hand the number on, races: until the server binds it,
that port is an ordinary ephemeral port again, and the kernel hands it to whichever socket
on the machine asks next (any outgoing connection, any bind to port 0), which made a server
fail with "Address already in use".

The rule: every server a test starts either binds port 0 itself and reports the port it
got, or listens on a port from `free_port()`, which comes from a block of ports that this
test run holds for its whole life, OUTSIDE the kernel's ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range). The kernel never picks a port outside that range
for bind(0) or for the local end of a connection, so only a process that asks for that very
port by number can take it, and other test runs do not, because:

* Blocks are aligned runs of `BLOCK_SIZE` ports (10000-10999, 11000-11999, ...). A process
  holds a block with an exclusive, non-blocking `flock` on `<lock dir>/<first>-<last>.lock`
  (`LOCK_DIR`, machine-wide) until it exits; a block another test run (or pytest process)
  holds is skipped. Blocks below the ephemeral range come first (from `LOWEST_PORT` up), then
  those above it, then 1024-9999 as a last resort.
* Within the process every port is handed out once (in increasing order within a block),
  and a port that a bind test on 127.0.0.1 shows in use (some other program asked for it
  by number) is skipped. When a block runs out, the next free block is taken.
* A forked child starts a reservation of its own (it must not hand out its parent's ports).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

#: Where the kernel reads the range it picks ephemeral ports from ("low<TAB>high").
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: Assumed when EPHEMERAL_RANGE_FILE cannot be read (not Linux): Linux's default low bound
#: and the IANA high bound, which covers both Linux's and the BSDs' defaults.
FALLBACK_EPHEMERAL_RANGE = (32768, 65535)
#: Ports per block. A constant (not a parameter): every run must cut the same blocks, so
#: that one lock file stands for the same ports in every process.
BLOCK_SIZE = 1000
#: The lowest port of the preferred blocks (below the ephemeral range); 1024-9999 holds many
#: well-known services' ports, so it is only used when nothing else is left.
LOWEST_PORT = 10000
#: Machine-wide (/tmp rather than $TMPDIR, so that runs with different TMPDIRs still see
#: each other's locks).
LOCK_DIR = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / "torpor-test-ports"
LOOPBACK = "127.0.0.1"


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (low, high), both inclusive."""
    try:
        low, high = (int(x) for x in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return FALLBACK_EPHEMERAL_RANGE
    return low, high


def _candidate_blocks(ephemeral: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(first, last, usable_first, usable_last) of every block with ports outside the
    ephemeral range, in order of preference. first-last is the aligned block (it names the
    lock file); usable_first-usable_last the part of it outside the ephemeral range."""
    low, high = ephemeral
    regions = [(LOWEST_PORT, low - 1), (high + 1, 65535), (1024, min(LOWEST_PORT - 1, low - 1))]
    blocks = []
    for start, end in regions:
        if start > end:
            continue
        first = start - start % BLOCK_SIZE
        while first <= end:
            last = first + BLOCK_SIZE - 1
            usable = (max(first, start), min(last, end))
            if usable[0] <= usable[1]:
                blocks.append((first, last, *usable))
            first += BLOCK_SIZE
    return blocks


def _in_use(port: int) -> bool:
    """A bind on 127.0.0.1 fails: something else holds the port (a listener, a socket bound
    to it, or a connection still in TIME_WAIT there: no SO_REUSEADDR on purpose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


class PortReservation:
    """Ports for this process, from blocks it holds (by flock) outside the ephemeral range.

    `ephemeral` overrides the range read from /proc (for tests of this class)."""

    def __init__(self, ephemeral: tuple[int, int] | None = None) -> None:
        self.ephemeral = ephemeral or ephemeral_port_range()
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fds: list[int] = []
        #: (first, last) usable ports of every block held, oldest first.
        self.blocks: list[tuple[int, int]] = []
        self._tried: set[int] = set()  # first ports of blocks looked at (held or busy)
        self._next = 0
        self._end = -1
        self._closed = False

    def next_port(self) -> int:
        """A port no one else has from this reservation, and free on 127.0.0.1 right now."""
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: its copy of our state would repeat the parent's ports.
                # Forget the parent's lock fds (closing ours would not release the lock
                # the parent still holds through its own fd) and take a block of our own.
                self._reset()
            if self._closed:
                raise RuntimeError("this port reservation is closed")
            while True:
                while self._next <= self._end:
                    port = self._next
                    self._next += 1
                    if not _in_use(port):
                        return port
                self._take_block()

    def _take_block(self) -> None:
        candidates = _candidate_blocks(self.ephemeral)
        low, high = self.ephemeral
        if not candidates:
            raise RuntimeError(
                f"the kernel's ephemeral port range {low}-{high} ({EPHEMERAL_RANGE_FILE}) "
                "leaves no ports outside it for test servers: narrow it, e.g. "
                "`sysctl -w net.ipv4.ip_local_port_range='32768 60999'`"
            )
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # shared by every user's runs: like /tmp
            os.chmod(LOCK_DIR, 0o1777)
        unopenable = []
        for first, last, usable_first, usable_last in candidates:
            if first in self._tried:
                continue
            self._tried.add(first)
            path = LOCK_DIR / f"{first}-{last}.lock"
            try:
                # Read-only is enough for flock, and works on another user's lock file.
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                unopenable.append(str(path))
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    continue  # another test run holds this block
                raise
            self._fds.append(fd)
            self.blocks.append((usable_first, usable_last))
            self._next, self._end = usable_first, usable_last
            return
        raise RuntimeError(
            f"no block of test ports left outside the ephemeral range {low}-{high}: "
            f"this process holds {self.blocks}, other test runs hold the rest (lock files "
            f"in {LOCK_DIR})" + (f"; cannot open {unopenable}" if unopenable else "")
        )

    def close(self) -> None:
        """Release every block; no more ports after this (for tests of this module: the
        run's own reservation is held until the process exits)."""
        with self._lock:
            if self._pid == os.getpid():
                for fd in self._fds:
                    os.close(fd)
            self._fds = []
            self._closed = True


_reservation: PortReservation | None = None
_reservation_lock = threading.Lock()


def reservation() -> PortReservation:
    """This process's reservation, made on first use; its blocks are held until exit."""
    global _reservation
    with _reservation_lock:
        if _reservation is None:
            _reservation = PortReservation()
        return _reservation


def free_port() -> int:
    """A port reserved for this test run, outside the ephemeral range: free on 127.0.0.1
    now, handed out once per run, and no other test run's and never the kernel's choice for
    bind(0) or a connection. For every server a test must name the port of before it binds
    (see the module docstring)."""
    return reservation().next_port()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.02,
) -> None:
    """Poll `predicate` until it is true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
