"""Asynchronous calls in a fleet: 1 control plane and 2 activators on a real etcd, each
activator with its own folder of calls, one real Envoy balancing over both, Kubernetes
workloads on the fake API (a real pod process).

The promise under test: a call's status and result can be fetched through any activator
replica (the one that does not keep it asks the owner it finds in etcd's registry), and
once the owner is gone the answer says so (503 + Retry-After while it is still
registered, then 404 `unknown_call`), never a hang. One process: tests/integration/
test_async_calls.py; the forwarding itself with a fake registry:
tests/activator/test_async_owners.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import pytest

from activator.async_owners import owner_of
from tests.support.etcd import EtcdServer
from tests.support.fake_kube import FakeKube
from tests.support.fleet import NS, Fleet, send
from tests.support.kube_objects import kube_service_yaml, model_deployment, model_service
from tests.support.net import wait_until

pytestmark = pytest.mark.envoy

HOST = "busy.localhost"
CALLS = 12
TIMEOUT = aiohttp.ClientTimeout(total=20)


async def _submit(session: aiohttp.ClientSession, fleet: Fleet, body: bytes) -> tuple[int, str]:
    async with session.post(f"http://127.0.0.1:{fleet.listen}/echo", data=body,
                            headers={"Host": HOST, "Prefer": "respond-async"},
                            timeout=TIMEOUT) as r:
        await r.read()
        return r.status, r.headers.get("Location", "")


async def _get(session: aiohttp.ClientSession, port: int, location: str
               ) -> tuple[int, bytes, dict[str, str]]:
    """A GET of `location` at 127.0.0.1:port (Envoy's listener or one activator's)."""
    async with session.get(f"http://127.0.0.1:{port}{location}", headers={"Host": HOST},
                           timeout=TIMEOUT) as r:
        return r.status, await r.read(), dict(r.headers)


async def test_a_call_is_fetched_through_any_activator(
        tmp_path: Path, etcd: EtcdServer, kube: FakeKube) -> None:
    kube.create(model_deployment("busy", NS, replicas=1))
    kube.create(model_service("busy", NS))
    await asyncio.to_thread(kube.wait_for, lambda: len(kube.pod_processes(NS)) == 1)
    fleet = Fleet(tmp_path, etcd, kube, kube_service_yaml("busy", NS), control_planes=1,
                  activators=2)
    act = {p.name: fleet.ports(c)["act"] for p, c in
           zip(fleet.activators, fleet.act_configs, strict=True)}
    try:
        await fleet.start()
        async with aiohttp.ClientSession() as session:
            async def served() -> bool:
                return (await send(session, fleet, HOST, timeout=10))[0] == 200

            await wait_until(served, 30, "busy served through Envoy")
            bodies = [os.urandom(500 + 37 * i) for i in range(CALLS)]
            submitted = await asyncio.gather(*(_submit(session, fleet, b) for b in bodies))
            assert [status for status, _ in submitted] == [202] * CALLS
            locations = [location for _, location in submitted]
            owners = [owner_of(loc.rpartition("/")[2]) for loc in locations]
            print(f"\n{CALLS} calls taken by: "
                  f"{ {name: owners.count(name) for name in sorted(act)} }")
            assert set(owners) <= set(act), owners  # every id names its replica

            # Through Envoy, which balances status requests over both activators.
            results: dict[str, tuple[int, bytes]] = {}

            async def all_done() -> bool:
                for location in locations:
                    if location not in results:
                        status, body, _ = await _get(session, fleet.listen, location)
                        if status != 202:
                            results[location] = (status, body)
                return len(results) == CALLS

            await wait_until(all_done, 60, "every call done", interval=0.2)
            assert [results[loc] for loc in locations] == [(200, b) for b in bodies]

            # At each replica directly: the one that does not keep a call fetches it from
            # the owner, so both answer every call with its own result.
            for location, body in zip(locations, bodies, strict=True):
                for name, port in act.items():
                    status, got, _ = await _get(session, port, location)
                    assert (status, got) == (200, body), (name, location, status, got[:200])
            for proc, config in zip(fleet.activators, fleet.act_configs, strict=True):
                relayed = await fleet.metric(fleet.ports(config)["actm"],
                                             "torpor_activator_async_status_forwards_total",
                                             outcome="relayed")
                not_owned = sum(1 for owner in owners if owner != proc.name)
                assert relayed >= not_owned, (proc.name, relayed, not_owned)

            # The owner of the first call dies (SIGKILL: no deregistration, its lease runs
            # out after store.lease_ttl): the other replica answers 503 + Retry-After while
            # the dead one is still registered, then 404 unknown_call, each at once.
            victim = next(p for p in fleet.activators if p.name == owners[0])
            survivor = next(name for name in act if name != victim.name)
            victim.kill()
            seen: list[int] = []

            async def gone() -> bool:
                status, body, headers = await _get(session, act[survivor], locations[0])
                registered = await etcd.get(f"/torpor/activators/{victim.name}") is not None
                seen.append(status)
                if registered:  # still registered after the answer: it was when asked
                    assert status == 503 and headers.get("Retry-After") == "2", (status, body)
                    assert json.loads(body)["error"] == "async_owner_unreachable"
                    return False
                if status == 404:
                    answer = json.loads(body)
                    assert answer["error"] == "unknown_call", answer
                    assert victim.name in answer["message"] and "gone" in answer["message"]
                    return True
                assert status == 503, (status, body)  # asked just before the lease ran out
                return False

            await wait_until(gone, 30, f"{victim.name}'s calls answered as gone",
                             interval=0.2)
            print(f"after SIGKILL of {victim.name}: answers {seen}")
            # The survivor's own calls are still served, through Envoy too.
            for location, body, owner in zip(locations, bodies, owners, strict=True):
                if owner == survivor:
                    assert (await _get(session, fleet.listen, location))[:2] == (200, body)
    finally:
        problems = await fleet.stop()
    assert not problems, problems
