"""The run-wide port reservation (tests/support/net.py): ports outside the kernel's
ephemeral range, each handed out once, bindable, and a block of its own per process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import net
from tests.support.net import PortReservation, ephemeral_port_range, free_port

REPO = Path(__file__).resolve().parent.parent
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")

pytestmark = pytest.mark.skipif(not RANGE_FILE.exists(), reason="needs Linux's /proc")


def kernel_range() -> tuple[int, int]:
    low, high = RANGE_FILE.read_text().split()
    return int(low), int(high)


def outside_ephemeral(port: int) -> bool:
    low, high = kernel_range()
    return 1024 <= port <= 65535 and not low <= port <= high


def disjoint(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return all(last1 < first2 or last2 < first1
               for first1, last1 in a for first2, last2 in b)


def test_the_ephemeral_range_is_read_from_proc() -> None:
    assert ephemeral_port_range() == kernel_range()


def test_free_ports_are_outside_the_ephemeral_range_unique_and_bindable() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(outside_ephemeral(p) for p in ports), ports
    held = net.reservation().blocks
    assert all(any(first <= p <= last for first, last in held) for p in ports)
    sockets = []
    try:
        for port in ports:  # a server can bind and listen on every one of them
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        for sock in sockets:
            sock.close()


def test_a_reservation_hands_out_each_port_once_across_blocks() -> None:
    reservation = PortReservation()
    try:
        ports = [reservation.next_port() for _ in range(net.BLOCK_SIZE + 10)]
    finally:
        reservation.close()
    assert len(set(ports)) == len(ports)
    assert all(outside_ephemeral(p) for p in ports)
    assert len(reservation.blocks) >= 2  # more than a block's worth: it took another
    assert all(any(first <= p <= last for first, last in reservation.blocks) for p in ports)
    free_port()  # the run's own reservation holds a block...
    assert disjoint(reservation.blocks, net.reservation().blocks)  # ...not one of these


def test_a_port_in_use_is_skipped() -> None:
    reservation = PortReservation()
    try:
        first = reservation.next_port()
        with socket.socket() as taken:
            try:
                taken.bind(("127.0.0.1", first + 1))
                taken.listen()
            except OSError:
                pass  # already in use by something else: skipped all the same
            second = reservation.next_port()
        assert second > first
        assert second != first + 1
    finally:
        reservation.close()
    with pytest.raises(RuntimeError, match="closed"):
        reservation.next_port()


def test_no_room_outside_the_ephemeral_range_is_a_clear_error() -> None:
    reservation = PortReservation(ephemeral=(1024, 65535))
    with pytest.raises(RuntimeError, match=r"range 1024-65535 .* leaves no ports outside it"):
        reservation.next_port()


CHILD = """
import json
from tests.support import net
ports = [net.free_port() for _ in range(5)]
print(json.dumps({"ports": ports, "blocks": net.reservation().blocks}))
"""


def test_another_process_gets_a_disjoint_block() -> None:
    mine = free_port()  # this process holds its block (flock) from here to its exit
    held = list(net.reservation().blocks)
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout)
    blocks = [tuple(b) for b in child["blocks"]]
    assert blocks and disjoint(blocks, held), (blocks, held)
    assert mine not in child["ports"]
    assert all(outside_ephemeral(p) for p in child["ports"])
    assert all(any(first <= p <= last for first, last in held) for p in [mine])
