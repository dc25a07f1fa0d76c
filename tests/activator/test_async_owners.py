"""Asynchronous calls over several activator replicas (activator/async_owners.py), without
etcd or Envoy: a call's id names the replica that keeps it; a status request that reaches
another replica is forwarded to the owner found by the (here fake) registry lookup, and
its answer relayed; an owner that is gone or does not answer gets a clear JSON error,
never a hang; a forwarded request is never forwarded again. Two handlers serve on
127.0.0.1 (each binds port 0 itself). Fleet end to end: tests/fleet/test_async_fleet.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from activator import async_owners
from activator.async_calls import AsyncCalls, ResultSpool
from activator.async_owners import (
    FORWARDED_HEADER,
    Replicas,
    new_call_id,
    owner_of,
    valid_member,
    where_answered,
)
from activator.handler import ActivatorHandler, make_app
from activator.holding import HeldRequests, Holding, ServiceLookup
from activator.proxy import Proxy
from tests.activator.test_h2_holder import FakeWaker
from tests.support.net import free_port
from torpor.async_calls import STATUS_PATH
from torpor.config import ServiceConfig
from torpor.errors import StoreError
from torpor.model import Endpoint

SVC = ServiceConfig(name="svc", host="svc.localhost")
OTHER = ServiceConfig(name="other", host="other.localhost")
#: Every request of these tests ends well within this (the forward's own bound is shorter
#: in the hang test).
DEADLINE = 15.0


# --- the id scheme and the decision (pure) -----------------------------------------------

def test_an_id_names_its_owner_and_stays_unguessable() -> None:
    for member in ("a0", "torpor-activator-7d9f-x2", "node.example.org-4242", "a_b"):
        call_id = new_call_id(member)
        assert owner_of(call_id) == member
        token = call_id.rpartition(".")[2]
        assert len(token) == 24 and token.replace("-", "").replace("_", "").isalnum()
    assert new_call_id("a0") != new_call_id("a0")
    one_process = new_call_id(None)
    assert "." not in one_process and owner_of(one_process) is None


@pytest.mark.parametrize("call_id", [
    "", "a0", "a0.", ".abcdefghijklmnopqrstuvwx", "a0.short", "a0.abcdefghijklmnopqrstuvw!",
    "-a0." + "x" * 24, "a 0." + "x" * 24, "../x." + "x" * 24, "a0." + "x" * 25,
    "m" * 201 + "." + "x" * 24,
])
def test_ids_that_name_no_owner(call_id: str) -> None:
    assert owner_of(call_id) is None


def test_member_names_an_id_can_carry() -> None:
    assert valid_member("a0") and valid_member("host.example-12_3")
    assert not valid_member("") and not valid_member("a/b") and not valid_member("a b")
    assert not valid_member("-a") and not valid_member("a" * 201)
    with pytest.raises(ValueError, match="--member"):
        Replicas("bad name", lambda member: _no_address())


async def _no_address() -> Endpoint | None:
    return None


MINE, THEIRS = new_call_id("a0"), new_call_id("a1")


@pytest.mark.parametrize(("call_id", "kept_here", "me", "forwarded", "expected"), [
    (THEIRS, False, "a0", False, "a1"),  # another replica's call: ask it
    (THEIRS, True, "a0", False, None),  # kept here anyway (a shared spool)
    (THEIRS, False, "a0", True, None),  # forwarded once already: never again
    (THEIRS, False, None, False, None),  # one process: no fleet to ask
    (MINE, False, "a0", False, None),  # ours, and gone: answered here (404)
    (new_call_id(None), False, "a0", False, None),  # an id of one process
    ("garbage", False, "a0", False, None),
])
def test_where_a_status_is_answered(call_id: str, kept_here: bool, me: str | None,
                                    forwarded: bool, expected: str | None) -> None:
    assert where_answered(call_id, kept_here=kept_here, me=me,
                          forwarded=forwarded) == expected


# --- two replicas ------------------------------------------------------------------------

class Registry:
    """The fake registry: member → address, changed by the test; counts the look-ups."""

    def __init__(self) -> None:
        self.addresses: dict[str, Endpoint] = {}
        self.down = False
        self.asked: list[str] = []

    async def address_of(self, member: str) -> Endpoint | None:
        self.asked.append(member)
        if self.down:
            raise StoreError("etcd 127.0.0.1:1: get: UNAVAILABLE: down")
        return self.addresses.get(member)


class Replica:
    """One activator's HTTP/1 handler with its own spool, served on 127.0.0.1."""

    def __init__(self, member: str, spool: Path, registry: Registry) -> None:
        self.member = member
        self.spool = ResultSpool(spool, ttl=60, max_calls=100, owner=member)
        lookup = ServiceLookup(lambda host, path: {SVC.host: SVC, OTHER.host: OTHER}.get(host))
        holding = Holding(HeldRequests(10), FakeWaker(), 30.0)
        self.calls = AsyncCalls(self.spool, holding, max_bytes=1 << 20,
                                replicas=Replicas(member, registry.address_of))
        self.handler = ActivatorHandler(lookup, holding, Proxy(), calls=self.calls)
        self.runner = web.AppRunner(make_app(self.handler))
        self.port = 0

    async def start(self) -> Endpoint:
        await self.calls.start()
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return Endpoint("127.0.0.1", self.port)

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.calls.stop()


class Pair:
    def __init__(self, a0: Replica, a1: Replica, registry: Registry,
                 session: aiohttp.ClientSession) -> None:
        self.a0, self.a1, self.registry, self.session = a0, a1, registry, session

    async def get(self, replica: Replica, call_id: str, host: str = SVC.host,
                  method: str = "GET", **headers: str
                  ) -> tuple[int, dict[str, str], bytes]:
        async with self.session.request(
                method, f"http://127.0.0.1:{replica.port}{STATUS_PATH}{call_id}",
                headers={"Host": host, **headers},
                timeout=aiohttp.ClientTimeout(total=DEADLINE)) as response:
            return (response.status, {k.lower(): v for k, v in response.headers.items()},
                    await response.read())


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    registry = Registry()
    a0 = Replica("a0", tmp_path / "a0", registry)
    a1 = Replica("a1", tmp_path / "a1", registry)
    try:
        registry.addresses["a0"] = await a0.start()
        registry.addresses["a1"] = await a1.start()
        async with aiohttp.ClientSession() as session:
            yield Pair(a0, a1, registry, session)
    finally:
        await a0.stop()
        await a1.stop()


async def test_a_call_kept_by_one_replica_is_answered_by_the_other(pair: Pair) -> None:
    done = pair.a0.spool.create(SVC.name)
    body = secrets.token_bytes(5000)
    pair.a0.spool.finish(done.id, 201, {"content-type": "application/x-made",
                                        "cache-control": "no-store"}, body)
    assert done.id.startswith("a0.") and pair.a1.spool.get(done.id) is None

    status, headers, got = await pair.get(pair.a1, done.id)
    assert (status, got) == (201, body)
    assert headers["content-type"] == "application/x-made"
    assert headers["cache-control"] == "no-store"
    assert FORWARDED_HEADER not in headers
    direct = await pair.get(pair.a0, done.id)  # what the owner itself answers
    assert (direct[0], direct[1]["content-type"], direct[2]) == (201, "application/x-made",
                                                                 body)
    head = await pair.get(pair.a1, done.id, method="HEAD")
    assert head[0] == 201 and head[2] == b""
    assert pair.registry.asked == ["a0", "a0"]  # looked up by name, each time

    running = pair.a0.spool.create(SVC.name)
    status, headers, got = await pair.get(pair.a1, running.id)
    assert status == 202 and headers["retry-after"] == "1"
    assert json.loads(got) == {"status": "running", "service": "svc",
                               "location": STATUS_PATH + running.id}


async def test_the_owner_decides_what_is_found(pair: Pair) -> None:
    """The owner applies its own rules: a call made under another host, and an id it never
    made, are its 404s, relayed."""
    call = pair.a0.spool.create(SVC.name)
    pair.a0.spool.finish(call.id, 200, {}, b"ok")
    status, _, body = await pair.get(pair.a1, call.id, host=OTHER.host)
    assert status == 404 and json.loads(body)["error"] == "unknown_call"
    status, _, body = await pair.get(pair.a1, new_call_id("a0"))
    assert status == 404 and json.loads(body)["error"] == "unknown_call"
    assert "older than" in json.loads(body)["message"]  # the owner's own answer


async def test_ids_naming_no_other_replica_are_answered_here(pair: Pair) -> None:
    for call_id in (new_call_id(None), new_call_id("a1"), "nonsense"):
        status, _, body = await pair.get(pair.a1, call_id)
        assert status == 404 and json.loads(body)["error"] == "unknown_call"
    assert pair.registry.asked == []


async def test_a_forwarded_request_is_never_forwarded_again(pair: Pair) -> None:
    # A wrong registration (a0's name, a1's address) must not make a loop.
    pair.registry.addresses["a0"] = pair.registry.addresses["a1"]
    status, _, body = await pair.get(pair.a1, new_call_id("a0"))
    assert status == 404 and json.loads(body)["error"] == "unknown_call"
    assert pair.registry.asked == ["a0"]  # a1 → a1 (forwarded) → answered from its spool
    status, _, _ = await pair.get(pair.a1, new_call_id("a0"), **{FORWARDED_HEADER: "x"})
    assert status == 404 and pair.registry.asked == ["a0"]


async def test_an_owner_that_is_gone(pair: Pair) -> None:
    call = pair.a0.spool.create(SVC.name)
    del pair.registry.addresses["a0"]  # stopped: deregistered, or its lease expired
    status, headers, body = await pair.get(pair.a1, call.id)
    answer = json.loads(body)
    assert status == 404 and answer["error"] == "unknown_call" and "retry-after" not in headers
    assert "a0" in answer["message"] and "gone" in answer["message"]
    assert answer["service"] == "svc"


async def test_an_owner_that_does_not_answer(pair: Pair) -> None:
    call = pair.a0.spool.create(SVC.name)
    pair.registry.addresses["a0"] = Endpoint("127.0.0.1", free_port())  # nothing listens
    status, headers, body = await pair.get(pair.a1, call.id)
    assert status == 503 and headers["retry-after"] == "2"
    assert json.loads(body)["error"] == "async_owner_unreachable"


async def test_a_registry_that_cannot_be_read(pair: Pair) -> None:
    call = pair.a0.spool.create(SVC.name)
    pair.registry.down = True
    status, headers, body = await pair.get(pair.a1, call.id)
    assert status == 503 and headers["retry-after"] == "2"
    assert json.loads(body)["error"] == "registry_unavailable"


async def test_an_owner_that_hangs_is_not_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An owner that takes the connection and never answers: the forward gives up after
    FORWARD_SECONDS (shortened here) with 503 + Retry-After."""
    monkeypatch.setattr(async_owners, "FORWARD_SECONDS", 0.5)
    accepted = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        accepted.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    registry = Registry()
    registry.addresses["a0"] = Endpoint("127.0.0.1", server.sockets[0].getsockname()[1])
    a1 = Replica("a1", tmp_path / "a1", registry)
    try:
        registry.addresses["a1"] = await a1.start()
        async with aiohttp.ClientSession() as session:
            status, headers, body = await Pair(a1, a1, registry, session).get(
                a1, new_call_id("a0"))
        assert accepted.is_set()
        assert status == 503 and headers["retry-after"] == "2"
        assert json.loads(body)["error"] == "async_owner_unreachable"
    finally:
        await a1.stop()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


def test_one_process_makes_ids_without_an_owner(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path, ttl=60, max_calls=10)
    spool.open()
    call = spool.create("svc")
    assert "." not in call.id and spool.get(call.id) == call
