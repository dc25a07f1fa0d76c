"""Which service a request reaches (torpor/routes.py), as a table; the config's errors for
hosts and paths; and the catalog following the same rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor.catalog import CatalogConflictError, ServiceCatalog
from torpor.config import ServiceConfig, load_config
from torpor.errors import ConfigError
from torpor.routes import Routes, RouteTable
from torpor.workloads.annotations import AnnotationError, service_from_deployment

TABLE = RouteTable([
    Routes("api", ("api.example.com",)),
    Routes("sentiment", ("api.example.com",), ("/v1/models/sentiment",)),
    Routes("models", ("api.example.com",), ("/v1/models",)),
    Routes("tenants", ("*.tenants.example.com",)),
    Routes("acme", ("acme.tenants.example.com", "acme.test")),
    Routes("docs", ("*.example.com",), ("/docs",)),
])


@pytest.mark.parametrize(("host", "path", "expected"), [
    ("api.example.com", "/", "api"),
    ("api.example.com", "/v1/models/sentiment", "sentiment"),
    ("api.example.com", "/v1/models/sentiment/predict", "sentiment"),
    ("api.example.com", "/v1/models/sentiment-2", "models"),  # not below the prefix
    ("api.example.com", "/v1/models", "models"),
    ("api.example.com", "/v1/modelsx", "api"),
    ("API.Example.COM:8080", "/v1/models/x", "models"),  # case and port do not count
    ("api.example.com.", "/", "api"),  # nor a trailing dot
    ("x.tenants.example.com", "/", "tenants"),
    ("a.b.tenants.example.com", "/any", "tenants"),  # the wildcard takes several labels
    ("tenants.example.com", "/", None),  # but not none
    ("acme.tenants.example.com", "/", "acme"),  # an exact host before a wildcard
    ("acme.test:443", "/x", "acme"),
    ("www.example.com", "/docs/intro", "docs"),
    ("www.example.com", "/", None),  # the host's only prefix does not match: no fallback
    ("api.example.com", "/docs", "api"),  # the exact host wins; its "/" matches
    ("nobody.test", "/", None),
])
def test_which_service_a_request_reaches(host: str, path: str, expected: str | None) -> None:
    assert TABLE.find(host, path) == expected


def test_clashes_name_the_other_service() -> None:
    assert TABLE.clashes(Routes("x", ("api.example.com", "new.test"), ("/v1/models",))) == [
        ("api.example.com", "/v1/models", "models")]
    assert TABLE.clashes(Routes("x", ("api.example.com",), ("/v2",))) == []
    assert TABLE.shares_host("api") and not TABLE.shares_host("tenants")


LOCAL = ", local: {command: [python, -m, http.server]}}"


def with_local(services: str) -> str:
    """Each one-line service entry with a local command (what the config requires)."""
    return "".join(line.rstrip().removesuffix("}") + LOCAL + "\n"
                   for line in services.splitlines())


def write(tmp_path: Path, services: str) -> Path:
    path = tmp_path / "torpor.yaml"
    path.write_text(f"services:\n{services}")
    return path


@pytest.mark.parametrize(("services", "key", "words"), [
    ("  - {name: a, host: a.test, paths: [/v1]}\n  - {name: b, host: b.test, "
     "hosts: [a.test], paths: [/v1]}\n", "services[1].hosts",
     ["duplicate host 'a.test' path '/v1'", "service 'a' (services[0])"]),
    ("  - {name: a, host: a.test}\n  - {name: b, host: A.test}\n", "services[1].host",
     ["duplicate host 'a.test'", "service 'a'"]),
    ("  - {name: a, host: a.test, paths: [v1]}\n", "services[0].paths[0]", ["leading '/'"]),
    ("  - {name: a, host: a.test, paths: [/v1/]}\n", "services[0].paths[0]",
     ["no trailing '/'"]),
    ("  - {name: a, host: a.test, paths: [/v1, /v1]}\n", "services[0].paths[1]",
     ["listed twice"]),
    ("  - {name: a, host: a.test, hosts: ['*']}\n", "services[0].hosts[0]", ["host name"]),
    ("  - {name: a, host: a.test, hosts: ['a.*.test']}\n", "services[0].hosts[0]",
     ["wildcard"]),
    ("  - {name: a, host: a.test, rewrite: /}\n", "services[0].rewrite", ["give the service "
                                                                         "paths"]),
    ("  - {name: a, host: a.test, rate_limit: {requests_per_second: 5}}\n"
     "  - {name: b, host: a.test, paths: [/b]}\n", "services[0].rate_limit",
     ["shares a host"]),
])
def test_route_errors_name_the_key_and_the_other_service(
        tmp_path: Path, services: str, key: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, with_local(services)))
    assert caught.value.key == key, caught.value
    for word in words:
        assert word in str(caught.value)


def test_services_may_share_a_host_under_different_paths(tmp_path: Path) -> None:
    text = with_local("  - {name: a, host: api.test}\n"
                      "  - {name: b, host: api.test, hosts: ['*.b.test'], paths: [/v1/b], "
                      "rewrite: /}\n")
    config = load_config(write(tmp_path, text))
    catalog = ServiceCatalog(config.services)
    assert [(s.name, s.hosts, s.paths, s.rewrite) for s in config.services] == [
        ("a", (), (), None), ("b", ("*.b.test",), ("/v1/b",), "/")]
    found = catalog.by_host("api.test", "/v1/b/predict")
    assert found is not None and found.name == "b"
    assert catalog.route_name("x.b.test", "/v1/b") == "b"
    assert catalog.route_name("api.test", "/v1") == "a"
    with pytest.raises(CatalogConflictError, match="path '/v1/b' is already used by service 'b'"):
        catalog.put(ServiceConfig("c", "other.test", hosts=("api.test",), paths=("/v1/b",)),
                    "deployment/models/c")


def deployment(annotations: dict[str, str]) -> dict[str, object]:
    return {"metadata": {"name": "m", "namespace": "models",
                         "labels": {"torpor.io/enabled": "true"}, "annotations": annotations},
            "spec": {"template": {"spec": {"containers": [
                {"name": "model", "ports": [{"name": "http", "containerPort": 8080}]}]}}}}


def test_a_deployment_declares_hosts_paths_and_limits_by_annotation() -> None:
    service = service_from_deployment(deployment({
        "torpor.io/hosts": "a.test, *.b.test", "torpor.io/paths": "/v1/m,/v2/m",
        "torpor.io/rewrite": "/", "torpor.io/rate-limit": "5",
        "torpor.io/rate-limit-burst": "9", "torpor.io/max-concurrent": "3"}))
    assert (service.hosts, service.paths, service.rewrite, service.max_concurrent) == (
        ("a.test", "*.b.test"), ("/v1/m", "/v2/m"), "/", 3)
    assert service.rate_limit is not None and service.rate_limit.bucket == 9
    with pytest.raises(AnnotationError) as caught:
        service_from_deployment(deployment({"torpor.io/paths": "v1",
                                            "torpor.io/rewrite": "/x",
                                            "torpor.io/rate-limit-burst": "4"}))
    message = str(caught.value)
    assert "torpor.io/paths: expected a path prefix" in message
    assert "torpor.io/rate-limit-burst: is the burst of torpor.io/rate-limit" in message
