"""The Envoy bootstrap: what `torpor envoy-bootstrap` prints for a config, checked by the
real Envoy offline (`envoy --mode validate`) and field by field."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from assembly import cli
from torpor.certs import make_certs, write_certs
from torpor.config import Address, Config, load_config
from torpor.errors import ConfigError
from torpor.gateway import envoy_binary
from xds_server.bootstrap import bootstrap, bootstrap_json

HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def write_config(tmp_path: Path, xds_host: str = "127.0.0.1", node_id: str = "edge-7",
                 more: str = "") -> Path:
    """`more`: further control_plane keys, one line, e.g. "xds_protocol: sotw"."""
    path = tmp_path / "torpor.yaml"
    path.write_text(textwrap.dedent(f"""\
        gateway:
          listen: 127.0.0.1:18480
          admin: 127.0.0.1:19911
        control_plane:
          xds: {xds_host}:18400
          admin_api: 127.0.0.1:18401
          node_id: {node_id}
          {more}
        services:
          - name: echo
            host: echo.localhost
            local:
              command: [python, -m, torpor.examples.model_server, --port, "{{port}}"]
        """), encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path))


def validate(tmp_path: Path, boot: dict[str, Any] | str) -> subprocess.CompletedProcess[str]:
    file = tmp_path / "envoy.json"
    file.write_text(boot if isinstance(boot, str) else json.dumps(boot), encoding="utf-8")
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(file), "--disable-hot-restart",
         "--log-level", "warning"],
        capture_output=True, text=True, timeout=60, check=False,
    )


# --- Envoy accepts it --------------------------------------------------------------------

@pytest.mark.envoy
@pytest.mark.parametrize("xds_host", ["127.0.0.1", "localhost"], ids=["ip-static", "name-dns"])
def test_envoy_validates_the_bootstrap(tmp_path: Path, xds_host: str) -> None:
    config = load_config(write_config(tmp_path, xds_host=xds_host))
    result = validate(tmp_path, bootstrap_json(config))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.envoy
def test_envoy_rejects_a_broken_bootstrap(tmp_path: Path, config: Config) -> None:
    """The validation above can fail: a cluster of an unknown type is refused."""
    boot = json.loads(bootstrap_json(config))
    boot["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    assert validate(tmp_path, boot).returncode != 0


# --- its fields --------------------------------------------------------------------------

def test_node_admin_and_ads_are_as_configured(config: Config) -> None:
    boot = json.loads(bootstrap_json(config))
    assert boot["node"]["id"] == "edge-7"
    assert boot["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1", "port_value": 19911,
    }
    ads = boot["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "DELTA_GRPC"  # delta ADS unless the config says sotw
    assert ads["transport_api_version"] == "V3"
    assert ads["grpc_services"] == [{"envoy_grpc": {"cluster_name": "torpor_xds"}}]
    for source in ("cds_config", "lds_config"):
        assert boot["dynamic_resources"][source] == {"ads": {}, "resource_api_version": "V3"}


@pytest.mark.parametrize(("protocol", "api_type"),
                         [("delta", "DELTA_GRPC"), ("sotw", "GRPC")])
def test_xds_protocol_chooses_the_ads_api_type(tmp_path: Path, protocol: str,
                                               api_type: str) -> None:
    config = load_config(write_config(tmp_path, more=f"xds_protocol: {protocol}"))
    boot = json.loads(bootstrap_json(config))
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == api_type


@pytest.mark.envoy
def test_envoy_validates_the_sotw_bootstrap(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, more="xds_protocol: sotw"))
    result = validate(tmp_path, bootstrap_json(config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_unknown_xds_protocol_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="xds_protocol"):
        load_config(write_config(tmp_path, more="xds_protocol: rest"))


def test_node_id_argument_overrides_the_config(config: Config) -> None:
    assert json.loads(bootstrap_json(config, node_id="other"))["node"]["id"] == "other"


@pytest.mark.parametrize(("host", "kind"), [("127.0.0.1", "STATIC"), ("localhost", "STRICT_DNS")])
def test_the_xds_cluster_speaks_http2_to_the_configured_address(host: str, kind: str) -> None:
    boot = bootstrap("n", Address("127.0.0.1", 9901), Address(host, 18400))
    (cluster,) = boot["static_resources"]["clusters"]
    assert cluster["name"] == "torpor_xds"
    assert cluster["type"] == kind
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb,) = locality["lb_endpoints"]
    assert lb["endpoint"]["address"]["socket_address"] == {"address": host, "port_value": 18400}
    options = cluster["typed_extension_protocol_options"][HTTP_OPTIONS]
    assert options["@type"] == "type.googleapis.com/" + HTTP_OPTIONS
    assert "http2_protocol_options" in options["explicit_http_config"]


def test_the_xds_cluster_address_comes_from_the_config(config: Config) -> None:
    boot = json.loads(bootstrap_json(config))
    (cluster,) = boot["static_resources"]["clusters"]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "127.0.0.1", "port_value": 18400}


# --- the CLI -----------------------------------------------------------------------------



@pytest.mark.envoy
@pytest.mark.usefixtures("restore_logging")
def test_cli_prints_the_bootstrap_as_json(tmp_path: Path, config: Config,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["envoy-bootstrap", "--config", str(config.path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads(bootstrap_json(config))
    assert json.loads(out) == bootstrap("edge-7", config.gateway.admin, config.control_plane.xds)
    result = validate(tmp_path, out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_downstream_connections_are_capped_by_the_overload_manager_not_the_runtime_key(
    config: Config,
) -> None:
    """Envoy 1.40 reports the runtime key as deprecated; the resource monitor replaces it."""
    boot = bootstrap("n", config.gateway.admin, config.control_plane.xds)
    assert "layered_runtime" not in boot
    (monitor,) = boot["overload_manager"]["resource_monitors"]
    assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
    assert monitor["typed_config"]["max_active_downstream_connections"] == 50_000


@pytest.mark.parametrize(("routing", "releases"),
                         [("virtual_hosts", True), ("host_header", False)])
def test_envoy_gives_free_heap_back_only_where_it_parses_a_route_table_per_service(
    config: Config, routing: str, releases: bool,
) -> None:
    """With a virtual host per service every route change is a whole new table to parse:
    the release gives those pages back. Found by Host there is little to give, and the
    allocator's background work held flips up."""
    routed = dataclasses.replace(config, gateway=dataclasses.replace(config.gateway,
                                                                     routing=routing))
    boot = json.loads(bootstrap_json(routed))
    assert ("memory_allocator_manager" in boot) is releases
    if releases:
        assert boot["memory_allocator_manager"]["memory_release_interval"] == "1s"


# --- sockets and mTLS --------------------------------------------------------------------

def test_admin_and_xds_on_unix_sockets_are_pipes_and_the_admin_is_owner_only(
        tmp_path: Path) -> None:
    boot = bootstrap("n", Address.socket_file(tmp_path / "admin.sock"),
                     Address.socket_file(tmp_path / "xds.sock"))
    assert boot["admin"]["address"] == {"pipe": {"path": str(tmp_path / "admin.sock"),
                                                 "mode": 0o600}}
    (cluster,) = boot["static_resources"]["clusters"]
    assert cluster["type"] == "STATIC"
    lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert lb["endpoint"]["address"] == {"pipe": {"path": str(tmp_path / "xds.sock")}}
    assert "transport_socket" not in cluster


@pytest.mark.envoy
def test_envoy_validates_sockets_and_an_mtls_xds_cluster(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    write_certs(certs, make_certs())
    config_path = tmp_path / "torpor.yaml"
    config_path.write_text(textwrap.dedent("""\
        gateway:
          admin: unix:run/admin.sock
          xds_tls: {cert: certs/envoy.pem, key: certs/envoy-key.pem, ca: certs/ca.pem}
        control_plane:
          xds: torpor-control-plane:18000
          tls: {cert: certs/server.pem, key: certs/server-key.pem, client_ca: certs/ca.pem}
        services: []
        """), encoding="utf-8")
    config = load_config(config_path)
    boot = json.loads(bootstrap_json(config))
    (cluster,) = boot["static_resources"]["clusters"]
    context = cluster["transport_socket"]["typed_config"]
    assert context["sni"] == "torpor-control-plane"
    common = context["common_tls_context"]
    assert common["tls_certificates"] == [{
        "certificate_chain": {"filename": str(certs.resolve() / "envoy.pem")},
        "private_key": {"filename": str(certs.resolve() / "envoy-key.pem")}}]
    assert common["validation_context"]["trusted_ca"]["filename"] == \
        str(certs.resolve() / "ca.pem")
    result = validate(tmp_path, boot)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same cluster with a certificate file that is not there: Envoy refuses it.
    common["tls_certificates"][0]["certificate_chain"]["filename"] = str(tmp_path / "nope")
    assert validate(tmp_path, boot).returncode != 0


def test_mtls_on_the_control_plane_needs_envoys_certificate(tmp_path: Path) -> None:
    config_path = tmp_path / "torpor.yaml"
    config_path.write_text("control_plane:\n  xds: 127.0.0.1:18000\n"
                           "  tls: {cert: s.pem, key: k.pem, client_ca: ca.pem}\nservices: []\n")
    with pytest.raises(ConfigError) as info:
        bootstrap_json(load_config(config_path))
    assert "gateway.xds_tls" in str(info.value) and "torpor certs" in str(info.value)


# --- headers Envoy looks up in O(1) ------------------------------------------------------

#: Headers Envoy keeps in its own O(1) table (what torpor's routes also look up).
ENVOY_INLINE = {":method", ":path", ":authority", "x-envoy-ip-tags"}


def test_every_header_torpors_routes_look_up_is_registered_inline(config: Config) -> None:
    """A header a route matches, adds or removes that Envoy does not keep inline costs a
    walk of the request's headers on every request (measured: `prefer`, 3.1k instructions,
    ~2 %): every one of them is in the bootstrap's inline_headers, of the right kind."""
    from envoy.config.route.v3 import route_pb2

    from torpor.model import Endpoint
    from xds_server import types
    from xds_server.resources import GatewaySettings, ResourceBuilder, RoutedService

    at = (Endpoint("127.0.0.1", 9001),)
    builder = ResourceBuilder(GatewaySettings(listen=Endpoint("127.0.0.1", 10000),
                                              activators=at))
    built = builder.build([
        RoutedService("plain", "plain.localhost", at),
        RoutedService("h2", "h2.localhost", at, http2=True, paths=("/v1/m",), rewrite="/"),
        RoutedService("v1", "versioned.localhost", at, version_of="versioned", weight=1),
        RoutedService("v2", "versioned.localhost", at, version_of="versioned", weight=1)])
    config_ = route_pb2.RouteConfiguration()
    assert built[types.ROUTE]["torpor_routes"].body.Unpack(config_)
    request, response = set(config_.request_headers_to_remove), set()
    for vhost in config_.virtual_hosts:
        policies = [vhost.retry_policy, *(r.route.retry_policy for r in vhost.routes)]
        response |= {h.name for p in policies for h in p.retriable_headers}
        for route in vhost.routes:
            request |= {h.name for h in route.match.headers}
            request |= {h.header.key for h in route.request_headers_to_add}
            request |= {h.header.key for w in route.route.weighted_clusters.clusters
                        for h in w.request_headers_to_add}
    assert {"prefer", "x-torpor-service", "x-torpor-version"} <= request  # all were built
    assert "x-torpor-retry" in response
    boot = bootstrap("n", config.gateway.admin, config.control_plane.xds)
    inline = {(h["inline_header_name"], h["inline_header_type"])
              for h in boot["inline_headers"]}
    assert {(n, "REQUEST_HEADER") for n in request - ENVOY_INLINE} <= inline
    assert {(n, "RESPONSE_HEADER") for n in response - ENVOY_INLINE} <= inline
