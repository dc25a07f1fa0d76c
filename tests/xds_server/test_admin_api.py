"""The admin API end to end: the real grpc.aio server (xds_server/admin_api.py) serving a
fake ServiceAdmin, driven by the CLI's synchronous client (torpor/admin_client.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.net import free_port
from torpor import admin_client
from torpor.admin_client import AdminError, format_status_table
from torpor.errors import (
    InvalidTransitionError,
    NotSupportedError,
    StoreError,
    TorporError,
    UnknownServiceError,
)
from torpor.model import Endpoint, ServiceState, ServiceStatus, Transition, VersionStatus
from xds_server import admin_api
from xds_server.admin_api import start_admin_server, status_to_message

NOW = 1_700_000_000.0
S = ServiceState


def make_status(
    name: str,
    state: ServiceState = S.ACTIVE,
    *,
    replicas: int = 2,
    last_call: float | None = None,
    history: tuple[Transition, ...] = (),
) -> ServiceStatus:
    return ServiceStatus(
        name=name,
        host=f"{name}.localhost",
        state=state,
        replicas=replicas,
        desired_replicas=2,
        recorded_replicas=2,
        ready_endpoints=tuple(Endpoint("127.0.0.1", 9000 + i) for i in range(replicas)),
        last_call=last_call,
        created_at=NOW - 3600,
        updated_at=NOW - 60,
        history=history
        or (Transition(at=NOW - 3600, from_state=None, to_state=S.ACTIVE, reason="registered"),),
    )


class FakeAdmin:
    """A ServiceAdmin over a dict; hibernate is not built, wake follows the state machine,
    and two reserved names fail the way a broken store or a bug would."""

    def __init__(self, statuses: list[ServiceStatus]) -> None:
        self.by_name = {s.name: s for s in statuses}

    async def statuses(self) -> list[ServiceStatus]:
        return sorted(self.by_name.values(), key=lambda s: s.name)

    def problems(self) -> list[str]:
        return []

    async def status(self, name: str) -> ServiceStatus:
        if name == "store-down":
            raise StoreError("sqlite store at ./torpor-state.db is locked")
        if name == "crash":
            raise RuntimeError("boom")
        try:
            return self.by_name[name]
        except KeyError:
            raise UnknownServiceError(f"no service named {name!r}") from None

    async def hibernate(self, name: str) -> ServiceStatus:
        await self.status(name)
        raise NotSupportedError("hibernate on demand is not built yet")

    async def wake(self, name: str) -> ServiceStatus:
        status = await self.status(name)
        if status.state is not S.HIBERNATED:
            raise InvalidTransitionError(f"{name}: {status.state} -> WAKING is not allowed")
        woken = dataclasses.replace(status, state=S.WAKING, replicas=0, ready_endpoints=())
        self.by_name[name] = woken
        return woken


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, FakeAdmin]]:
    fake = FakeAdmin(
        [
            make_status("echo", last_call=NOW - 12),
            make_status("sleepy", S.HIBERNATED, replicas=0),
        ]
    )
    server, port = await start_admin_server("127.0.0.1:0", fake)
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        await server.stop(None)


async def test_list_returns_contract_fields_with_types(served: tuple[str, FakeAdmin]) -> None:
    address, fake = served
    statuses = await asyncio.to_thread(admin_client.list_statuses, address)

    assert [s["name"] for s in statuses] == ["echo", "sleepy"]
    assert statuses == [s.to_json() for s in await fake.statuses()]
    for status in statuses:
        assert list(status)[:5] == ["name", "state", "replicas", "recorded_replicas", "last_call"]
        assert isinstance(status["name"], str)
        assert status["state"] in {s.value for s in ServiceState}
        assert type(status["replicas"]) is int
        assert type(status["recorded_replicas"]) is int
    echo, sleepy = statuses
    assert echo["last_call"] == NOW - 12
    assert type(echo["last_call"]) is float
    assert sleepy["last_call"] is None
    assert '"last_call": null' in json.dumps(sleepy)
    assert echo["ready_endpoints"] == ["127.0.0.1:9000", "127.0.0.1:9001"]
    assert echo["history"] == [
        {"at": NOW - 3600, "from": None, "to": "ACTIVE", "reason": "registered"}
    ]


async def test_get_status(served: tuple[str, FakeAdmin]) -> None:
    address, fake = served
    status = await asyncio.to_thread(admin_client.get_status, address, "sleepy")
    assert status == fake.by_name["sleepy"].to_json()


async def test_unknown_service_is_not_found(served: tuple[str, FakeAdmin]) -> None:
    address, _ = served
    with pytest.raises(AdminError, match="unknown service 'nope'") as info:
        await asyncio.to_thread(admin_client.get_status, address, "nope")
    assert info.value.code == "NOT_FOUND"
    assert info.value.kind == "UnknownServiceError"


async def test_not_supported_is_reported_with_its_message(served: tuple[str, FakeAdmin]) -> None:
    address, _ = served
    with pytest.raises(AdminError, match="hibernate on demand is not built yet") as info:
        await asyncio.to_thread(admin_client.hibernate, address, "echo")
    assert info.value.code == "UNIMPLEMENTED"


async def test_wake_returns_new_status(served: tuple[str, FakeAdmin]) -> None:
    address, _ = served
    status = await asyncio.to_thread(admin_client.wake, address, "sleepy")
    assert status["state"] == "WAKING"
    assert status["replicas"] == 0
    assert status["recorded_replicas"] == 2


async def test_invalid_transition_is_failed_precondition(served: tuple[str, FakeAdmin]) -> None:
    address, _ = served
    with pytest.raises(AdminError, match="ACTIVE -> WAKING is not allowed") as info:
        await asyncio.to_thread(admin_client.wake, address, "echo")
    assert info.value.code == "FAILED_PRECONDITION"


async def test_server_side_unavailable_is_not_mistaken_for_unreachable(
    served: tuple[str, FakeAdmin],
) -> None:
    address, _ = served
    with pytest.raises(AdminError, match="is locked") as info:
        await asyncio.to_thread(admin_client.get_status, address, "store-down")
    assert info.value.code == "UNAVAILABLE"
    assert "cannot reach" not in str(info.value)


async def test_unexpected_exception_is_internal(served: tuple[str, FakeAdmin]) -> None:
    address, _ = served
    with pytest.raises(AdminError, match="boom") as info:
        await asyncio.to_thread(admin_client.get_status, address, "crash")
    assert info.value.code == "INTERNAL"


async def test_empty_name_is_invalid_argument(served: tuple[str, FakeAdmin]) -> None:
    address, _ = served
    with pytest.raises(AdminError, match="name is required") as info:
        await asyncio.to_thread(admin_client.wake, address, "")
    assert info.value.code == "INVALID_ARGUMENT"


async def test_unreachable_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(AdminError, match="cannot reach the torpor admin API at") as info:
        await asyncio.to_thread(admin_client.list_statuses, address, 5.0)
    assert address in str(info.value)
    assert "control_plane.admin_api" in str(info.value)
    assert isinstance(info.value, TorporError)


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(TorporError, match="cannot serve the torpor admin API"):
            await start_admin_server(address, FakeAdmin([]))


def test_message_round_trip_matches_to_json() -> None:
    status = make_status(
        "echo",
        S.HIBERNATED,
        replicas=0,
        last_call=NOW - 5,
        history=(
            Transition(NOW - 100, None, S.ACTIVE, "registered"),
            Transition(NOW - 50, S.ACTIVE, S.HIBERNATING, "idle for 10m"),
            Transition(NOW - 40, S.HIBERNATING, S.HIBERNATED, ""),
        ),
    )
    message = status_to_message(status)
    assert message.HasField("last_call")
    assert admin_client.status_from_message(message) == status.to_json()

    never_called = make_status("quiet")
    assert not status_to_message(never_called).HasField("last_call")
    assert admin_client.status_from_message(status_to_message(never_called))["last_call"] is None


def test_unknown_state_from_server_is_an_admin_error() -> None:
    message = status_to_message(make_status("echo"))
    message.state = "SNOOZING"
    with pytest.raises(AdminError, match="cannot read"):
        admin_client.status_from_message(message)


def test_error_kind_key_matches_server() -> None:
    assert admin_client.ERROR_KIND_KEY == admin_api.ERROR_KIND_KEY


def clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def test_status_table() -> None:
    now = time.mktime((2024, 5, 1, 14, 30, 0, 0, 0, -1))  # local time, same day as history
    history = (
        Transition(now - 400, None, S.ACTIVE, "registered"),
        Transition(now - 300, S.ACTIVE, S.HIBERNATING, "idle for 10m"),
        Transition(now - 290, S.HIBERNATING, S.HIBERNATED, "scaled to 0"),
        Transition(now - 100, S.HIBERNATED, S.WAKING, ""),
    )
    statuses: list[dict[str, Any]] = [
        make_status("echo", last_call=now - 12).to_json(),
        make_status("sleepy-model", S.WAKING, replicas=0, history=history).to_json(),
        make_status("old", S.EVICTED, replicas=0, last_call=now - 3 * 86400).to_json(),
    ]
    statuses[0]["history"] = [Transition(now - 3600, None, S.ACTIVE, "registered").to_dict()]
    statuses[0].update(keep_alive=630.0, next_call=now + 150)
    statuses[1].update(keep_alive=0.3)
    statuses[2]["history"] = []

    table = format_status_table(statuses, now=now)

    assert table.splitlines() == [
        "NAME          STATE                  REPLICAS  READY  RECORDED  LAST CALL  KEEP    "
        "NEXT CALL  HOST",
        "echo          ACTIVE                 2         2      2         12s ago    10m30s  "
        "in 2m      echo.localhost",
        f"  {clock(now - 3600)} (new) -> ACTIVE  (registered)",
        "sleepy-model  WAKING for 1 min 40 s  0         0      2         never      0.3s    "
        "-          sleepy-model.localhost",
        f"  {clock(now - 300)} ACTIVE -> HIBERNATING  (idle for 10m)",
        f"  {clock(now - 290)} HIBERNATING -> HIBERNATED  (scaled to 0)",
        f"  {clock(now - 100)} HIBERNATED -> WAKING",
        "old           EVICTED                0         0      2         3d ago     -       "
        "-          old.localhost",
    ]


def test_the_table_names_a_replica_problem_under_its_service() -> None:
    status = make_status("crashy").to_json()
    status["replica_problem"] = "a replica exited (exit code 3); its last log lines: CUDA oom"
    lines = format_status_table([status], now=time.time()).splitlines()
    assert "  PROBLEM (replicas): a replica exited (exit code 3); its last log lines: " \
        "CUDA oom" in lines
    back = admin_client.status_from_message(status_to_message(
        dataclasses.replace(make_status("crashy"), replica_problem="exit code 3")))
    assert back["replica_problem"] == "exit code 3"
    assert admin_client.status_from_message(status_to_message(make_status("ok")))[
        "replica_problem"] is None


def test_a_service_with_versions_shows_them_in_the_table_and_round_trips() -> None:
    versions = (VersionStatus("v1", 90, ServiceState.ACTIVE, 2, 2),
                VersionStatus("v2", 10, ServiceState.HIBERNATED, 0, 1))
    status = dataclasses.replace(make_status("model"), versions=versions,
                                 hosts=("model.test", "*.model.test"), paths=("/v1",))
    back = admin_client.status_from_message(status_to_message(status))
    assert back["versions"] == [v.to_json() for v in versions]
    assert (back["hosts"], back["paths"]) == (["model.test", "*.model.test"], ["/v1"])
    lines = format_status_table([back], now=time.time()).splitlines()
    assert "  VERSIONS: v1 weight 90 ACTIVE 2/2, v2 weight 10 HIBERNATED 0/1" in lines


def test_keep_alive_and_next_call_round_trip() -> None:
    status = dataclasses.replace(make_status("echo"), keep_alive=45.0, next_call=1_700_000_000.5)
    back = admin_client.status_from_message(status_to_message(status))
    assert (back["keep_alive"], back["next_call"]) == (45.0, 1_700_000_000.5)
    plain = status_to_message(make_status("quiet"))
    assert not plain.HasField("keep_alive") and not plain.HasField("next_call")
    back = admin_client.status_from_message(plain)
    assert back["keep_alive"] is None and back["next_call"] is None
    assert admin_client.format_next(100.0, 200.0) == "due"
    assert admin_client.format_keep(7200.0) == "2h"


def test_status_table_edge_cases() -> None:
    assert format_status_table([]) == "no services"
    now = time.mktime((2024, 5, 2, 9, 0, 0, 0, 0, -1))
    yesterday = now - 86400
    status = make_status(
        "echo",
        last_call=now - 7200,
        history=(Transition(yesterday, None, S.ACTIVE, "registered"),),
    ).to_json()
    lines = format_status_table([status], now=now).splitlines()
    assert "2h ago" in lines[1]
    expected_day = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(yesterday))
    assert lines[2] == f"  {expected_day} (new) -> ACTIVE  (registered)"
    assert admin_client.format_ago(now - 300, now) == "5m ago"
    assert admin_client.format_ago(now + 5, now) == "0s ago"
