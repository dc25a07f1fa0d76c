"""The activator's drain (holding.py `start_drain`/`end_drain`, answers.py `Draining`, both
fronts' `wait_idle`), without Envoy: a request arriving while draining is refused at once,
a held one still gets its wake, and what is held when the grace ends is answered 503 with
Retry-After (gRPC UNAVAILABLE), never reset. `torpor up` end to end:
tests/integration/test_drain.py. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from h2.errors import ErrorCodes

from activator.answers import GRPC_UNAVAILABLE, answer_for
from activator.handler import ActivatorHandler
from activator.holding import Draining, HeldRequests, Holding, Ready, ServiceLookup
from activator.proxy import Proxy
from tests.activator.test_h2_holder import (
    DEADLINE,
    FakeWaker,
    Harness,
    abandoned_count,
    grpc_error,
    unary,
)
from torpor.config import ServiceConfig, load_config
from torpor.errors import ConfigError

SVC = ServiceConfig(name="svc", host="svc.localhost")


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        await h.close()


def test_draining_answers() -> None:
    refused = answer_for(Draining("svc", "refused"))
    assert (refused.status, refused.code, refused.grpc_status, refused.retry_after,
            refused.retry) == (503, "draining", GRPC_UNAVAILABLE, True, False)
    ended = answer_for(Draining("svc", "grace_ended"))
    assert (ended.status, ended.code, ended.grpc_status, ended.retry_after, ended.retry) == \
        (503, "draining", GRPC_UNAVAILABLE, True, False)
    assert "'svc' was not ready within its drain grace" in ended.message


async def test_holding_drain() -> None:
    waker = FakeWaker()
    held = HeldRequests(10)
    holding = Holding(held, waker, 30.0)
    woken = asyncio.create_task(holding.hold("woken"))
    stuck = asyncio.create_task(holding.hold("stuck"))
    await waker.until(lambda: sorted(waker.calls) == ["stuck", "woken"])

    holding.start_drain()
    assert await asyncio.wait_for(holding.hold("woken"), DEADLINE) == \
        Draining("woken", "refused")
    assert held.total() == 2  # the refused one never took a slot

    waker.wake_up("woken")  # a held request still gets its wake while draining
    assert isinstance(await asyncio.wait_for(woken, DEADLINE), Ready)
    assert not stuck.done()

    before = abandoned_count("stuck", "drained")
    holding.end_drain()
    assert await asyncio.wait_for(stuck, DEADLINE) == Draining("stuck", "grace_ended")
    assert held.total() == 0
    assert waker.cancelled == ["stuck"]  # this request stopped waiting; no other was there
    assert abandoned_count("stuck", "drained") == before + 1


async def test_http1_wait_idle_and_answers() -> None:
    waker = FakeWaker()
    holding = Holding(HeldRequests(10), waker, 30.0)
    handler = ActivatorHandler(ServiceLookup(lambda host, path: {SVC.host: SVC}.get(host)),
                               holding, Proxy())

    def request() -> web.Request:
        return make_mocked_request("GET", "/predict", headers={"Host": SVC.host})

    await asyncio.wait_for(handler.wait_idle(), DEADLINE)  # nothing in flight
    held = asyncio.create_task(handler.handle(request()))
    await waker.until(lambda: waker.calls == ["svc"])
    idle = asyncio.create_task(handler.wait_idle())
    holding.start_drain()

    refused = await asyncio.wait_for(handler.handle(request()), DEADLINE)
    assert isinstance(refused, web.Response) and isinstance(refused.body, bytes)
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert json.loads(refused.body)["error"] == "draining"
    assert not idle.done()  # the held one is still in flight

    holding.end_drain()
    answer = await asyncio.wait_for(held, DEADLINE)
    assert isinstance(answer, web.Response) and isinstance(answer.body, bytes)
    assert answer.status == 503 and answer.headers["Retry-After"] == "1"
    assert json.loads(answer.body)["error"] == "draining"
    await asyncio.wait_for(idle, DEADLINE)


async def test_h2_streams_answered_not_reset(harness: Harness) -> None:
    holder = await harness.start()
    holding = holder._holding
    client = await harness.raw()
    woken = await client.request("svc.localhost")
    stuck = await client.request("other.localhost")
    call = unary(harness.channel("other.localhost"))(b"x", timeout=DEADLINE)
    await harness.waker.until(lambda: len(harness.waker.calls) == 3)

    holding.start_drain()
    holder.stop_listening()
    with pytest.raises(OSError):  # no new connection
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", harness.port), DEADLINE)
    # A new stream on an open connection is refused unprocessed: Envoy replays it
    # elsewhere (retry_on refused-stream).
    late = await client.request("svc.localhost")
    await client.until(lambda: late in client.resets)
    assert client.resets == {late: ErrorCodes.REFUSED_STREAM}
    assert len(harness.waker.calls) == 3

    harness.waker.wake_up("svc")  # held while draining: still told to replay
    headers = await client.answer(woken)
    assert headers[":status"] == "503" and headers["x-torpor-retry"] == "1"

    idle = asyncio.create_task(holder.wait_idle())
    await client.round_trip()
    assert not idle.done() and stuck not in client.responses

    holding.end_drain()
    headers = await client.answer(stuck)
    assert headers[":status"] == "503" and headers["retry-after"] == "1"
    assert headers["grpc-status"] == "14" and "x-torpor-retry" not in headers
    assert list(client.resets) == [late]  # the held streams are answered, not reset
    err = await grpc_error(call)
    assert err.code() is grpc.StatusCode.UNAVAILABLE and "drain grace" in (err.details() or "")
    await asyncio.wait_for(idle, DEADLINE)


def write(tmp_path: Path, activator: str) -> Path:
    path = tmp_path / "torpor.yaml"
    path.write_text(f"activator: {{{activator}}}\n"
                    "services:\n  - {name: echo, host: echo.localhost, local: {command: [x]}}\n")
    return path


def test_drain_grace_config(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "wake_timeout: 1m")).activator.drain_grace == 30.0
    assert load_config(write(tmp_path, "drain_grace: 0s")).activator.drain_grace == 0.0
    assert load_config(write(tmp_path, "drain_grace: 2m")).activator.drain_grace == 120.0
    for bad, problem in (("-1s", "duration"), ("400d", "longer than 366d"),
                         ("soon", "not a duration")):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, f"drain_grace: {bad}"))
        assert info.value.key == "activator.drain_grace"
        assert problem in str(info.value), str(info.value)
