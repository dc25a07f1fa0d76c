"""LocalWorkloads with real processes: tests/torpor/tiny_server.py on loopback ports.

Every test stops what it started (the fixture closes the workloads even on failure), and
waits on conditions with deadlines rather than fixed sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from torpor.config import LocalServiceConfig, ServiceConfig
from torpor.errors import UnknownServiceError, WorkloadError
from torpor.model import Endpoint
from torpor.workloads.local import LocalWorkloads

TINY_SERVER = str(Path(__file__).with_name("tiny_server.py"))
WAIT = 15.0  # generous: a loaded CI machine starts Python slowly

MakeWorkloads = Callable[..., LocalWorkloads]
Seen = list[tuple[str, tuple[Endpoint, ...]]]


def tiny(name: str = "tiny", *flags: str, stop_grace: float = 5.0) -> ServiceConfig:
    """A service running tiny_server; "python" is replaced by torpor's own interpreter."""
    command = ("python", TINY_SERVER, "--port", "{port}", *flags)
    local = LocalServiceConfig(command=command, ready_path="/healthz", stop_grace=stop_grace)
    return ServiceConfig(name=name, host=f"{name}.localhost", local=local)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[MakeWorkloads]:
    created: list[LocalWorkloads] = []

    def factory(*services: ServiceConfig) -> LocalWorkloads:
        workloads = LocalWorkloads(
            services,
            str(tmp_path / "logs"),
            probe_interval=0.05,
            restart_backoff=(0.1, 1.0),
        )
        created.append(workloads)
        return workloads

    try:
        yield factory
    finally:
        for workloads in created:
            await workloads.close()


def listen(workloads: LocalWorkloads) -> Seen:
    seen: Seen = []
    workloads.add_listener(lambda name, endpoints: seen.append((name, endpoints)))
    return seen


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def assert_gone(pid: int) -> None:
    """A process we started and reaped no longer exists."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def gone_or_zombie(pid: int) -> bool:
    """For a grandchild: once orphaned, only PID 1 can reap it, and in some containers
    PID 1 never does; a zombie no longer runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


async def test_scale_up_gives_ready_endpoints_and_tells_listeners(
    make: MakeWorkloads, tmp_path: Path
) -> None:
    workloads = make(tiny())
    seen = listen(workloads)
    await workloads.start()

    await workloads.scale("tiny", 2)
    assert workloads.desired_replicas("tiny") == 2
    assert workloads.running_replicas("tiny") == 2

    ready = await workloads.wait_ready("tiny", 2, timeout=WAIT)
    assert len(ready) == 2
    assert all(e.host == "127.0.0.1" for e in ready)
    assert ready == tuple(sorted(ready)) == workloads.ready_endpoints("tiny")
    assert seen[-1] == ("tiny", ready)
    assert all(a != b for a, b in itertools.pairwise(seen)), "a call without a change"
    for endpoint in ready:
        assert (tmp_path / "logs" / f"tiny-{endpoint.port}.log").exists()


async def test_scale_down_stops_the_newest_replica(
    make: MakeWorkloads, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    workloads = make(tiny())
    seen = listen(workloads)
    await workloads.scale("tiny", 2)
    await workloads.wait_ready("tiny", 2, timeout=WAIT)
    oldest, newest = workloads.pids("tiny")

    await workloads.scale("tiny", 1)

    assert_gone(newest)
    assert workloads.pids("tiny") == [oldest]
    assert workloads.running_replicas("tiny") == 1
    assert workloads.desired_replicas("tiny") == 1
    assert len(workloads.ready_endpoints("tiny")) == 1
    assert seen[-1] == ("tiny", workloads.ready_endpoints("tiny"))
    (stopped,) = events(caplog, "replica.stopped")
    assert stopped.service == "tiny"  # type: ignore[attr-defined]
    assert stopped.killed is False  # type: ignore[attr-defined]  # SIGTERM was enough


async def test_killed_replica_is_restarted_with_growing_backoff(
    make: MakeWorkloads, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    workloads = make(tiny())
    seen = listen(workloads)
    await workloads.scale("tiny", 1)
    await workloads.wait_ready("tiny", 1, timeout=WAIT)

    for _ in range(2):
        (pid,) = workloads.pids("tiny")
        seen.clear()
        os.kill(pid, signal.SIGKILL)

        def replaced(old: int = pid) -> bool:
            pids = workloads.pids("tiny")
            return pids not in ([], [old]) and len(workloads.ready_endpoints("tiny")) == 1

        await eventually(replaced, "a new ready replica")
        assert_gone(pid)
        assert ("tiny", ()) in seen  # it left the ready set before coming back
        assert workloads.running_replicas("tiny") == 1

    exited = events(caplog, "replica.exited")
    assert [r.returncode for r in exited] == [-signal.SIGKILL] * 2  # type: ignore[attr-defined]
    assert [r.restart_in for r in exited] == [0.1, 0.2]  # type: ignore[attr-defined]
    assert all(r.service == "tiny" and r.port for r in exited)  # type: ignore[attr-defined]


async def test_replica_ignoring_sigterm_is_killed_after_the_grace(
    make: MakeWorkloads, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    workloads = make(tiny("stubborn", "--ignore-sigterm", stop_grace=0.5))
    await workloads.scale("stubborn", 1)
    await workloads.wait_ready("stubborn", 1, timeout=WAIT)
    (pid,) = workloads.pids("stubborn")

    started = time.monotonic()
    await workloads.scale("stubborn", 0)
    elapsed = time.monotonic() - started

    assert 0.5 <= elapsed < 5.0
    assert_gone(pid)
    assert workloads.running_replicas("stubborn") == 0
    assert workloads.ready_endpoints("stubborn") == ()
    (stopped,) = events(caplog, "replica.stopped")
    assert stopped.killed is True  # type: ignore[attr-defined]
    assert stopped.returncode == -signal.SIGKILL  # type: ignore[attr-defined]


async def test_cancelled_scale_down_still_stops_the_replica(make: MakeWorkloads) -> None:
    workloads = make(tiny("stubborn", "--ignore-sigterm", stop_grace=0.5))
    await workloads.scale("stubborn", 1)
    await workloads.wait_ready("stubborn", 1, timeout=WAIT)
    (pid,) = workloads.pids("stubborn")

    scaling = asyncio.create_task(workloads.scale("stubborn", 0))
    await eventually(lambda: workloads.ready_endpoints("stubborn") == (), "the replica leaving")
    scaling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await scaling

    await eventually(lambda: workloads.running_replicas("stubborn") == 0, "the SIGKILL")
    assert_gone(pid)


async def test_close_leaves_no_process_behind(make: MakeWorkloads, tmp_path: Path) -> None:
    child_pid_file = str(tmp_path / "child-{port}.pid")
    workloads = make(
        tiny("plain"),
        tiny("parent", "--child-pid-file", child_pid_file),
        tiny("stubborn", "--ignore-sigterm", stop_grace=0.5),
    )
    await workloads.scale("plain", 2)
    await workloads.scale("parent", 1)
    await workloads.scale("stubborn", 2)
    for name, count in (("plain", 2), ("parent", 1), ("stubborn", 2)):
        await workloads.wait_ready(name, count, timeout=WAIT)
    pids = [pid for name in ("plain", "parent", "stubborn") for pid in workloads.pids(name)]
    (parent_endpoint,) = workloads.ready_endpoints("parent")
    child_pid = int((tmp_path / f"child-{parent_endpoint.port}.pid").read_text())

    started = time.monotonic()
    await workloads.close()

    assert time.monotonic() - started < 0.5 * 2 + 3.0, "replicas were stopped one by one"
    for pid in pids:
        assert_gone(pid)
    assert gone_or_zombie(child_pid), "a child in the replica's process group survived"
    for name in ("plain", "parent", "stubborn"):
        assert workloads.running_replicas(name) == 0
        assert workloads.ready_endpoints(name) == ()
    with pytest.raises(WorkloadError, match="closed"):
        await workloads.scale("plain", 1)
    with pytest.raises(WorkloadError, match="closed"):
        await workloads.wait_ready("plain", 1, timeout=1.0)


async def test_wait_ready_times_out(make: MakeWorkloads) -> None:
    workloads = make(tiny("slow", "--delay", "60"))
    await workloads.scale("slow", 1)

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="slow"):
        await workloads.wait_ready("slow", 1, timeout=0.3)

    assert time.monotonic() - started < 3.0
    assert workloads.running_replicas("slow") == 1  # running, just not ready
    assert workloads.ready_endpoints("slow") == ()


async def test_waiter_wakes_when_replicas_become_ready(make: MakeWorkloads) -> None:
    workloads = make(tiny())
    waiter = asyncio.create_task(workloads.wait_ready("tiny", 1, timeout=WAIT))
    await asyncio.sleep(0)  # the waiter is waiting before anything runs

    await workloads.scale("tiny", 1)

    assert len(await waiter) == 1


async def test_command_that_cannot_run_raises_workload_error(make: MakeWorkloads) -> None:
    local = LocalServiceConfig(command=("/nonexistent/torpor-no-such-binary", "{port}"))
    workloads = make(ServiceConfig(name="broken", host="broken.localhost", local=local))

    with pytest.raises(WorkloadError, match=r"'broken'.*torpor-no-such-binary"):
        await workloads.scale("broken", 1)
    assert workloads.running_replicas("broken") == 0


async def test_env_cwd_and_port_reach_the_process(make: MakeWorkloads, tmp_path: Path) -> None:
    script = (
        "import os, pathlib, sys; "
        "pathlib.Path('seen-{port}').write_text(os.environ['TORPOR_MARK'] + ' ' + sys.executable)"
    )
    local = LocalServiceConfig(
        command=("python", "-c", script),
        cwd=tmp_path,
        env=(("TORPOR_MARK", "marked"),),
    )
    workloads = make(ServiceConfig(name="once", host="once.localhost", local=local))
    await workloads.scale("once", 1)

    await eventually(lambda: bool(outputs(tmp_path)), "the script's output file")
    # The script exits at once, so it may have been restarted meanwhile: look at the first.
    written = outputs(tmp_path)[0]
    assert written.name.removeprefix("seen-").isdigit()
    mark, executable = written.read_text().split(" ", 1)
    assert mark == "marked"
    assert executable == sys.executable
    await workloads.scale("once", 0)


def outputs(folder: Path) -> list[Path]:
    return sorted(folder.glob("seen-*"))


async def test_unknown_services_are_refused(make: MakeWorkloads) -> None:
    workloads = make(ServiceConfig(name="remote", host="remote.localhost"))

    for name in ("remote", "missing"):
        with pytest.raises(UnknownServiceError):
            await workloads.scale(name, 1)
        with pytest.raises(UnknownServiceError):
            workloads.running_replicas(name)
        with pytest.raises(UnknownServiceError):
            workloads.ready_endpoints(name)


async def test_replicas_listen_outside_the_ephemeral_range(make: MakeWorkloads) -> None:
    """No outgoing connection of any process can take a replica's port before it binds."""
    from torpor.workloads.local_ports import ephemeral_range

    workloads = make(tiny())
    await workloads.start()
    await workloads.scale("tiny", 2)
    ready = await workloads.wait_ready("tiny", 2, timeout=WAIT)
    low, high = ephemeral_range()
    assert all(not low <= e.port <= high for e in ready), ready
