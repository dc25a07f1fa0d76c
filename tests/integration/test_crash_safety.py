"""Crash safety of `torpor up` (torpor/supervision.py), with real processes: a `kill -9`
of torpor takes Envoy and every replica along (parent-death signal); a restart stops what
a killed run left behind (pidfile) and then runs exactly one copy of each replica; a
second `torpor up` on the same config is refused with exit 2 and leaves the first alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import Up
from torpor.config import load_config
from torpor.supervision import NO_PDEATHSIG_ENV, start_time

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the parent-death signal and /proc are Linux-only")


class Processes:
    """Every `torpor up` and every child pid a test saw; all stopped at teardown."""

    def __init__(self) -> None:
        self.runners: list[Up] = []
        self.pids: dict[int, int | None] = {}

    def up(self, config_path: Path) -> Up:
        runner = Up(config_path)
        self.runners.append(runner)
        return runner

    def children(self, parent: int) -> dict[int, str]:
        """Live child processes of `parent` with their command lines (remembered for the
        teardown)."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[1]) == parent and fields[0] not in ("Z", "X"):
                pid = int(entry)
                found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace")
                self.pids[pid] = start_time(pid)
        return found

    def stop(self) -> None:
        for runner in self.runners:
            runner.kill()
        for pid, started in self.pids.items():
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


@pytest.fixture
async def processes() -> AsyncIterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, model_service("echo", 2) + model_service("sentiment", 1))


def alive(pids: dict[int, int | None]) -> list[int]:
    """The pids that still run the process first seen (same start time)."""
    return [pid for pid, started in pids.items()
            if started is not None and start_time(pid) == started]


def kinds(children: dict[int, str]) -> list[str]:
    """'envoy', 'echo', 'sentiment' for each child, sorted."""
    found = []
    for cmdline in children.values():
        if "torpor.examples.model_server" in cmdline:
            found.append(cmdline.split("--name ")[1].split()[0])
        elif "envoy" in cmdline:
            found.append("envoy")
        else:
            found.append(cmdline)
    return sorted(found)


EXPECTED = ["echo", "echo", "envoy", "sentiment"]


async def answers(config_path: Path) -> int:
    config = load_config(config_path)
    async with aiohttp.ClientSession() as session, session.post(
        f"http://{config.gateway.listen}/predict", data=b"hi",
        headers={"Host": "echo.localhost"},
    ) as response:
        return response.status


def sigkill(runner: Up) -> None:
    """kill -9 of torpor up's main process only (not its group)."""
    assert runner.proc is not None
    os.kill(runner.proc.pid, signal.SIGKILL)
    runner.proc.wait(10)


async def test_kill_9_of_torpor_up_takes_envoy_and_every_replica_along(
        config_path: Path, processes: Processes) -> None:
    up = processes.up(config_path)
    up.start()
    await up.wait_ready()
    assert up.proc is not None
    children = processes.children(up.proc.pid)
    assert kinds(children) == EXPECTED, children
    pids = {pid: start_time(pid) for pid in children}

    sigkill(up)

    await wait_until(lambda: not alive(pids), 10, f"no child of the killed torpor up left "
                     f"(alive: {alive(pids)})", interval=0.05)


async def test_restart_stops_the_leftovers_of_a_killed_run_and_runs_one_copy(
        config_path: Path, processes: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run whose children do not die with it: what an OOM kill leaves without PDEATHSIG
    # (or on another system than Linux).
    monkeypatch.setenv(NO_PDEATHSIG_ENV, "1")
    first = processes.up(config_path)
    first.start()
    monkeypatch.delenv(NO_PDEATHSIG_ENV)
    await first.wait_ready()
    assert first.proc is not None
    old = processes.children(first.proc.pid)
    assert kinds(old) == EXPECTED, old
    old_pids = {pid: start_time(pid) for pid in old}
    sigkill(first)
    await asyncio.sleep(0.5)
    assert sorted(alive(old_pids)) == sorted(old_pids), "the orphans should still run"

    second = processes.up(config_path)
    second.start()
    await second.wait_ready()
    assert not alive(old_pids), f"leftovers still running: {alive(old_pids)}"
    text = second.text()
    for pid in old_pids:
        assert f"(pid {pid}) left running by a previous torpor up" in text, text[-3000:]
    assert second.proc is not None
    new = processes.children(second.proc.pid)
    assert kinds(new) == EXPECTED, new
    assert not set(new) & set(old_pids)
    assert await answers(config_path) == 200

    assert await second.stop() == 0, second.text()[-3000:]
    assert not alive({pid: start_time(pid) for pid in new})


async def test_a_second_torpor_up_on_the_same_config_is_refused(
        config_path: Path, processes: Processes) -> None:
    first = processes.up(config_path)
    first.start()
    await first.wait_ready()
    assert first.proc is not None
    children = processes.children(first.proc.pid)
    pids = {pid: start_time(pid) for pid in children}

    second = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "assembly.cli", "up", "--config", str(config_path)],
        capture_output=True, timeout=30, start_new_session=True,
    )

    assert second.returncode == 2, second.stderr.decode()
    lines = second.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "torpor up is already running" in lines[0]
    assert f"(pid {first.proc.pid})" in lines[0]
    assert first.proc.poll() is None
    assert sorted(alive(pids)) == sorted(pids)
    assert await answers(config_path) == 200
    assert await first.stop() == 0, first.text()[-3000:]
    assert not alive(pids)
