"""Ports for local replicas, chosen outside the kernel's ephemeral port range.

Why: a port found free by binding port 0 and closing the socket can be taken before the
replica binds it, by any process on the machine that opens an outgoing connection or binds
port 0 (Envoy, etcd and the tests open thousands): the kernel hands out exactly those
ports. It never hands out a port outside `net.ipv4.ip_local_port_range`, so a port picked
there can only be lost to a program that asks for that very port. Owns the range (the
config's `workloads.ports`, else the ports just below the ephemeral range) and picking a
port in it; must not start anything.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from torpor.errors import WorkloadError

LOOPBACK = "127.0.0.1"
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: Linux's default, for systems that do not say (the file is Linux-only).
DEFAULT_EPHEMERAL = (32768, 60999)
#: How many ports the default range holds (fewer where the space below is smaller).
DEFAULT_SIZE = 10_000
#: The lowest port torpor takes for a replica (below are the privileged ports).
LOWEST = 1024
#: A default range smaller than this is refused: use workloads.ports.
MINIMUM_SIZE = 1000


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's range for ports it picks itself (bind to 0, outgoing connections)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return low, high


def default_range(ephemeral: tuple[int, int]) -> tuple[int, int]:
    """Up to DEFAULT_SIZE ports just below the ephemeral range, else just above it."""
    low, high = ephemeral
    if low - LOWEST >= MINIMUM_SIZE:
        return max(LOWEST, low - DEFAULT_SIZE), low - 1
    if 65535 - high >= MINIMUM_SIZE:
        return high + 1, min(65535, high + DEFAULT_SIZE)
    raise WorkloadError(
        f"the kernel's ephemeral port range {low}-{high} leaves no room for replica ports; "
        "set workloads.ports (e.g. 20000-29999) or narrow net.ipv4.ip_local_port_range")


class ReplicaPorts:
    """Hands out ports of `ports` (inclusive), each bindable on loopback when picked.

    Starts at a random place and goes round, so that two torpor processes on one machine
    rarely try the same port at the same moment (if they do, the replica that loses fails
    to bind, crashes and is restarted on another port)."""

    def __init__(self, ports: tuple[int, int] | None = None,
                 ephemeral: tuple[int, int] | None = None) -> None:
        self.range = ports or default_range(ephemeral or ephemeral_range())
        low, high = self.range
        self._next = random.randint(low, high)

    def overlaps(self, ephemeral: tuple[int, int]) -> bool:
        """Whether the range shares ports with the kernel's (a configured one may)."""
        return self.range[0] <= ephemeral[1] and ephemeral[0] <= self.range[1]

    def pick(self, in_use: set[int]) -> int:
        """A port of the range not in `in_use` (this process's replicas) and free now."""
        low, high = self.range
        for _ in range(high - low + 1):
            port = self._next
            self._next = low if port >= high else port + 1
            if port not in in_use and _bindable(port):
                return port
        raise WorkloadError(f"no free port left for a replica in workloads.ports {low}-{high}")


def _bindable(port: int) -> bool:
    """Whether a server could listen on the port now (SO_REUSEADDR, as servers set it: a
    port whose old connections linger in TIME_WAIT is free for them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True
