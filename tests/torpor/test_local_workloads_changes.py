"""LocalWorkloads' services changing at run time (a config reload, `torpor register`):
added, dropped, and their command changed, with real processes (tiny_server.py)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from tests.torpor.test_local_workloads import (
    WAIT,
    MakeWorkloads,
    eventually,
    listen,
    make,
    tiny,
)
from torpor.errors import UnknownServiceError, WorkloadError

__all__ = ["make"]  # the fixture, used by name


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_an_added_service_scales_and_a_dropped_one_stops_for_good(
        make: MakeWorkloads) -> None:
    workloads = make(tiny("first"))
    await workloads.start()
    await workloads.put_service(tiny("later"))
    await workloads.scale("later", 2)
    await workloads.wait_ready("later", 2, timeout=WAIT)
    pids = workloads.pids("later")

    await workloads.drop_service("later")

    assert not any(alive(pid) for pid in pids)
    with pytest.raises(UnknownServiceError):
        await workloads.scale("later", 1)
    await workloads.drop_service("later")  # unknown: no error
    with pytest.raises(WorkloadError, match="no local: block"):
        await workloads.put_service(dataclasses.replace(tiny("x"), local=None))


async def test_a_changed_command_replaces_replicas_make_before_break(
        make: MakeWorkloads) -> None:
    workloads = make(tiny("edit"), tiny("other"))
    seen = listen(workloads)
    await workloads.start()
    for name in ("edit", "other"):
        await workloads.scale(name, 2)
        await workloads.wait_ready(name, 2, timeout=WAIT)
    old, other = workloads.pids("edit"), workloads.pids("other")
    seen.clear()

    await workloads.put_service(tiny("edit", "--delay", "0.3"))

    new = workloads.pids("edit")
    assert len(new) == 2 and not set(new) & set(old)
    await eventually(lambda: not any(alive(pid) for pid in old), "old replicas stopped")
    assert len(workloads.ready_endpoints("edit")) == 2
    assert workloads.pids("other") == other
    # Never without a ready replica while they were replaced.
    assert all(endpoints for name, endpoints in seen if name == "edit"), seen


async def test_other_local_keys_apply_without_a_restart(make: MakeWorkloads) -> None:
    workloads = make(tiny("calm"))
    await workloads.start()
    await workloads.scale("calm", 1)
    await workloads.wait_ready("calm", 1, timeout=WAIT)
    pids = workloads.pids("calm")

    await workloads.put_service(tiny("calm", stop_grace=1.0))

    assert workloads.pids("calm") == pids
