"""Supervision of local replicas and children, with real processes: children are watched
without a thread each (20 replicas start no thread), a child's exit status and signal
are reported; a replica that stops answering (SIGSTOP) fails its liveness probe, is
killed and replaced on a new port; the restart backoff table; the `local.liveness` keys.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.torpor.test_local_workloads import TINY_SERVER, WAIT, assert_gone, eventually
from torpor import metrics, supervision
from torpor.config import LivenessConfig, LocalServiceConfig, ServiceConfig, load_config
from torpor.errors import ConfigError
from torpor.supervision import RestartPolicy, describe_exit, next_restart
from torpor.workloads.local import LocalWorkloads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SIGSTOP and /proc process states are Linux-only here")


def tiny(name: str = "tiny", liveness: LivenessConfig | None = None) -> ServiceConfig:
    liveness = liveness or LivenessConfig()
    command = ("python", TINY_SERVER, "--port", "{port}")
    local = LocalServiceConfig(command=command, ready_path="/healthz", stop_grace=5.0,
                               liveness=liveness)
    return ServiceConfig(name=name, host=f"{name}.localhost", local=local)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., LocalWorkloads]]:
    created: list[LocalWorkloads] = []

    def factory(*services: ServiceConfig) -> LocalWorkloads:
        workloads = LocalWorkloads(services, str(tmp_path / "logs"), probe_interval=0.05,
                                   restart_backoff=(0.1, 1.0))
        created.append(workloads)
        return workloads

    try:
        yield factory
    finally:
        for workloads in created:
            await workloads.close()


# --- no thread per child ------------------------------------------------------------------


async def test_twenty_replicas_start_no_thread(make: Callable[..., LocalWorkloads]) -> None:
    workloads = make(tiny())
    await workloads.start()
    await workloads.scale("tiny", 1)  # anything started once per process is started now
    await workloads.wait_ready("tiny", 1, timeout=WAIT)
    before = threading.active_count()

    await workloads.scale("tiny", 20)
    await workloads.wait_ready("tiny", 20, timeout=60)
    assert workloads.running_replicas("tiny") == 20
    during = threading.active_count()
    await workloads.scale("tiny", 0)

    assert during == before, f"{during - before} threads for 19 more children"
    assert threading.active_count() == before


async def test_child_exit_status_and_signal_are_reported(tmp_path: Path) -> None:
    with (tmp_path / "out.log").open("ab") as out:
        exits = supervision.spawn(["sh", "-c", "echo hello; exit 3"], kind="test",
                                  name="exits", stdout=out)
        sleeps = supervision.spawn(["sleep", "60"], kind="test", name="sleeps", stdout=out)
    try:
        assert await asyncio.wait_for(exits.wait(), WAIT) == 3
        assert sleeps.returncode is None
        sleeps.signal_group(signal.SIGKILL)
        assert await asyncio.wait_for(sleeps.wait(), WAIT) == -signal.SIGKILL
    finally:
        sleeps.signal_group(signal.SIGKILL)
    assert exits.returncode == 3
    assert (tmp_path / "out.log").read_text() == "hello\n"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert supervision.log_tail(tmp_path / "out.log") == ["hello"]
    assert supervision.log_tail(tmp_path / "missing.log") == []


async def test_spawn_of_a_missing_command_raises() -> None:
    with pytest.raises(FileNotFoundError):
        supervision.spawn(["/nonexistent/command"], kind="test", name="x",
                          stdout=subprocess.DEVNULL)


# --- liveness -------------------------------------------------------------------------------


async def test_a_stopped_replica_is_killed_and_replaced(
        make: Callable[..., LocalWorkloads], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    workloads = make(tiny("hung", LivenessConfig(period=0.5, timeout=0.2, failures=2)))
    await workloads.scale("hung", 2)
    await workloads.wait_ready("hung", 2, timeout=WAIT)
    hung, healthy = workloads.pids("hung")
    ports = {e.port for e in workloads.ready_endpoints("hung")}
    restarts = metrics.REPLICA_RESTARTS.labels(service="hung", reason="liveness")
    before = restarts._value.get()

    os.kill(hung, signal.SIGSTOP)

    def replaced() -> bool:
        pids = workloads.pids("hung")
        return len(pids) == 2 and hung not in pids and \
            len(workloads.ready_endpoints("hung")) == 2

    try:
        await eventually(replaced, "the stopped replica replaced", timeout=30)
    finally:
        if workloads.pids("hung") and hung in workloads.pids("hung"):
            os.kill(hung, signal.SIGCONT)
    assert_gone(hung)
    assert healthy in workloads.pids("hung")
    new_ports = {e.port for e in workloads.ready_endpoints("hung")}
    assert len(new_ports - ports) == 1, (ports, new_ports)  # the new one on a new port
    assert restarts._value.get() == before + 1
    killed = [r for r in caplog.records if r.getMessage() == "replica.killed"]
    assert [(r.service, r.pid, r.reason) for r in killed] == [  # type: ignore[attr-defined]
        ("hung", hung, "liveness")]
    exited = [r for r in caplog.records if r.getMessage() == "replica.exited"]
    assert [(r.returncode, r.reason) for r in exited] == [  # type: ignore[attr-defined]
        (-signal.SIGKILL, "liveness")]


async def test_a_crash_is_counted_as_exited(make: Callable[..., LocalWorkloads]) -> None:
    workloads = make(tiny("crashy"))
    await workloads.scale("crashy", 1)
    await workloads.wait_ready("crashy", 1, timeout=WAIT)
    (pid,) = workloads.pids("crashy")
    restarts = metrics.REPLICA_RESTARTS.labels(service="crashy", reason="exited")
    before = restarts._value.get()
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: workloads.pids("crashy") not in ([], [pid]), "a replacement")
    assert restarts._value.get() == before + 1


# --- the restart backoff table ---------------------------------------------------------------


def test_restart_backoff_doubles_and_gives_up_within_the_window() -> None:
    policy = RestartPolicy(first_delay=0.5, max_delay=3.0, give_up_after=5, window=100.0)
    assert [next_restart(policy, [0.0] * n, 1.0) for n in range(1, 6)] == \
        [0.5, 1.0, 2.0, 3.0, None]
    # Exits older than the window are forgiven: one recent exit is a first exit again.
    assert next_restart(policy, [0.0, 1.0, 2.0, 3.0, 500.0], 500.0) == 0.5


# --- config -----------------------------------------------------------------------------------


def write(tmp_path: Path, local_extra: str) -> Path:
    path = tmp_path / "torpor.yaml"
    path.write_text(textwrap.dedent(f"""
        services:
          - name: echo
            host: echo.localhost
            local:
              command: [python, -m, torpor.examples.model_server, --port, "{{port}}"]
              {local_extra}
        """))
    return path


def test_liveness_defaults_and_keys(tmp_path: Path) -> None:
    (service,) = load_config(write(tmp_path, "")).services
    assert service.local is not None
    assert service.local.liveness == LivenessConfig(enabled=True, period=5.0, timeout=2.0,
                                                    failures=3)
    (service,) = load_config(write(
        tmp_path, "liveness: {period: 1s, timeout: 500ms, failures: 5, enabled: false}")).services
    assert service.local is not None
    assert service.local.liveness == LivenessConfig(enabled=False, period=1.0, timeout=0.5,
                                                    failures=5)


@pytest.mark.parametrize(("extra", "key", "problem"), [
    ("liveness: {period: 100ms}", "services[0].local.liveness.period", "from 0.5s to 3600s"),
    ("liveness: {timeout: 0s}", "services[0].local.liveness.timeout", "from 0.1s to 300s"),
    ("liveness: {failures: 0}", "services[0].local.liveness.failures", "from 1 to 100"),
    ("liveness: {every: 5s}", "services[0].local.liveness.every", "unknown key"),
])
def test_liveness_bounds(tmp_path: Path, extra: str, key: str, problem: str) -> None:
    path = write(tmp_path, extra)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key, str(info.value)
    assert problem in str(info.value) and str(path) in str(info.value)
