"""A service registered through one control plane of a fleet (etcd, Kubernetes workloads
on the fake API): the other control plane and the activators, which wake services
themselves, find it in etcd, so it is served, put to sleep and woken through the fleet;
unregistered, it is gone everywhere."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.support.etcd import EtcdServer
from tests.support.fake_kube import FakeKube
from tests.support.fleet import NS, Fleet, send
from tests.support.kube_objects import PORT, kube_service_yaml, model_deployment, model_service
from tests.support.net import wait_until
from torpor import admin_client
from torpor.config import load_config
from torpor.credentials import AdminTarget, admin_target

pytestmark = pytest.mark.envoy


def names(target: AdminTarget) -> set[str]:
    return {str(s["name"]) for s in admin_client.list_statuses(target)}


async def test_a_registration_reaches_every_member_of_the_fleet(
        tmp_path: Path, etcd: EtcdServer, kube: FakeKube) -> None:
    for name in ("busy", "reg"):
        kube.create(model_deployment(name, NS, replicas=1))
        kube.create(model_service(name, NS))
    await asyncio.to_thread(kube.wait_for, lambda: len(kube.pod_processes(NS)) == 2)
    fleet = Fleet(tmp_path, etcd, kube, kube_service_yaml("busy", NS), activators=2)
    try:
        await fleet.start()
        cp0, cp1 = (admin_target(load_config(path)) for path in fleet.cp_configs)
        spec = {"kubernetes": {"namespace": NS, "deployment": "reg", "port": PORT}}
        status = await asyncio.to_thread(admin_client.register, cp0, "reg", "reg.localhost",
                                         spec)
        assert status["name"] == "reg" and status["host"] == "reg.localhost"
        await wait_until(lambda: asyncio.to_thread(lambda: "reg" in names(cp1)), 15,
                         "the other control plane has reg")
        async with aiohttp.ClientSession() as session:
            async def served() -> bool:
                return (await send(session, fleet, "reg.localhost"))[0] == 200

            await wait_until(served, 30, "reg served through Envoy")
            await asyncio.to_thread(admin_client.hibernate, cp0, "reg", 60)
            await fleet.wait_state("reg", "HIBERNATED", 30)
            # Held by an activator, which knows reg only from etcd, and woken.
            code, _, _ = await send(session, fleet, "reg.localhost")
            assert code == 200
            await fleet.wait_state("reg", "ACTIVE", 30)

        await asyncio.to_thread(admin_client.unregister, cp0, "reg")
        await wait_until(lambda: asyncio.to_thread(lambda: "reg" not in names(cp1)), 15,
                         "reg gone from the other control plane")
        assert names(cp0) == {"busy"}
    finally:
        problems = await fleet.stop()
    assert not problems, problems
