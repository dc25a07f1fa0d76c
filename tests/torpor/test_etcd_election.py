"""Leader election, the activator registry and the session lease against a real etcd:
one leader at a time, a resign or a killed leader hands over, a leader that cannot reach
etcd stops leading; registrations come and go with their process's lease, and come back
when a lost lease is granted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aetcd import rpc

from tests.support.etcd import EtcdServer
from tests.support.net import wait_until
from tests.torpor.test_etcd_locks import PREFIX, child, failed_creates, session_on, sigkill
from torpor.etcd.connection import EtcdConnection, StoreUnavailableError
from torpor.etcd.election import LeaderElection
from torpor.etcd.registry import Activator, ActivatorRegistry
from torpor.etcd.session import EtcdSession
from torpor.model import Endpoint

LEADER_KEY = PREFIX + "leader/reconciler"


@contextlib.asynccontextmanager
async def campaigning(session: EtcdSession) -> AsyncIterator[LeaderElection]:
    election = LeaderElection(session)
    election.start()
    try:
        yield election
    finally:
        await election.stop()


class NeverTwo:
    """Checks every few milliseconds, in the background, that no two candidates lead at
    once; `violations` says when they did."""

    def __init__(self, *elections: LeaderElection) -> None:
        self._elections = elections
        self.violations = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            self.samples += 1
            if sum(e.is_leader for e in self._elections) > 1:
                self.violations += 1
            await asyncio.sleep(0.002)

    async def __aenter__(self) -> NeverTwo:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# --- election -------------------------------------------------------------------------------


async def test_one_leader_and_a_resign_hands_over_at_once(etcd: EtcdServer) -> None:
    async with session_on(etcd.endpoint, "a", ttl=2, timeout=1.0) as sa, \
            session_on(etcd.endpoint, "b", ttl=2, timeout=1.0) as sb, \
            campaigning(sa) as ea, campaigning(sb) as eb:
        by_member = {"a": ea, "b": eb}
        async with NeverTwo(ea, eb) as never_two:
            await wait_until(lambda: ea.is_leader or eb.is_leader, 5, "a leader")
            leader_member = "a" if ea.is_leader else "b"
            leader = by_member[leader_member]
            other = by_member["b" if leader_member == "a" else "a"]
            assert await etcd.get(LEADER_KEY) == leader_member.encode()
            assert not other.is_leader and not other.elected.is_set()

            resigned = time.monotonic()
            await leader.stop()
            assert not leader.is_leader
            await wait_until(lambda: other.is_leader, 1.0, "the other candidate to lead",
                             interval=0.002)
            took = time.monotonic() - resigned
            print(f"\nresign -> the other leads after {took * 1000:.1f} ms")
            assert await etcd.get(LEADER_KEY) != leader_member.encode()
        print(f"never two leaders: {never_two.samples} samples")
        assert never_two.violations == 0


async def test_a_killed_leader_is_replaced_after_its_lease_ttl(
        etcd: EtcdServer, tmp_path: Path) -> None:
    ttl = 2.0
    async with child(etcd, tmp_path, "leader", "victim", ttl=ttl) as proc, \
            session_on(etcd.endpoint, "b", ttl=2, timeout=1.0) as sb:
        assert await etcd.get(LEADER_KEY) == b"victim"
        tried = failed_creates(sb.conn)
        async with campaigning(sb) as eb:
            await asyncio.wait_for(tried.wait(), 5)  # b found the key taken
            assert not eb.is_leader
            killed = sigkill(proc)
            await wait_until(lambda: eb.is_leader, ttl + 2, "b to lead after the kill",
                             interval=0.005)
            took = time.monotonic() - killed
            print(f"\nSIGKILLed leader (lease TTL {ttl:g}s): b leads after {took:.2f}s")
            assert took > 1.0  # not before the killed leader's lease could have expired
            assert await etcd.get(LEADER_KEY) == b"b"


async def test_a_leader_that_cannot_reach_etcd_stops_leading(etcd: EtcdServer) -> None:
    ttl = 2
    async with session_on(etcd.endpoint, "a", ttl=ttl, timeout=1.0) as sa, \
            session_on(etcd.endpoint, "b", ttl=ttl, timeout=1.0) as sb, \
            campaigning(sa) as ea:
        await wait_until(lambda: ea.is_leader, 5, "a to lead")
        async with campaigning(sb) as eb, NeverTwo(ea, eb) as never_two:
            etcd.pause()
            try:
                paused = time.monotonic()
                await wait_until(lambda: not ea.is_leader, ttl + 1, "a to stop leading",
                                 interval=0.01)
                stepped_down = time.monotonic() - paused
                assert not eb.is_leader
            finally:
                etcd.resume()
            resumed = time.monotonic()
            print(f"\netcd frozen: the leader stepped down after {stepped_down:.2f}s "
                  f"(TTL {ttl}s)", end="")
            assert stepped_down <= ttl + 0.5
            await wait_until(lambda: ea.is_leader or eb.is_leader, 15,
                             "a leader once etcd answers again", interval=0.01)
            leader = "a" if ea.is_leader else "b"
            print(f"; {leader} leads {time.monotonic() - resumed:.2f}s after etcd resumed")
            assert await etcd.get(LEADER_KEY) == leader.encode()
        assert never_two.violations == 0


# --- activator registry -----------------------------------------------------------------------


class Followed:
    """What a follower's listener was told, latest last."""

    def __init__(self) -> None:
        self.told: list[tuple[float, dict[str, Activator]]] = []

    def __call__(self, members: dict[str, Activator]) -> None:
        self.told.append((time.monotonic(), members))

    @property
    def now(self) -> dict[str, Activator] | None:
        return self.told[-1][1] if self.told else None


@contextlib.asynccontextmanager
async def following(session: EtcdSession) -> AsyncIterator[Followed]:
    registry = ActivatorRegistry(session)
    followed = Followed()
    await registry.follow(followed)
    try:
        yield followed
    finally:
        await registry.stop()


HTTP1, H2 = Endpoint("127.0.0.1", 18080), Endpoint("127.0.0.1", 18081)


async def test_a_registration_is_followed_and_goes_with_its_lease(etcd: EtcdServer) -> None:
    async with session_on(etcd.endpoint, "control", ttl=2, timeout=1.0) as sc, \
            following(sc) as followed:
        assert followed.now == {}
        async with session_on(etcd.endpoint, "act-1", ttl=2, timeout=1.0) as sa:
            registry = ActivatorRegistry(sa)
            await registry.register(HTTP1, H2)
            await wait_until(lambda: followed.now == {"act-1": (HTTP1, H2)}, 2,
                             "the follower to see the activator")

            closed = time.monotonic()
            await sa.close()  # a clean stop: the lease is revoked, the key goes with it
            await wait_until(lambda: followed.now == {}, 2, "the follower to see it gone",
                             interval=0.002)
            took = time.monotonic() - closed
            print(f"\nrevoked activator dropped out of the follower's set after "
                  f"{took * 1000:.1f} ms")
            assert took < 1.0
            await registry.stop()
        assert await etcd.keys(PREFIX + "activators/") == {}


async def test_an_activator_finds_another_by_name(etcd: EtcdServer) -> None:
    """The look-up behind a status request of an asynchronous call kept by another replica
    (activator/async_owners.py): the registered HTTP/1 address, None once it is gone, and
    None for a value that is not a registration."""
    async with session_on(etcd.endpoint, "act-0", ttl=2, timeout=1.0) as s0:
        finder = ActivatorRegistry(s0)
        assert await finder.http_address("act-1") is None
        async with session_on(etcd.endpoint, "act-1", ttl=2, timeout=1.0) as s1:
            registry = ActivatorRegistry(s1)
            await registry.register(HTTP1, H2)
            assert await finder.http_address("act-1") == HTTP1
            await registry.stop()  # deregistered: gone at once
            assert await finder.http_address("act-1") is None
            await s1.conn.call("put", s1.conn.kv.Put, rpc.PutRequest(
                key=s1.conn.key("activators", "act-2"), value=b"not json"))
            assert await finder.http_address("act-2") is None


async def test_a_killed_activator_drops_out_after_its_lease_ttl(
        etcd: EtcdServer, tmp_path: Path) -> None:
    ttl = 2.0
    async with session_on(etcd.endpoint, "control", ttl=2, timeout=1.0) as sc, \
            following(sc) as followed, \
            child(etcd, tmp_path, "activator", "victim", ttl=ttl) as proc:
        expected = {"victim": (Endpoint("127.0.0.1", 1001), Endpoint("127.0.0.1", 1002))}
        await wait_until(lambda: followed.now == expected, 2, "the follower to see it")
        killed = sigkill(proc)
        await wait_until(lambda: followed.now == {}, ttl + 2, "the killed activator to go",
                         interval=0.005)
        took = time.monotonic() - killed
        print(f"\nSIGKILLed activator (lease TTL {ttl:g}s) dropped out after {took:.2f}s")
        assert took > 1.0


async def test_a_lost_lease_is_granted_again_and_the_registration_put_back(
        etcd: EtcdServer) -> None:
    """etcd forgot the lease (expired during a long outage; here revoked behind the
    session's back): the keep-alive notices, a new lease is granted, listeners are told,
    and the registry puts the activator back on the new lease."""
    async with session_on(etcd.endpoint, "control", ttl=2, timeout=1.0) as sc, \
            following(sc) as followed, \
            session_on(etcd.endpoint, "act-1", ttl=2, timeout=1.0) as sa:
        registry = ActivatorRegistry(sa)
        try:
            await registry.register(HTTP1, H2)
            await wait_until(lambda: followed.now == {"act-1": (HTTP1, H2)}, 2,
                             "the follower to see the activator")
            renewed: list[int] = []
            sa.on_new_lease(renewed.append)
            old = await sa.lease_id()
            await sa.conn.call("revoke", sa.conn.lease.LeaseRevoke,
                               rpc.LeaseRevokeRequest(ID=old))
            lost = time.monotonic()
            await wait_until(lambda: followed.now == {}, 2, "the registration to go")
            await wait_until(lambda: followed.now == {"act-1": (HTTP1, H2)}, sa.ttl + 2,
                             "the registration to be put back", interval=0.005)
            took = time.monotonic() - lost
            print(f"\nlost lease: registration back on a new lease after {took:.2f}s")
            new = await sa.lease_id()
            assert new != old and renewed == [new]
            assert sa.valid
            assert sorted(await etcd.lease_ids()) == sorted([await sc.lease_id(), new])
        finally:
            await registry.stop()


# --- the session lease ------------------------------------------------------------------------


class SlowGrants:
    """The lease stub, with LeaseGrant answering `delay` seconds late (a slow etcd)."""

    def __init__(self, stub: Any, delay: float) -> None:
        self._stub = stub
        self._delay = delay
        self.called = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    async def LeaseGrant(self, request: Any, timeout: float | None = None) -> Any:
        self.called.set()
        await asyncio.sleep(self._delay)
        return await self._stub.LeaseGrant(request, timeout=timeout)


async def test_a_regrant_racing_a_lease_request_leaves_one_lease(etcd: EtcdServer) -> None:
    """The keep-alive re-grants under the session's lock: a lease_id() meanwhile waits for
    that lease instead of granting a second one, which listeners (the registry) would not
    be told of, or be told of the one the session then drops."""
    async with session_on(etcd.endpoint, "a", ttl=2, timeout=2.0) as sa:
        renewed: list[int] = []
        sa.on_new_lease(renewed.append)
        old = await sa.lease_id()
        slow = SlowGrants(sa.conn.lease, 0.3)
        sa.conn.lease = slow
        await sa.conn.call("revoke", sa.conn.lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=old))
        await asyncio.wait_for(slow.called.wait(), 5)  # the keep-alive is granting anew
        got = await sa.lease_id()  # a wake asks for the lease meanwhile
        await wait_until(lambda: bool(renewed), 5, "listeners to be told of the new lease")
        assert got == await sa.lease_id() == renewed[-1]
        assert await etcd.lease_ids() == [got]


async def test_close_ends_the_keep_alive_even_as_its_call_fails(etcd: EtcdServer) -> None:
    """etcd frozen: the keep-alive's call and a wake's call both time out in the same turn
    of the loop; the wake's failure leads straight to a shutdown (close in that same turn).
    close() must return (it revokes with a 2s timeout); the bound is 3s."""
    closes: list[float] = []
    for _ in range(10):
        conn = EtcdConnection([etcd.endpoint], PREFIX, timeout=0.5)
        await conn.open()
        session = EtcdSession(conn, 10, "a")
        try:
            lease = await session.lease_id()  # the keep-alive's first call starts next turn
            etcd.pause()
            try:
                await conn.create(conn.key("x"), b"a", lease)  # same deadline as that call
            except StoreUnavailableError:
                pass
            finally:
                etcd.resume()
            started = time.monotonic()
            # A hang shows as 3s: the time-out's cancel reaches the keep-alive a second
            # time (close() suppresses that CancelledError, so no TimeoutError here).
            async with asyncio.timeout(3):
                await session.close()
            closes.append(time.monotonic() - started)
        finally:
            await session.close()
            await conn.close()
        if closes[-1] > 2.5:
            break
    print(f"\nclose() after a shared time-out: {[round(c, 2) for c in closes]} s")
    assert max(closes) < 2.5
