"""Changing services at run time: the reload plan (pure: old config, new config → what
changes), ServiceChanges on a real catalog, and registrations kept in the sqlite and the
etcd store (a restarted control plane, and a second one of a fleet, find them)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.etcd import EtcdServer
from torpor.catalog import CONFIG, REGISTERED, ServiceCatalog
from torpor.config import Config, ServiceConfig, load_config, load_service
from torpor.errors import AlreadyExistsError, ConfigError, InvalidArgumentError, UnknownServiceError
from torpor.etcd.connection import EtcdConnection
from torpor.registrations import Registrations
from torpor.reload import ReloadPlan, ServiceChanges, applied, plan_reload, without_refused
from torpor.store.base import Store
from torpor.store.etcd import EtcdStore
from torpor.store.sqlite import SqliteStore

BASE = """
gateway: {listen: 127.0.0.1:8080}
policy: {idle_after: 10m}
services:
  - name: a
    host: a.localhost
    local: {command: [python, -m, model, --port, "{port}"]}
  - name: b
    host: b.localhost
    local: {command: [python, -m, model, --port, "{port}"]}
"""


def config_of(tmp_path: Path, text: str, name: str = "torpor.yaml") -> Config:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


def test_nothing_changed_plans_nothing(tmp_path: Path) -> None:
    old = config_of(tmp_path, BASE)
    plan = plan_reload(old, config_of(tmp_path, BASE, "again.yaml"))
    assert plan == ReloadPlan()
    assert not plan.applies_anything and plan.summary() == "nothing changed"


def test_services_added_removed_changed_and_replaced(tmp_path: Path) -> None:
    old = config_of(tmp_path, BASE)
    new = config_of(tmp_path, BASE
                    .replace("name: b\n    host: b.localhost", "name: c\n    host: c.localhost")
                    .replace("host: a.localhost", "host: a2.localhost")
                    + "  - name: d\n    host: d.localhost\n"
                      "    local: {command: [python, -m, other, --port, '{port}']}\n",
                    "new.yaml")
    plan = plan_reload(old, new)
    assert [s.name for s in plan.added] == ["c", "d"]
    assert plan.removed == ("b",)
    assert [s.host for s in plan.changed] == ["a2.localhost"]
    assert plan.replaced == ()  # a host change moves the route, not the replicas
    assert plan.summary() == "added: c, d; removed: b; changed: a"


def test_a_changed_command_replaces_replicas_other_local_keys_do_not(tmp_path: Path) -> None:
    old = config_of(tmp_path, BASE)
    command = config_of(tmp_path, BASE.replace("model, --port", "model2, --port", 1), "c.yaml")
    grace = config_of(tmp_path, BASE.replace('"{port}"]}', '"{port}"], stop_grace: 1s}', 1),
                      "g.yaml")
    assert plan_reload(old, command).replaced == ("a",)
    assert plan_reload(old, command).summary() == "changed: a (replicas replaced)"
    assert plan_reload(old, grace).replaced == ()
    assert [s.name for s in plan_reload(old, grace).changed] == ["a"]


def test_fixed_settings_need_a_restart_and_keep_their_value_policy_applies(
        tmp_path: Path) -> None:
    old = config_of(tmp_path, BASE)
    new = config_of(tmp_path, BASE.replace("8080", "8081").replace("10m", "20m")
                    .replace("policy:", "activator: {wake_timeout: 10s}\npolicy:"), "n.yaml")
    plan = plan_reload(old, new)
    assert plan.needs_restart == ("gateway.listen", "activator.wake_timeout")
    assert plan.live == ("policy.idle_after",)
    assert "needs a restart: gateway.listen, activator.wake_timeout" in plan.summary()
    running = applied(old, new, plan)
    assert running.gateway == old.gateway and running.activator == old.activator
    assert running.policy.idle_after == 1200.0


def test_another_workloads_kind_applies_no_service(tmp_path: Path) -> None:
    old = config_of(tmp_path, BASE)
    new = config_of(tmp_path, """
workloads: {kind: kubernetes}
services:
  - name: k
    host: k.localhost
    kubernetes: {namespace: m, deployment: k, port: 80}
""", "k.yaml")
    plan = plan_reload(old, new)
    assert not plan.added and not plan.removed
    assert plan.needs_restart[-1] == "services" and "workloads.kind" in plan.needs_restart
    assert applied(old, new, plan).services == old.services


def test_a_registered_spec_gets_the_config_checks_and_words(tmp_path: Path) -> None:
    config = config_of(tmp_path, BASE)
    service = load_service({"name": "r", "host": "r.localhost", "replicas": 2,
                            "local": {"command": ["python", "x", "{port}"]}}, "reg", config)
    assert service.replicas == 2 and service.local is not None
    assert service.local.cwd == tmp_path  # relative to the config file's folder
    with pytest.raises(ConfigError) as info:
        load_service({"name": "r", "host": "r.localhost"}, "registered service 'r'", config)
    assert str(info.value) == ("registered service 'r': local: missing; workloads.kind is "
                               "local, so each service needs a local: block")


# --- effects ------------------------------------------------------------------------------


class FakeWorkloads:
    """What ServiceChanges asks of the workloads, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def put_service(self, service: ServiceConfig) -> None:
        self.calls.append(("put", service.name))

    async def drop_service(self, name: str) -> None:
        self.calls.append(("drop", name))


@dataclasses.dataclass
class Parts:
    catalog: ServiceCatalog
    workloads: FakeWorkloads
    pushes: list[tuple[str, ...]]
    changes: ServiceChanges


def parts(config: Config) -> Parts:
    catalog = ServiceCatalog(config.services)
    workloads = FakeWorkloads()
    pushes: list[tuple[str, ...]] = []

    async def routed() -> None:
        pushes.append(tuple(s.name for s in catalog.services()))

    return Parts(catalog, workloads, pushes, ServiceChanges(catalog, workloads, routed))  # type: ignore[arg-type]


async def test_a_removed_service_leaves_envoy_before_its_replicas_stop(
        tmp_path: Path) -> None:
    old = config_of(tmp_path, BASE)
    new = config_of(tmp_path, BASE.replace("name: b\n    host: b.localhost",
                                           "name: c\n    host: b.localhost"), "n.yaml")
    p = parts(old)

    async def displace(name: str) -> None:
        raise AssertionError(name)

    problems = await p.changes.apply(plan_reload(old, new), displace)

    assert problems == {}
    assert p.pushes == [("a",)]  # pushed without b, before b's replicas were dropped
    assert p.workloads.calls == [("drop", "b"), ("put", "c")]
    assert [s.name for s in p.catalog.services()] == ["a", "c"]  # b's host reused by c


async def test_a_host_a_discovered_service_has_is_refused_and_tried_again_later(
        tmp_path: Path) -> None:
    old = config_of(tmp_path, BASE)
    new = config_of(tmp_path, BASE.replace("host: a.localhost", "host: k.localhost")
                    + "  - name: c\n    host: k2.localhost\n"
                      "    local: {command: [python, -m, m, '{port}']}\n", "n.yaml")
    p = parts(old)
    for name, host in (("k", "k.localhost"), ("k2", "k2.localhost")):
        p.catalog.put(dataclasses.replace(old.services[0], name=name, host=host),
                      "deployment/models/" + name)

    async def displace(name: str) -> None:
        raise AssertionError(name)

    plan = plan_reload(old, new)
    refused = await p.changes.apply(plan, displace)

    assert set(refused) == {"a", "c"}
    assert "host 'k.localhost' is already used by service 'k'" in refused["a"]
    running = without_refused(old, applied(old, new, plan), refused)
    assert running.services == old.services  # a as it was, c not there: tried next time
    assert plan_reload(running, new).changed == plan.changed


# --- registrations in the store -----------------------------------------------------------


@contextlib.asynccontextmanager
async def sqlite_store(tmp_path: Path, etcd: Any) -> AsyncIterator[Store]:
    store = SqliteStore(tmp_path / "state.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def etcd_store(tmp_path: Path, etcd: EtcdServer) -> AsyncIterator[Store]:
    conn = EtcdConnection([etcd.endpoint], "/torpor-reg/", 5.0)
    store = EtcdStore(conn, "m")
    await store.open()
    try:
        yield store
    finally:
        await store.close()
        await conn.close()


SPEC = {"name": "r", "host": "r.localhost",
        "local": {"command": ["python", "-m", "model", "--port", "{port}"]}}


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest) -> Any:
    return sqlite_store if request.param == "sqlite" else etcd_store


@pytest.fixture
def etcd_or_none(request: pytest.FixtureRequest, backend: Any) -> Any:
    return request.getfixturevalue("etcd") if backend is etcd_store else None


async def test_registrations_are_kept_in_the_store_and_the_config_wins(
        tmp_path: Path, backend: Any, etcd_or_none: Any) -> None:
    config = config_of(tmp_path, BASE)
    async with backend(tmp_path, etcd_or_none) as store:
        p = parts(config)
        registrations = Registrations(config, store, p.catalog, p.changes)
        await registrations.load()

        service = await registrations.register(dict(SPEC))
        assert service.name == "r" and p.catalog.source("r") == REGISTERED
        with pytest.raises(AlreadyExistsError, match=r"is in the config file .*config wins"):
            await registrations.register({**SPEC, "name": "a", "host": "x.localhost"})
        with pytest.raises(AlreadyExistsError, match=r"host .a\.localhost. is already used"):
            await registrations.register({**SPEC, "name": "s", "host": "a.localhost"})
        with pytest.raises(InvalidArgumentError, match="replicas"):
            await registrations.register({**SPEC, "replicas": -1})
        with pytest.raises(InvalidArgumentError, match="comes from the config file"):
            await registrations.unregister("a")
        with pytest.raises(UnknownServiceError):
            await registrations.unregister("nobody")

        # A restarted control plane (a fresh catalog over the same store) finds it.
        again = parts(config)
        await Registrations(config, store, again.catalog, again.changes).load()
        assert again.catalog.source("r") == REGISTERED
        assert again.workloads.calls == [("put", "r")]

        # A config that now has the name wins: the registration is deleted.
        taken = config_of(tmp_path, BASE + "  - name: r\n    host: r2.localhost\n"
                          "    local: {command: [python, -m, m, '{port}']}\n", "t.yaml")
        third = parts(taken)
        await Registrations(taken, store, third.catalog, third.changes).load()
        assert third.catalog.source("r") == CONFIG
        assert await store.load_documents("registered") == {}


async def test_a_second_control_plane_follows_registrations_by_sync(
        tmp_path: Path, backend: Any, etcd_or_none: Any) -> None:
    config = config_of(tmp_path, BASE)
    async with backend(tmp_path, etcd_or_none) as store:
        one, two = parts(config), parts(config)
        first = Registrations(config, store, one.catalog, one.changes)
        second = Registrations(config, store, two.catalog, two.changes)
        await first.register(dict(SPEC))
        assert await second.sync() == []
        assert two.catalog.source("r") == REGISTERED
        await first.unregister("r")
        await second.sync()
        assert "r" not in two.catalog
        assert two.workloads.calls == [("put", "r"), ("drop", "r")]
