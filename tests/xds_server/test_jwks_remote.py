"""A JWT provider whose JWKS Envoy fetches from a URL: the provider's remote_jwks (fetched
before the listener serves, cached, retried), one cluster of torpor's own per JWKS host
(STATIC for an address, STRICT_DNS for a name, TLS checked against the CA certificates
for https) that comes and goes with the providers naming it, every resource passing
Envoy's validation; and what Credentials makes of a `jwks_url` config."""

from __future__ import annotations

from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_authn_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

from tests.xds_server.test_resources import SETTINGS, unpack
from torpor.config import Address, AuthConfig, GatewayConfig, JwtConfig, ServiceConfig
from torpor.credentials_files import jwks_ca_file, read_ca_bundle
from torpor.model import Endpoint
from xds_server import types
from xds_server.cache import Resource
from xds_server.credentials import NOBODY, Credentials
from xds_server.resources import (
    JWKS_CLUSTER_PREFIX,
    JWT_FILTER,
    LISTENER_NAME,
    JwksHost,
    JwtRule,
    RemoteJwks,
    ResourceBuilder,
    RoutedService,
)
from xds_server.validation import check_message

CA = "-----BEGIN CERTIFICATE-----\nnot read here\n-----END CERTIFICATE-----\n"
PLAIN = JwksHost("127.0.0.1", 8443)
NAMED = JwksHost("login.example.com", 443, ca=CA, ca_file="/etc/torpor/ca.pem")


def rule(provider: str, host: JwksHost, url: str = "http://127.0.0.1:8443/jwks.json"
         ) -> JwtRule:
    return JwtRule(provider, "https://issuer.test", ("models",), "",
                   RemoteJwks(url=url, host=host, cache=300.0, timeout=5.0))


def service(name: str, auth: JwtRule | None) -> RoutedService:
    return RoutedService(name, f"{name}.localhost", (Endpoint("127.0.0.1", 9001),), auth=auth)


def jwks_clusters(builder: ResourceBuilder) -> dict[str, cluster_pb2.Cluster]:
    clusters = builder.desired().resources[types.CLUSTER]
    return {name: unpack(r, cluster_pb2.Cluster()) for name, r in clusters.items()
            if name.startswith(JWKS_CLUSTER_PREFIX)}


def jwt_filter(builder: ResourceBuilder) -> jwt_authn_pb2.JwtAuthentication | None:
    listener: Resource = builder.desired().resources[types.LISTENER][LISTENER_NAME]
    chain = unpack(listener, listener_pb2.Listener()).filter_chains[0]
    manager = hcm_pb2.HttpConnectionManager()
    assert chain.filters[0].typed_config.Unpack(manager)
    for f in manager.http_filters:
        if f.name == JWT_FILTER:
            return unpack_any(f.typed_config)
    return None


def unpack_any(config: object) -> jwt_authn_pb2.JwtAuthentication:
    out = jwt_authn_pb2.JwtAuthentication()
    assert config.Unpack(out)  # type: ignore[attr-defined]
    return out


def test_the_provider_fetches_before_the_listener_serves_caches_and_retries() -> None:
    builder = ResourceBuilder(SETTINGS)
    builder.build([service("a", rule("p1", PLAIN))])
    found = jwt_filter(builder)
    assert found is not None
    provider = found.providers["p1"]
    assert provider.issuer == "https://issuer.test" and list(provider.audiences) == ["models"]
    assert not provider.HasField("local_jwks")
    remote = provider.remote_jwks
    assert remote.http_uri.uri == "http://127.0.0.1:8443/jwks.json"
    assert remote.http_uri.cluster == PLAIN.cluster
    assert remote.http_uri.timeout.seconds == 5
    assert remote.cache_duration.seconds == 300
    # Fetched in the main thread before the (new) listener serves: no request waits.
    assert remote.HasField("async_fetch") and not remote.async_fetch.fast_listener
    assert remote.retry_policy.num_retries.value == 2
    assert remote.retry_policy.retry_back_off.max_interval.seconds == 5
    assert found.requirement_map["p1"].provider_name == "p1"


def test_an_address_gets_a_static_cluster_without_tls() -> None:
    builder = ResourceBuilder(SETTINGS)
    builder.build([service("a", rule("p1", PLAIN))])
    (name, cluster), = jwks_clusters(builder).items()
    assert name == PLAIN.cluster
    assert cluster.type == cluster_pb2.Cluster.STATIC
    assert not cluster.HasField("transport_socket")
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "127.0.0.1", 8443)


def test_an_https_name_gets_a_dns_cluster_checking_the_hosts_certificate() -> None:
    builder = ResourceBuilder(SETTINGS)
    builder.build([service("a", rule("p1", NAMED, "https://login.example.com/keys"))])
    cluster = jwks_clusters(builder)[NAMED.cluster]
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS
    assert cluster.dns_lookup_family == cluster_pb2.Cluster.V4_PREFERRED
    context = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(context)
    assert context.sni == "login.example.com"
    validation = context.common_tls_context.validation_context
    assert validation.trusted_ca.inline_string == CA
    (san,) = validation.match_typed_subject_alt_names
    assert san.san_type == common_pb2.SubjectAltNameMatcher.DNS
    assert san.matcher.exact == "login.example.com"


def test_an_https_address_is_matched_as_an_ip_san_without_sni() -> None:
    host = JwksHost("127.0.0.1", 8443, ca=CA)
    builder = ResourceBuilder(SETTINGS)
    builder.build([service("a", rule("p1", host, "https://127.0.0.1:8443/keys"))])
    cluster = jwks_clusters(builder)[host.cluster]
    context = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(context)
    assert context.sni == ""
    (san,) = context.common_tls_context.validation_context.match_typed_subject_alt_names
    assert san.san_type == common_pb2.SubjectAltNameMatcher.IP_ADDRESS


def test_one_cluster_per_host_there_while_a_provider_names_it() -> None:
    builder = ResourceBuilder(SETTINGS)
    builder.build([service("a", rule("p1", PLAIN)), service("b", rule("p2", PLAIN)),
                   service("c", None)])
    assert set(jwks_clusters(builder)) == {PLAIN.cluster}
    builder.update({"a": None})
    assert set(jwks_clusters(builder)) == {PLAIN.cluster}  # b still fetches from it
    builder.update({"b": service("b", rule("p2", NAMED, "https://login.example.com/k"))})
    assert set(jwks_clusters(builder)) == {NAMED.cluster}
    builder.update({"b": service("b", None)})
    assert jwks_clusters(builder) == {}
    assert jwt_filter(builder) is None
    assert "c" in builder.desired().resources[types.CLUSTER]


def test_new_ca_certificates_change_the_cluster_not_its_name() -> None:
    builder = ResourceBuilder(SETTINGS)
    builder.build([service("a", rule("p1", NAMED))])
    before = builder.desired().resources[types.CLUSTER][NAMED.cluster]
    renewed = JwksHost(NAMED.host, NAMED.port, ca=CA + CA, ca_file=NAMED.ca_file)
    assert renewed.cluster == NAMED.cluster
    builder.update({"a": service("a", rule("p1", renewed))})
    after = builder.desired().resources[types.CLUSTER][NAMED.cluster]
    assert after.digest != before.digest


def test_cluster_names_are_torpors_own_and_tell_hosts_apart() -> None:
    names = {JwksHost("a.b", 443).cluster, JwksHost("a-b", 443).cluster,
             JwksHost("a.b", 443, ca=CA).cluster, JwksHost("a.b", 443, ca=CA, ca_file="x").cluster,
             JwksHost("a.b", 8443).cluster, JwksHost("::1", 443).cluster}
    assert len(names) == 6
    for name in names:
        # A service name is lowercase letters, digits and '-': never '_'.
        assert name.startswith("torpor_jwks_") and "." not in name and ":" not in name


def test_envoys_validation_accepts_the_listener_and_the_clusters() -> None:
    builder = ResourceBuilder(SETTINGS)
    builder.build([service("a", rule("p1", PLAIN)),
                   service("b", rule("p2", NAMED, "https://login.example.com/keys")),
                   service("c", JwtRule("p3", "https://issuer.test", (), '{"keys": [{}]}'))])
    resources = builder.desired().resources
    assert check_message(unpack(resources[types.LISTENER][LISTENER_NAME],
                                listener_pb2.Listener())) == []
    clusters = jwks_clusters(builder)
    assert len(clusters) == 2
    for cluster in clusters.values():
        assert check_message(cluster) == []


def gateway_with(jwt: JwtConfig) -> GatewayConfig:
    return GatewayConfig(listen=Address("127.0.0.1", 8080), admin=Address("127.0.0.1", 9901),
                         auth=AuthConfig(jwt=jwt))


def test_credentials_turn_a_jwks_url_into_the_fetch(tmp_path: Path) -> None:
    def auth_of(jwt: JwtConfig) -> JwtRule:
        found = Credentials(gateway_with(jwt)).route_auth(ServiceConfig(name="a", host="a.test"))
        assert isinstance(found, JwtRule) and found.remote is not None
        return found

    plain = auth_of(JwtConfig("https://issuer.test", jwks_url="http://10.0.0.7/jwks",
                              jwks_cache=60.0, jwks_timeout=2.0))
    assert plain.remote == RemoteJwks("http://10.0.0.7/jwks", JwksHost("10.0.0.7", 80), 60.0,
                                      2.0)
    system = auth_of(JwtConfig("https://issuer.test",
                               jwks_url="https://login.example.com/.well-known/jwks.json"))
    assert system.remote is not None
    assert system.remote.host.port == 443 and system.remote.host.ca_file == ""
    assert system.remote.host.ca == read_ca_bundle(jwks_ca_file(None))
    assert (system.remote.cache, system.remote.timeout) == (300.0, 5.0)
    # A CA file never readable: nobody in, never everyone.
    gateway = gateway_with(JwtConfig("https://issuer.test", jwks_url="https://h.test/k",
                                     jwks_ca=tmp_path / "gone.pem"))
    assert Credentials(gateway).route_auth(ServiceConfig(name="a", host="a.test")) is NOBODY
