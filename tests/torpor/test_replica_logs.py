"""Local replicas' logs are size-capped and the logs of dead replicas pruned."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.net import wait_until
from torpor.config import LocalServiceConfig, ServiceConfig
from torpor.workloads import local, replica_logs
from torpor.workloads.local import LocalWorkloads


def test_a_file_over_the_cap_is_copied_aside_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "echo-1234.log"
    with path.open("ab") as writer:  # the replica's own descriptor, in append mode
        writer.write(b"x" * 3000)
        writer.flush()
        assert not replica_logs.cap(path, max_bytes=5000)
        assert replica_logs.cap(path, max_bytes=1000)
        assert path.stat().st_size == 0
        assert (tmp_path / "echo-1234.log.1").stat().st_size == 3000
        writer.write(b"after\n")  # goes on at the new end, no hole of 3000 bytes
        writer.flush()
    assert path.read_bytes() == b"after\n"
    assert not replica_logs.cap(tmp_path / "missing.log", max_bytes=1)


def test_logs_of_dead_replicas_are_pruned_to_the_newest(tmp_path: Path) -> None:
    names = [f"echo-{2000 + i}.log" for i in range(8)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "echo-2000.log.1").write_text("old part")
    (tmp_path / "echo-b-3000.log").write_text("another service")  # not echo's
    live = {tmp_path / "echo-2001.log"}  # oldest but alive: never removed
    removed = replica_logs.prune(tmp_path, "echo", live, kept=3)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["echo-2001.log", "echo-2005.log", "echo-2006.log", "echo-2007.log",
                    "echo-b-3000.log"]
    assert tmp_path / "echo-2000.log.1" in removed


CHATTY = "import sys, time\nwhile True:\n    sys.stdout.write('y' * 1000 + '\\n')\n" \
         "    sys.stdout.flush()\n    time.sleep(0.001)\n"


async def test_a_chatty_replica_stays_under_the_cap(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_logs, "MAX_BYTES", 200_000)
    monkeypatch.setattr(local, "LOG_CAP_EVERY", 0.2)
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY)
    service = ServiceConfig(name="chatty", host="chatty.localhost", replicas=1,
                            local=LocalServiceConfig(command=(sys.executable, str(script)),
                                                     ready_probe="tcp"))
    workloads = LocalWorkloads([service], str(tmp_path / "logs"))
    await workloads.start()
    try:
        await workloads.scale("chatty", 1)
        (log,) = (tmp_path / "logs").glob("chatty-*.log")
        part = log.with_name(log.name + ".1")
        await wait_until(part.exists, 20, "the log copied aside once over the cap")
        # Truncated in place: the replica writes on at the start of the same file.
        await wait_until(lambda: 0 < log.stat().st_size < part.stat().st_size, 10,
                         "the log growing again from empty")
        assert part.stat().st_size > 200_000
        assert workloads.pids("chatty")  # the replica was not disturbed
    finally:
        await workloads.close()
