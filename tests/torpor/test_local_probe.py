"""Readiness probing of local replicas: what a probe finds, and when the next one runs."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from torpor.workloads.local import (
    FAST_LISTEN_WINDOW,
    LISTEN_POLL,
    LOADING_PROBE_SPEEDUP,
    Probe,
    _accepts,
    _probe,
    probe_delay,
)

INTERVAL = 0.2


@pytest.mark.parametrize(("found", "ready", "age", "delay"), [
    # Nothing listens yet, young replica: looked at every few ms (a wake waits for it).
    (Probe.REFUSED, False, 0.0, LISTEN_POLL),
    (Probe.REFUSED, False, FAST_LISTEN_WINDOW - 0.01, LISTEN_POLL),
    # A long load: back to the loading interval, torpor's CPU is not spent on it.
    (Probe.REFUSED, False, FAST_LISTEN_WINDOW, INTERVAL / LOADING_PROBE_SPEEDUP),
    # It listens but is not ready: never hammered faster than the loading interval.
    (Probe.NOT_READY, False, 0.0, INTERVAL / LOADING_PROBE_SPEEDUP),
    # Ready: the normal interval, whatever the probe found.
    (Probe.READY, True, 0.0, INTERVAL),
    (Probe.NOT_READY, True, 100.0, INTERVAL),
])
def test_probe_delay(found: Probe, ready: bool, age: float, delay: float) -> None:
    assert probe_delay(found, ready, age, INTERVAL) == delay


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on: bound for the test (so no one else takes it), never
    listening, so a connect is refused."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield int(holder.getsockname()[1])


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[int]]]:
    """An HTTP server whose /healthz answers the next status of a list (503 then 200)."""
    statuses = [503, 200]

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=statuses.pop(0) if len(statuses) > 1 else statuses[0])

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, statuses
    finally:
        await runner.cleanup()


async def test_probes_tell_refused_from_not_ready_from_ready(
    server: tuple[int, list[int]], closed_port: int,
) -> None:
    port, _ = server
    nobody = closed_port
    assert await _probe(nobody, "/healthz") is Probe.REFUSED
    assert await _accepts(nobody) is Probe.REFUSED
    assert await _probe(port, "/healthz") is Probe.NOT_READY  # 503 while loading
    assert await _probe(port, "/healthz") is Probe.READY
    assert await _accepts(port) is Probe.READY


def test_a_crash_problem_tells_the_last_exit_how_often_and_its_last_lines() -> None:
    from torpor.workloads.local import ReplicaExit, crash_looping, crash_problem

    assert crash_problem([], 0.0) is None
    one = [ReplicaExit(10.0, 3, ("loading weights", "RuntimeError: CUDA out of memory"))]
    assert crash_problem(one, 11.0) == (
        "a replica exited (exit code 3); its last log lines: loading weights | "
        "RuntimeError: CUDA out of memory")
    three = [ReplicaExit(at, -9, ()) for at in (0.0, 100.0, 110.0)] + [
        ReplicaExit(115.0, 3, ())]
    assert crash_problem(three, 120.0) == (
        "a replica exited (exit code 3, 4 times in the last 120 s)")
    assert crash_problem([ReplicaExit(0.0, -9, ())], 1.0) == "a replica exited (signal SIGKILL)"
    # Crash-looping: 3 exits since a wait began, not counting older ones.
    assert crash_looping(three, since=100.0)
    assert not crash_looping(three, since=105.0)
