"""EtcdLocks against a real etcd: mutual exclusion between processes, hand-off, time-outs,
a SIGKILLed holder, etcd going away at release and at acquire, and 1,000 contended wakes
that must leave no lease behind.

A "process" is an EtcdConnection plus an EtcdSession (one lease) with its own member
name; where a process must die without revoking its lease, it is a real child process
(`python -c`, the real classes) killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aetcd import rpc

from tests.support.etcd import EtcdServer
from tests.support.net import wait_until
from tests.support.workloads import SimulatedWorkloads
from torpor.errors import WakeFailedError
from torpor.etcd.connection import EtcdConnection, StoreUnavailableError
from torpor.etcd.session import EtcdSession
from torpor.lifecycle.records import change_state
from torpor.lifecycle.wake import Waker
from torpor.locks import LockTimeoutError, lock_key
from torpor.locks.etcd import EtcdLocks
from torpor.model import ServiceRecord, ServiceState
from torpor.store.etcd import EtcdStore

S = ServiceState
PREFIX = "/torpor-test/"
REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def session_on(endpoint: str, member: str, ttl: float = 10.0, timeout: float = 2.0,
                     ) -> AsyncIterator[EtcdSession]:
    """One process's connection and lease (granted now); revoked and closed afterwards."""
    conn = EtcdConnection([endpoint], PREFIX, timeout)
    await conn.open()
    session = EtcdSession(conn, ttl, member)
    try:
        await session.lease_id()
        yield session
    finally:
        await session.close()
        await conn.close()


def failed_creates(conn: EtcdConnection) -> asyncio.Event:
    """An event set whenever a create on `conn` finds the key taken (a waiter is waiting)."""
    original = conn.create
    waiting = asyncio.Event()

    async def create(key: bytes, value: bytes, lease: int) -> tuple[bool, object]:
        created, response = await original(key, value, lease)
        if not created:
            waiting.set()
        return created, response

    conn.create = create  # type: ignore[method-assign]
    return waiting


CHILD = r"""
import asyncio, sys
from torpor.etcd.connection import EtcdConnection
from torpor.etcd.session import EtcdSession

async def main(endpoint, prefix, role, member, ttl):
    conn = EtcdConnection([endpoint], prefix, timeout=2.0)
    await conn.open()
    session = EtcdSession(conn, float(ttl), member)
    if role == "lock":
        from torpor.locks.etcd import EtcdLocks
        async with EtcdLocks(session).hold("wake/victim", 10):
            print("ready", flush=True)
            await asyncio.Event().wait()
    elif role == "leader":
        from torpor.etcd.election import LeaderElection
        election = LeaderElection(session)
        election.start()
        await election.elected.wait()
        print("ready", flush=True)
        await asyncio.Event().wait()
    elif role == "activator":
        from torpor.etcd.registry import ActivatorRegistry
        from torpor.model import Endpoint
        await ActivatorRegistry(session).register(Endpoint("127.0.0.1", 1001),
                                                  Endpoint("127.0.0.1", 1002))
        print("ready", flush=True)
        await asyncio.Event().wait()
    else:
        raise SystemExit(f"unknown role {role}")

asyncio.run(main(*sys.argv[1:]))
"""


@contextlib.asynccontextmanager
async def child(etcd: EtcdServer, workdir: Path, role: str, member: str, ttl: float = 2.0,
                ) -> AsyncIterator[asyncio.subprocess.Process]:
    """A separate Python process that holds the lock / leads / registers (`role`) on its
    own lease and then waits forever; yielded once it says so. Killed afterwards."""
    err_path = workdir / f"{member}.stderr"
    with err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, etcd.endpoint, PREFIX, role, member, str(ttl),
            stdout=asyncio.subprocess.PIPE, stderr=err, cwd=REPO)
    try:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(30):
                line = await proc.stdout.readline()
        except TimeoutError:
            line = b""
        assert line.strip() == b"ready", \
            f"child {role} {member} did not get ready:\n{err_path.read_text()[-3000:]}"
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def sigkill(proc: asyncio.subprocess.Process) -> float:
    """kill -9 now (no lease revoke, no release); returns the monotonic time of it."""
    proc.send_signal(signal.SIGKILL)
    return time.monotonic()


def lock_path(name: str) -> str:
    return f"{PREFIX}locks/{name}"


# --- mutual exclusion and hand-off -------------------------------------------------------


async def test_two_processes_never_hold_a_lock_together(etcd: EtcdServer) -> None:
    rounds, tasks = 50, 4
    async with session_on(etcd.endpoint, "a") as sa, session_on(etcd.endpoint, "b") as sb:
        locks = [EtcdLocks(sa), EtcdLocks(sb)]
        members = ["a", "b"]
        holders = 0
        most = 0
        done = [0] * tasks
        waits: list[float] = []

        async def worker(i: int) -> None:
            nonlocal holders, most
            for _ in range(rounds):
                asked = time.monotonic()
                async with locks[i % 2].hold("wake/shared", 20):
                    waits.append(time.monotonic() - asked)
                    holders += 1
                    most = max(most, holders)
                    # The key is ours while we hold it (etcd's view, not just ours).
                    kv = await locks[i % 2]._conn.get(locks[i % 2]._conn.key("locks",
                                                                             "wake/shared"))
                    assert kv is not None and kv.value.decode() == members[i % 2]
                    await asyncio.sleep(0.001)
                    holders -= 1
                done[i] += 1

        started = time.monotonic()
        async with asyncio.timeout(60):
            await asyncio.gather(*(worker(i) for i in range(tasks)))
        took = time.monotonic() - started
        print(f"\n{tasks} tasks x {rounds} rounds over 2 sessions: {took:.2f}s, "
              f"wait p50 {statistics.median(waits) * 1000:.1f} ms, "
              f"max {max(waits) * 1000:.0f} ms, most holders at once {most}")
        assert most == 1
        assert done == [rounds] * tasks
        assert await etcd.keys(PREFIX + "locks/") == {}


async def synced_watchers(etcd: EtcdServer) -> int:
    """How many watches etcd is serving with no backlog (from its /metrics)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
            http.get(etcd.client_url + "/metrics") as response:
        text = await response.text()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_slow_watcher_total"):
            values[name] = int(float(value))
    return values["etcd_debugging_mvcc_watcher_total"] - \
        values["etcd_debugging_mvcc_slow_watcher_total"]


async def test_a_waiter_gets_the_lock_right_after_release(etcd: EtcdServer) -> None:
    """Hand-off to a waiter whose watch is in place (a wake waiting on a model load), and
    to one released the moment its first try failed (its watch starts after the delete:
    etcd sends such a watch its backlog from a loop that runs every 100 ms)."""
    async with session_on(etcd.endpoint, "a") as sa, session_on(etcd.endpoint, "b") as sb:
        locks = {"a": EtcdLocks(sa), "b": EtcdLocks(sb)}
        waiting = {"a": failed_creates(sa.conn), "b": failed_creates(sb.conn)}
        handoffs: dict[str, list[float]] = {"watching": [], "racing": []}
        for i in range(20):
            holder, waiter = ("a", "b") if i % 2 == 0 else ("b", "a")
            case = "watching" if i < 10 else "racing"

            async def wait_for_it(who: str = waiter) -> float:
                async with locks[who].hold("wake/echo", 5):
                    return time.monotonic()

            waiting[waiter].clear()
            async with locks[holder].hold("wake/echo", 5):
                task = asyncio.create_task(wait_for_it())
                await asyncio.wait_for(waiting[waiter].wait(), 5)  # it found the key taken
                if case == "watching":
                    await wait_until(lambda: _is(synced_watchers(etcd), 1), 5,
                                     "the waiter's watch to be in place")
                assert not task.done()
                released = time.monotonic()
            handoffs[case].append(await asyncio.wait_for(task, 5) - released)
            await wait_until(lambda: _is(synced_watchers(etcd), 0), 5, "no watch left")

        for case, took in handoffs.items():
            print(f"\nlock hand-off, waiter {case}: p50 {statistics.median(took) * 1000:.1f} ms, "
                  f"max {max(took) * 1000:.1f} ms over {len(took)}", end="")
            assert max(took) < 1.0, (case, took)
        print()
        assert statistics.median(handoffs["watching"]) < 0.05


async def _is(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


async def test_a_waiter_times_out_naming_the_holder(etcd: EtcdServer) -> None:
    async with session_on(etcd.endpoint, "a") as sa, \
            session_on(etcd.endpoint, "b-replica") as sb:
        async with EtcdLocks(sb).hold("wake/echo", 5):
            started = time.monotonic()
            with pytest.raises(LockTimeoutError, match=r"'wake/echo' is held by b-replica"):
                async with EtcdLocks(sa).hold("wake/echo", 0.3):
                    pytest.fail("acquired a lock that is held")
            took = time.monotonic() - started
            assert 0.25 < took < 1.5, took
            assert await etcd.get(lock_path("wake/echo")) == b"b-replica"  # holder keeps it
        assert await etcd.get(lock_path("wake/echo")) is None
        # A time-out costs no lease: still just the two sessions'.
        assert await etcd.lease_count() == 2


async def test_a_killed_holder_frees_the_lock_when_its_lease_expires(
        etcd: EtcdServer, tmp_path: Path) -> None:
    ttl = 2.0
    async with session_on(etcd.endpoint, "b") as sb, \
            child(etcd, tmp_path, "lock", "victim", ttl=ttl) as proc:
        assert await etcd.get(lock_path("wake/victim")) == b"victim"
        waiting = failed_creates(sb.conn)
        locks = EtcdLocks(sb)

        async def take() -> float:
            async with locks.hold("wake/victim", 15):
                assert await etcd.get(lock_path("wake/victim")) == b"b"
                return time.monotonic()

        task = asyncio.create_task(take())
        await asyncio.wait_for(waiting.wait(), 5)
        assert not task.done()
        killed = sigkill(proc)
        took = await asyncio.wait_for(task, 15) - killed
        print(f"\nSIGKILLed holder (lease TTL {ttl:g}s): lock taken over after {took:.2f}s")
        assert 1.0 < took < 6.0


# --- etcd going away ------------------------------------------------------------------------


async def test_a_release_while_etcd_is_down_is_retried_until_it_is_back(
        etcd: EtcdServer) -> None:
    # A long TTL: the key must go by the retried release, not by lease expiry.
    async with session_on(etcd.endpoint, "a", ttl=60, timeout=1.0) as sa:
        locks = EtcdLocks(sa)
        try:
            async with locks.hold("wake/echo", 5):
                assert await etcd.get(lock_path("wake/echo")) == b"a"
                await asyncio.to_thread(etcd.kill)
                leaving = time.monotonic()
            assert time.monotonic() - leaving < 3  # the release neither raised nor hung
            assert locks._releasing, "no release retrying in the background"

            await etcd.start_ready()
            back = time.monotonic()
            await wait_until(_gone(etcd, lock_path("wake/echo")), 20,
                             "the lock key deleted by the retried release", interval=0.05)
            took = time.monotonic() - back
            print(f"\nrelease retried in the background: key deleted {took:.2f}s after "
                  f"etcd was back")
            assert await etcd.lease_ids() == [await sa.lease_id()]  # not by expiry
            await wait_until(lambda: not locks._releasing, 2, "the retry task to finish")
            async with session_on(etcd.endpoint, "b") as sb, \
                    EtcdLocks(sb).hold("wake/echo", 1):
                pass  # free for anyone again
        finally:
            await locks.close()


def _gone(etcd: EtcdServer, key: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return await etcd.get(key) is None
        except Exception:  # etcd not answering yet
            return False
    return check


async def test_an_acquire_with_etcd_down_fails_after_the_grace(etcd: EtcdServer) -> None:
    grace = 1.0
    async with session_on(etcd.endpoint, "a", timeout=1.0) as sa:
        locks = EtcdLocks(sa, unavailable_grace=grace)
        await asyncio.to_thread(etcd.kill)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match=etcd.endpoint):
            async with locks.hold("wake/echo", 30):
                pytest.fail("acquired a lock with etcd down")
        took = time.monotonic() - started
        print(f"\netcd down at acquire: StoreUnavailableError after {took:.2f}s "
              f"(grace {grace:g}s)")
        assert grace * 0.9 < took < grace + 2


async def test_an_acquire_with_etcd_frozen_fails_too(etcd: EtcdServer) -> None:
    """A frozen etcd (SIGSTOP) answers nothing: every try waits for the call timeout."""
    grace, timeout = 1.0, 1.0
    async with session_on(etcd.endpoint, "a", timeout=timeout) as sa:
        locks = EtcdLocks(sa, unavailable_grace=grace)
        etcd.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError, match=etcd.endpoint):
                async with locks.hold("wake/echo", 30):
                    pytest.fail("acquired a lock with etcd frozen")
            took = time.monotonic() - started
        finally:
            etcd.resume()
        print(f"\netcd frozen at acquire: StoreUnavailableError after {took:.2f}s "
              f"(grace {grace:g}s, call timeout {timeout:g}s)")
        assert took < grace + timeout + 1


async def test_an_acquire_with_etcd_frozen_gives_up_after_the_grace(etcd: EtcdServer) -> None:
    grace, timeout = 1.0, 1.0
    async with session_on(etcd.endpoint, "a", timeout=timeout) as sa:
        locks = EtcdLocks(sa, unavailable_grace=grace)
        etcd.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                async with locks.hold("wake/echo", 30):
                    pytest.fail("acquired a lock with etcd frozen")
            took = time.monotonic() - started
        finally:
            etcd.resume()
        assert took < max(grace, timeout) + 0.6, took


async def test_an_acquire_right_after_the_lease_was_lost_takes_a_new_lease(
        etcd: EtcdServer) -> None:
    async with session_on(etcd.endpoint, "a", ttl=10) as sa:
        old = await sa.lease_id()
        # etcd forgets the lease (as after an outage longer than the TTL); the keep-alive
        # (every TTL/3) has not noticed yet when the next wake takes its lock.
        await sa.conn.call("revoke", sa.conn.lease.LeaseRevoke,
                           rpc.LeaseRevokeRequest(ID=old))
        async with EtcdLocks(sa).hold("wake/echo", 5):
            new = await sa.lease_id()
            kv = await sa.conn.get(sa.conn.key("locks", "wake/echo"))
            assert kv is not None and kv.lease == new != old


# --- 1,000 contended wakes, no lease left behind --------------------------------------------


async def test_a_thousand_contended_wakes_leak_no_lease(etcd: EtcdServer) -> None:
    rounds, every = 1_000, 50
    name = "sleepy"
    now = 1_700_000_000.0
    async with session_on(etcd.endpoint, "a", ttl=2) as sa, \
            session_on(etcd.endpoint, "b", ttl=2) as sb:
        leases = sorted([await sa.lease_id(), await sb.lease_id()])
        store_a, store_b = EtcdStore(sa.conn, "a"), EtcdStore(sb.conn, "b")
        # One cluster, two activator processes: the workloads are shared.
        workloads = SimulatedWorkloads({name: 0.0})
        await store_a.open()
        await store_b.open()
        try:
            locks_a, locks_b = EtcdLocks(sa), EtcdLocks(sb)
            waker_a = Waker(store_a, workloads, locks_a, wake_timeout=10)
            waker_b = Waker(store_b, workloads, locks_b, wake_timeout=10)
            impatient = Waker(store_b, workloads, locks_b, wake_timeout=0.05)
            record = await store_a.put(ServiceRecord.new(name, replicas=2, now=now))
            timeouts = 0

            def scale_ups() -> int:
                return sum(1 for _, replicas in workloads.calls if replicas > 0)

            started = time.monotonic()
            for i in range(rounds):
                record = await change_state(store_a, record, S.HIBERNATING, "idle", now + i,
                                            recorded_replicas=2)
                await workloads.scale(name, 0)
                record = await change_state(store_a, record, S.HIBERNATED, "scaled to 0",
                                            now + i)
                before = scale_ups()
                if i % every == every - 1:
                    # Someone else (a reconciler in process a) holds the service lock past
                    # an impatient wake's timeout.
                    async with locks_a.hold(lock_key(name), 5):
                        with pytest.raises(WakeFailedError, match="held by a"):
                            await impatient.wake(name, "impatient")
                    timeouts += 1
                got_a, got_b = await asyncio.gather(waker_a.wake(name, f"round {i}"),
                                                    waker_b.wake(name, f"round {i}"))
                assert len(got_a) == len(got_b) == 2
                assert scale_ups() == before + 1, f"round {i}: {scale_ups() - before} wakes"
                fresh = await store_b.get(name)
                assert fresh is not None and fresh.state is S.ACTIVE, fresh
                record = fresh
            took = time.monotonic() - started

            during = sorted(await etcd.lease_ids())
            print(f"\n{rounds} contended wakes ({timeouts} lock time-outs) in {took:.1f}s "
                  f"({took / rounds * 1000:.1f} ms a round); leases after: {len(during)}")
            assert scale_ups() == rounds
            assert timeouts == rounds // every
            assert await etcd.lease_count() == 2
            assert during == leases  # the same two, kept alive all along (TTL 2s)
            assert await etcd.keys(PREFIX + "locks/") == {}
            assert [t.to_state for t in record.history[-4:]] == [
                S.HIBERNATING, S.HIBERNATED, S.WAKING, S.ACTIVE]
        finally:
            await store_a.close()
            await store_b.close()
            await workloads.close()
    left = await etcd.lease_count()
    print(f"leases after both sessions closed: {left}")
    assert left == 0
