"""torpor/supervision.py with real processes: leftovers are stopped only when their pid
still has the recorded start time; the lock refuses a second holder."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor.supervision import (
    AlreadyRunningError,
    Child,
    RunFile,
    die_with_parent,
    start_time,
    stop_leftovers,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_reused_pid_is_not_stopped(sleeper: subprocess.Popen[bytes]) -> None:
    started = start_time(sleeper.pid)
    assert started is not None
    said: list[str] = []
    stopped = stop_leftovers([Child("replica", "echo", sleeper.pid, started + 1)],
                             said.append, grace=0.5)
    assert stopped == [] and said == []
    assert sleeper.poll() is None


def test_a_leftover_is_stopped_and_reported(sleeper: subprocess.Popen[bytes]) -> None:
    said: list[str] = []
    child = Child("replica", "echo", sleeper.pid, start_time(sleeper.pid))
    assert stop_leftovers([child], said.append, grace=2.0) == [child]
    assert sleeper.wait(5) is not None
    assert said == [f"stopping replica echo (pid {sleeper.pid}) left running by a previous "
                    "torpor up"]


def test_the_lock_refuses_a_second_run_and_hands_over_the_children(tmp_path: Path) -> None:
    first = RunFile(tmp_path)
    assert first.acquire() == []
    first.track("envoy", "envoy", 1)
    with pytest.raises(AlreadyRunningError, match="already running"):
        RunFile(tmp_path).acquire()
    first._lock.close()  # type: ignore[union-attr]  # as if the process died
    first._lock = None
    children = RunFile(tmp_path).acquire()
    assert [(c.kind, c.pid) for c in children] == [("envoy", 1)]


def test_a_missing_command_fails_before_anything_starts() -> None:
    with pytest.raises(FileNotFoundError):
        die_with_parent(["no-such-command-for-torpor"])
