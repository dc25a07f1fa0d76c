"""The service catalog: config services win clashes, changes reach listeners once."""

from __future__ import annotations

import socket

import pytest

from torpor.advertise import advertised_activator_host
from torpor.catalog import CatalogChange, CatalogConflictError, ServiceCatalog
from torpor.config import ActivatorConfig, Address, ServiceConfig
from torpor.errors import TorporError


def svc(name: str, host: str | None = None) -> ServiceConfig:
    return ServiceConfig(name=name, host=host or f"{name}.localhost")


def test_lookup_by_name_and_host_header() -> None:
    catalog = ServiceCatalog([svc("a"), svc("b")])
    assert [s.name for s in catalog.services()] == ["a", "b"]
    assert catalog.by_host("A.localhost:8080") == svc("a")  # port and case ignored
    assert catalog.by_host("a.localhost.") == svc("a")
    assert catalog.by_host("nobody.localhost") is None
    assert catalog.source("a") == "config"


def test_discovered_services_come_change_and_go() -> None:
    catalog = ServiceCatalog([svc("a")])
    changes: list[CatalogChange] = []
    catalog.add_listener(changes.append)
    assert catalog.put(svc("d", "d.example"), "deployment/ns/d")
    assert not catalog.put(svc("d", "d.example"), "deployment/ns/d")  # same: no event
    assert catalog.put(svc("d", "d2.example"), "deployment/ns/d")
    assert catalog.by_host("d.example") is None and catalog.by_host("d2.example") is not None
    assert catalog.remove("d", "deployment/ns/d")
    assert [(c.name, c.before is not None, c.after is not None) for c in changes] == [
        ("d", False, True), ("d", True, True), ("d", True, False)]


def test_clashes_are_refused_and_change_nothing() -> None:
    catalog = ServiceCatalog([svc("a")])
    with pytest.raises(CatalogConflictError, match="name 'a' is already used by config"):
        catalog.put(svc("a", "other.example"), "deployment/ns/a")
    with pytest.raises(CatalogConflictError, match=r"host 'a\.localhost' is already used"):
        catalog.put(svc("x", "a.localhost"), "deployment/ns/x")
    assert catalog.services() == (svc("a"),)
    assert not catalog.remove("a", "deployment/ns/a")  # config services are never removed


def test_a_failing_listener_does_not_hide_the_change_from_others() -> None:
    catalog = ServiceCatalog()
    seen: list[str] = []

    def broken(change: CatalogChange) -> None:
        raise RuntimeError("boom")

    catalog.add_listener(broken)
    catalog.add_listener(lambda change: seen.append(change.name))
    catalog.put(svc("d"), "deployment/ns/d")
    assert seen == ["d"]


def activator(advertise: str | None, listen: str = "0.0.0.0") -> ActivatorConfig:
    return ActivatorConfig(listen=Address(listen, 18080), metrics=Address(listen, 19091),
                           advertise=advertise)


def test_the_activator_is_advertised_by_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    assert advertised_activator_host(activator(None, "127.0.0.1")) == "127.0.0.1"
    assert advertised_activator_host(activator(None)) == "127.0.0.1"  # wildcard: this host
    assert advertised_activator_host(activator("10.1.2.3")) == "10.1.2.3"
    expected = socket.getaddrinfo("localhost", 0, socket.AF_INET)[0][4][0]
    assert advertised_activator_host(activator("localhost")) == expected

    def unresolvable(*args: object, **kwargs: object) -> None:  # no DNS query leaves the host
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    with pytest.raises(TorporError, match=r"activator\.advertise: cannot resolve 'torpor-act"):
        advertised_activator_host(activator("torpor-activator"))
