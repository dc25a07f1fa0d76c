"""Config: the YAML of the README's Config section loaded into typed, validated objects.

Owns: parsing, defaults and validation. A bad file raises ConfigError naming the file, the
key and the problem, before anything starts. Must not start anything or touch the network.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import urllib.parse
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

import yaml

from torpor.credentials_files import jwks_ca_file, read_api_keys, read_ca_bundle, read_jwks
from torpor.edge import DEFAULT_MAX_REQUEST_HEADERS_KB, MAX_REQUEST_HEADERS_KB_LIMIT, EdgeLimits
from torpor.errors import ConfigError
from torpor.routes import ROOT, Routes, RouteTable, describe_clash
from torpor.tls_files import read_certificate


@dataclasses.dataclass(frozen=True)
class Address:
    """A host:port pair. Config addresses are loopback or 0.0.0.0; `port` may be 0 only in tests.

    Or a Unix domain socket (`unix:PATH` in the config, for Envoy's admin and ADS): then
    `unix` is its path, `host` is empty and `port` 0, and only processes that may open the
    file (torpor makes it owner-only) can connect."""

    host: str
    port: int
    unix: Path | None = None

    @classmethod
    def socket_file(cls, path: Path) -> Address:
        return cls("", 0, path)

    @property
    def is_unix(self) -> bool:
        return self.unix is not None

    def __str__(self) -> str:
        """host:port, or unix:PATH (the form gRPC dials and binds as well)."""
        return f"unix:{self.unix}" if self.unix is not None else f"{self.host}:{self.port}"


#: sockaddr_un holds 108 bytes with the final NUL: longer socket paths cannot be bound.
MAX_UNIX_PATH = 107


@dataclasses.dataclass(frozen=True)
class ServerTlsConfig:
    """mTLS of the control plane's xDS listener (ADS and access logs): its certificate and
    key, and the CA that signed the certificates Envoys present (`torpor certs` makes all)."""

    cert: Path
    key: Path
    client_ca: Path


@dataclasses.dataclass(frozen=True)
class CertificateConfig:
    """A certificate (chain) and its key, for the hosts it is served to (SNI)."""

    cert: Path
    key: Path
    hosts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GatewayTlsConfig:
    """TLS on the gateway's listener: the default certificate, more certificates chosen by
    the name a client asks for (SNI), and HTTP/2 offered to clients (ALPN). The files are
    read by the control plane and sent to Envoy over SDS; a change is sent again."""

    cert: Path
    key: Path
    sni: tuple[CertificateConfig, ...] = ()
    http2: bool = True


@dataclasses.dataclass(frozen=True)
class JwtConfig:
    """Tokens Envoy accepts: signed by a key of the JWKS, from `issuer`, for one of
    `audiences` (any when empty), not expired. The JWKS is `jwks` (a file the control
    plane reads, re-read on change) or `jwks_url` (fetched by Envoy itself: at the
    listener's start, then every `jwks_cache`, each try within `jwks_timeout`; an https
    host's certificate checked against `jwks_ca`, else the system's trust store)."""

    issuer: str
    jwks: Path | None = None
    audiences: tuple[str, ...] = ()
    jwks_url: str | None = None
    jwks_cache: float = 300.0
    jwks_timeout: float = 5.0
    jwks_ca: Path | None = None


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """Who may call a service, checked by Envoy before routing (a refused request never
    reaches the activator or a replica): an API key from `api_keys` (a file of
    `client: key` lines, re-read on change) in the `x-api-key` header, or a JWT."""

    api_keys: Path | None = None
    jwt: JwtConfig | None = None


@dataclasses.dataclass(frozen=True)
class ClientTlsConfig:
    """A client's TLS files: the CA that signed the server's certificate, and (mTLS) the
    client's own certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclasses.dataclass(frozen=True)
class AdminTlsConfig:
    """TLS of the admin API, so that tokens do not cross a network in the clear: the
    control plane serves with `cert` and `key`; clients (CLI, activator) check its
    certificate against `ca` and need only that file."""

    cert: Path
    key: Path
    ca: Path


@dataclasses.dataclass(frozen=True)
class AdminTokensConfig:
    """Files that hold the admin API's bearer tokens, one per role (torpor/credentials.py).
    No operator file: the control plane creates `admin-token` in the log folder."""

    operator: Path | None = None
    read_only: Path | None = None


#: Envoy's stats flush (gateway.stats_flush_interval): default and bounds. Below 1 s Envoy's
#: main thread spends its time flushing; above a minute the policy sees calls late. 2 s:
#: the learned policy anchors its pre-wake on the last call, which is this much late.
DEFAULT_STATS_FLUSH, MIN_STATS_FLUSH, MAX_STATS_FLUSH = 2.0, 1.0, 60.0


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    listen: Address
    admin: Address
    # Request bodies up to this size are buffered by Envoy so that a request an activator
    # replica held when it died can be replayed on another; larger ones are not retried.
    retry_buffer_bytes: int = 1_048_576
    # The edge limits (torpor/edge.py): Envoy's max_request_headers_kb, and the
    # activator's aiohttp parser limits from the same number.
    max_request_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB
    # The client certificate the Envoy torpor bootstraps presents to the control plane, and
    # the CA of the control plane's certificate (when control_plane.tls is set). Paths as
    # Envoy sees them.
    xds_tls: ClientTlsConfig | None = None
    # How often Envoy reports its request counters to the control plane: the resolution
    # of every service's last call (xds_server/stats_sink.py).
    stats_flush_interval: float = DEFAULT_STATS_FLUSH
    # A listener of Envoy's that answers only GET /stats/prometheus (Envoy's own statistics
    # for Prometheus), so that the admin interface itself can stay on its Unix socket.
    stats_listen: Address | None = None
    # TLS on the listener (certificates reloaded on change through SDS), HTTP/2 by ALPN.
    tls: GatewayTlsConfig | None = None
    # Authentication of every service that does not set its own (services[].auth).
    auth: AuthConfig | None = None
    # Envoy's answer classes per service (`cluster.<service>.upstream_rq_[1-5]xx`, the
    # router's dynamic statistics): they cost ~5 % of Envoy's work per warm request.
    upstream_code_stats: bool = False
    # How Envoy finds a service: "virtual_hosts" (one per service in the route table) or
    # "host_header" (a service with nothing of its own on its routes is the cluster named
    # by the request's Host: adding one changes no route table; xds_server/resources.py).
    routing: str = "virtual_hosts"

    @property
    def edge(self) -> EdgeLimits:
        return EdgeLimits(max_request_headers_kb=self.max_request_headers_kb)


@dataclasses.dataclass(frozen=True)
class ControlPlaneConfig:
    xds: Address
    admin_api: Address
    metrics: Address
    # How long a staged push waits for every Envoy to ACK one stage before going on.
    ack_timeout: float = 10.0
    # The node id Envoys started by torpor use (torpor envoy-bootstrap, torpor up).
    node_id: str = "torpor-gateway"
    # How often calling statistics are written to the store (a restart loses at most this).
    stats_flush_every: float = 30.0
    # mTLS on `xds` (TCP): only Envoys with a certificate signed by client_ca connect.
    tls: ServerTlsConfig | None = None
    # The admin API's bearer tokens (files), per role.
    admin_tokens: AdminTokensConfig = AdminTokensConfig()
    # TLS on `admin_api` (None: plaintext, fine on loopback).
    admin_tls: AdminTlsConfig | None = None
    # The ADS variant the bootstrap asks Envoy to speak: "delta" (incremental: only what
    # changed is sent) or "sotw" (state of the world). The control plane serves both.
    xds_protocol: str = "delta"
    # How often `torpor up` / `torpor xds-server` read the config file for a change to
    # reload (services and policy at run time); 0: only on SIGHUP.
    reload_poll: float = 2.0


@dataclasses.dataclass(frozen=True)
class ActivatorConfig:
    listen: Address
    metrics: Address
    # HTTP/2 (h2c) listener for services with `protocol: http2` (gRPC): held there, then
    # replayed by Envoy's retry once the service is awake.
    listen_h2: Address = Address("127.0.0.1", 18081)
    max_held_per_service: int = 1000
    # Requests held at once for all services together: one activator's memory and file
    # descriptors are bounded however many services sleep. Beyond it: 503 + Retry-After.
    max_held: int = 10_000
    wake_timeout: float = 120.0
    # On SIGTERM/SIGINT: how long held requests (and those being proxied) may still finish
    # while nothing new is taken; what is still held then is answered 503 + Retry-After.
    # A held request never waits longer than wake_timeout anyway.
    drain_grace: float = 30.0
    # The waking page's HTML (services' `waking_page`): a file with $service, $progress,
    # $elapsed, $typical and $refresh; default: torpor's own page.
    waking_page_template: Path | None = None
    # Asynchronous calls (Prefer: respond-async): where they are kept (default: the
    # folder `async` among torpor's logs), the largest request or result body kept, how
    # long a result waits to be fetched, and how many calls are kept at once.
    async_spool: Path | None = None
    async_max_bytes: int = 10 * 1024 * 1024
    async_result_ttl: float = 3600.0
    async_max_calls: int = 10_000
    # false: no asynchronous calls (Prefer: respond-async is ignored, and Envoy's routes
    # do not look for it: measured, that header check is ~0.5 % of Envoy's work for every
    # request to an awake service, `Prefer` being one of Envoy's inline headers).
    async_calls: bool = True
    # The host Envoy reaches the activator at (an IP or a DNS name, e.g. the activator's
    # Kubernetes Service); default: the listen host. Ports are the listen ports.
    advertise: str | None = None


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    kind: str  # "sqlite" | "etcd"
    path: Path | None = None  # sqlite: resolved relative to the config file's folder
    endpoints: tuple[str, ...] = ()  # etcd
    # etcd: every key torpor writes starts with this (several gateways can share an etcd).
    prefix: str = "/torpor/"
    # etcd: TTL of each process's lease. A killed activator's wake lock, a killed leader's
    # leadership and a dead activator's registration last at most this long.
    lease_ttl: float = 10.0
    # etcd: how long one call may take before etcd counts as unavailable.
    timeout: float = 5.0
    # etcd: this process's name in the fleet (lock holder, leader, statistics writer);
    # default: host name and process id. `--member` on the command line overrides it.
    member: str | None = None
    # etcd: TLS to etcd (its CA; a client certificate and key when etcd checks them).
    tls: ClientTlsConfig | None = None
    # etcd: a user of etcd's auth and the file holding its password.
    user: str | None = None
    password_file: Path | None = None


@dataclasses.dataclass(frozen=True)
class WorkloadsConfig:
    kind: str  # "local" | "kubernetes"
    # kubernetes: a kubeconfig file (and context); neither → in-cluster config, then ~/.kube/config.
    kubeconfig: Path | None = None
    context: str | None = None
    # kubernetes: Deployments labelled torpor.io/enabled: "true" become services.
    discover: bool = True
    # kubernetes: where discovery looks; empty = every namespace (needs a ClusterRole).
    namespaces: tuple[str, ...] = ()
    # kubernetes: how often state is re-listed while a watch cannot be held (fallback poll).
    poll_every: float = 5.0
    # local: where replicas listen, "LOW-HIGH"; None → just below the kernel's ephemeral range.
    ports: tuple[int, int] | None = None


#: The idle policies: `learned` (each service's keep-alive learned from its own calling
#: history, with pre-wake) and `fixed` (one timer, `idle_after`, for every service).
POLICY_KINDS = ("learned", "fixed")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    # `learned`: the keep-alive is learned per service (policies/learning.py); `idle_after`
    # is then only the keep-alive while nothing has been learned yet (no service has a gap
    # between calls). `fixed`: every service is hibernated `idle_after` after its last call.
    kind: str = "learned"
    idle_after: float = 600.0
    evict_after: float = 86400.0
    creation_grace: float = 300.0
    check_every: float = 10.0
    # learned: what one cold start is worth, in seconds of a service loaded and idle.
    cold_start_price: float = 7200.0
    # learned: wake a sleeping service ahead of a call its history predicts.
    prewake: bool = True


@dataclasses.dataclass(frozen=True)
class ServicePolicyConfig:
    """Per-service overrides of `policy`; None means "as in the policy section"."""

    idle_after: float | None = None
    evict_after: float | None = None
    creation_grace: float | None = None
    kind: str | None = None
    cold_start_price: float | None = None
    prewake: bool | None = None


@dataclasses.dataclass(frozen=True)
class VersionConfig:
    """One version of a service: its own workload and replicas, and its share of the
    service's traffic (weights are relative; `torpor traffic` changes them at run time)."""

    name: str
    replicas: int = 1
    weight: int = 0
    local: LocalServiceConfig | None = None
    kubernetes: KubernetesServiceConfig | None = None


@dataclasses.dataclass(frozen=True)
class RateLimitConfig:
    """Requests per second one service takes through the gateway (Envoy's token bucket:
    `burst` tokens, refilled at `requests_per_second`); the rest are answered 429."""

    requests_per_second: int
    burst: int | None = None  # default: one second's worth

    @property
    def bucket(self) -> int:
        return self.burst if self.burst is not None else self.requests_per_second


@dataclasses.dataclass(frozen=True)
class WakeConfig:
    # Flip a waking service's traffic back to its replicas once the first one is ready
    # (fastest answer) or once all recorded replicas are (no burst on one replica).
    flip_when: str = "first_ready"  # "first_ready" | "all_ready"


@dataclasses.dataclass(frozen=True)
class LivenessConfig:
    """A local replica that was ready and then fails `failures` liveness probes in a row
    (the readiness probe, or the process is stopped) is killed and replaced."""

    enabled: bool = True
    period: float = 5.0  # seconds between two probes
    timeout: float = 2.0  # a probe not answered within this failed
    failures: int = 3


@dataclasses.dataclass(frozen=True)
class LocalServiceConfig:
    command: tuple[str, ...]  # "{port}" is replaced by the replica's port
    ready_path: str = "/healthz"
    # Working directory of the processes; default: the config file's folder.
    cwd: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    # SIGTERM, then SIGKILL after this many seconds.
    stop_grace: float = 10.0
    # "http": GET ready_path answers 2xx; "tcp": the port accepts connections (gRPC servers).
    ready_probe: str = "http"
    liveness: LivenessConfig = LivenessConfig()


@dataclasses.dataclass(frozen=True)
class KubernetesServiceConfig:
    namespace: str
    deployment: str
    port: int  # the port the replicas listen on (an EndpointSlice port)
    # The Kubernetes Service whose EndpointSlices list the replicas; default: the deployment's name.
    service: str | None = None

    @property
    def service_name(self) -> str:
        return self.service or self.deployment


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    name: str
    host: str
    replicas: int = 1
    local: LocalServiceConfig | None = None
    kubernetes: KubernetesServiceConfig | None = None
    # What the replicas speak: http1, or http2 (h2c, e.g. gRPC).
    protocol: str = "http1"
    # Never hibernated by the policy (`torpor hibernate` still works).
    never_sleep: bool = False
    policy: ServicePolicyConfig = ServicePolicyConfig()
    # Envoy replays a request whose upstream reset it before any response header (a replica
    # or an activator that died holding it) only for idempotent methods (GET, HEAD, OPTIONS,
    # PUT, DELETE, TRACE); true: for every method (POST too), for services whose calls may
    # run twice.
    retry_non_idempotent: bool = False
    # A browser's GET (Accept: text/html) to it while it sleeps gets a page at once that
    # says it is waking and reloads itself until the service answers; false: held like
    # any other request.
    waking_page: bool = True
    # More hosts it is reached at (exact, or `*.suffix`), path prefixes under its hosts
    # (empty: every path; several services may share a host with distinct paths), and what
    # the matched prefix becomes on the way to the replicas (None: unchanged). torpor/routes.py.
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    rewrite: str | None = None
    # Who may call it (None: as gateway.auth; NO_AUTH, `auth: none` in the file: anyone).
    auth: AuthConfig | None = None
    # Versions (the file's `versions:`): each becomes a service of its own named
    # `<service>--<version>` (`version_of`, `version`, its first `weight`), reached under
    # this service's hosts and paths in proportion to the weights (torpor/traffic.py).
    versions: tuple[VersionConfig, ...] = ()
    version_of: str | None = None
    version: str | None = None
    weight: int = 0
    # Enforced by Envoy, answered 429 + Retry-After: requests per second (with a burst),
    # and requests in flight at once (to the replicas, or held while it sleeps).
    rate_limit: RateLimitConfig | None = None
    max_concurrent: int | None = None
    # Wake settings of this service (None: the activator section's). `wake_timeout`: how
    # long its wake and its held requests may take; `max_held`: requests held at once for
    # it; `activation_replicas`: how many replicas a wake starts first (the rest follow to
    # the recorded count once the first are ready; None: the recorded count at once);
    # `min_awake`: after a wake, the policy leaves it running at least this long.
    wake_timeout: float | None = None
    max_held: int | None = None
    activation_replicas: int | None = None
    min_awake: float = 0.0
    # Services of one group are woken together and hibernated together (when every member
    # is idle by its own policy).
    group: str | None = None

    def routes(self) -> Routes:
        """Where it is reached: its host and `hosts`, under `paths` (every path if none);
        the versions of a service are reached where the service is."""
        return Routes(self.version_of or self.name, (self.host, *self.hosts),
                      self.paths or (ROOT,))


@dataclasses.dataclass(frozen=True)
class Config:
    path: Path  # the file it was loaded from (for messages and relative paths)
    gateway: GatewayConfig
    control_plane: ControlPlaneConfig
    activator: ActivatorConfig
    store: StoreConfig
    workloads: WorkloadsConfig
    policy: PolicyConfig
    services: tuple[ServiceConfig, ...]
    wake: WakeConfig = WakeConfig()

    def service(self, name: str) -> ServiceConfig | None:
        return next((s for s in self.services if s.name == name), None)

    def log_dir(self) -> Path:
        """Where the processes torpor starts (Envoy, local replicas) write their logs:
        `torpor-logs/` beside the sqlite state, else beside the config file. Also where
        `torpor up` keeps its sockets and the admin token it creates."""
        return log_dir_of(self.path, self.store)

    def listeners(self) -> dict[str, Address]:
        """Every address a torpor process binds, by its dotted config key.

        One list so that the port-clash check and `torpor up` agree on what is bound.
        """
        return {
            "gateway.listen": self.gateway.listen,
            "gateway.admin": self.gateway.admin,
            "control_plane.xds": self.control_plane.xds,
            "control_plane.admin_api": self.control_plane.admin_api,
            "control_plane.metrics": self.control_plane.metrics,
            "activator.listen": self.activator.listen,
            "activator.listen_h2": self.activator.listen_h2,
            "activator.metrics": self.activator.metrics,
            **({"gateway.stats_listen": self.gateway.stats_listen}
               if self.gateway.stats_listen is not None else {}),
        }


def log_dir_of(config_path: Path, store: StoreConfig) -> Path:
    """Config.log_dir for a config file at `config_path` with this store."""
    base = store.path.parent if store.path else config_path.parent
    return base / "torpor-logs"


# --------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------

_DURATION_UNITS: Mapping[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: Bounds of counts, so that a typo is a config error and not a crash at run time.
MAX_HELD_PER_SERVICE = 1_000_000
MAX_REPLICAS = 10_000
#: Replicas of one service on this machine (`workloads.kind: local`): each is a process.
MAX_LOCAL_REPLICAS = 64

#: The longest duration any setting takes (a year and a day). Envoy refuses durations past
#: ~10,000 years in a whole RouteConfiguration, and nothing in torpor means more than a year.
MAX_DURATION = 366 * 86400.0

_DURATION_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<unit>ms|s|m|h|d)?")
_DURATION_HELP = (
    "expected a number of seconds or a number with a unit ms, s, m, h or d "
    "(250ms, 30s, 10m, 24h, 7d)"
)


def parse_duration(text: str | int | float) -> float:
    """Seconds in `text`: "250ms", "30s", "10m", "24h", "7d", or a plain number of seconds.

    One number and one unit, no spaces inside, so that "10 minutes" or "1h30m" fail loudly
    instead of being read as something the operator did not mean. Raises ValueError for
    negatives, NaN/infinity, booleans, empty or otherwise unreadable input.
    """
    if isinstance(text, bool):  # YAML turns "yes"/"on" into True; never a duration
        raise ValueError(f"{text!r} is not a duration; {_DURATION_HELP}")
    if isinstance(text, int | float):
        seconds = float(text)
    elif isinstance(text, str):
        if text.strip().startswith("-"):
            raise ValueError(f"{text!r} is not a duration; it must not be negative")
        match = _DURATION_RE.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a duration; {_DURATION_HELP}")
        seconds = float(match["number"]) * _DURATION_UNITS[match["unit"] or "s"]
    else:
        raise ValueError(f"{text!r} is not a duration; {_DURATION_HELP}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text!r} is not a duration; it must be a finite number ≥ 0")
    if seconds > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than {MAX_DURATION // 86400:g}d, the longest "
                         "duration torpor takes")
    return seconds


# --------------------------------------------------------------------------------------
# Loading: a small schema per section, read by one generic function
# --------------------------------------------------------------------------------------

_T = TypeVar("_T")


class _Reader:
    """What every parser needs: the file name for messages, its folder for relative paths."""

    def __init__(self, file: str, folder: Path) -> None:
        self.file = file
        self.folder = folder

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(self.file, key, problem)


#: A parser turns the raw YAML value found at a dotted key into its typed value, or fails.
_Parser = Callable[[_Reader, str, Any], Any]

_REQUIRED = object()  # marker: the key must be present
_DATACLASS_DEFAULT = object()  # marker: when absent, the dataclass's own default applies


@dataclasses.dataclass(frozen=True)
class _Field:
    """One key of a section: how to parse it and what happens when it is absent.

    `default` is a raw YAML value (e.g. "127.0.0.1:8080"), parsed like a given one, so
    that defaults go through the same validation as the file.
    """

    parse: _Parser
    default: object = _DATACLASS_DEFAULT
    hint: str = ""  # appended to "missing" when a required key is absent


@dataclasses.dataclass(frozen=True)
class _Schema(Generic[_T]):
    """The keys a section allows and the dataclass they build."""

    build: Callable[..., _T]
    fields: Mapping[str, _Field]


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _describe(value: object) -> str:
    """The YAML type of `value`, with the value when short, for 'expected X, got Y'."""
    if value is None:
        return "nothing (null)"
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "the string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)
    if isinstance(value, dict | list):
        return kind if value else kind.replace("a ", "an empty ", 1)
    shown = repr(value)
    return f"{kind} {shown}" if len(shown) <= 60 else kind


def _mapping(r: _Reader, key: str, value: object) -> dict[str, Any]:
    """A section's mapping; an empty section (`policy:` with every line commented) is {}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        r.fail(key, f"expected a mapping, got {_describe(value)}")
    return value


def _read(r: _Reader, key: str, raw: object, schema: _Schema[_T]) -> _T:
    """Check the keys of the section at `key` against `schema`, parse each, build the dataclass."""
    given = _mapping(r, key, raw)
    allowed = ", ".join(schema.fields)
    for name in given:
        if name not in schema.fields:
            close = difflib.get_close_matches(str(name), list(schema.fields), n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            r.fail(_join(key, str(name)), f"unknown key{guess}; allowed keys: {allowed}")
    values: dict[str, Any] = {}
    for name, field in schema.fields.items():
        sub = _join(key, name)
        if name in given:
            values[name] = field.parse(r, sub, given[name])
        elif field.default is _REQUIRED:
            r.fail(sub, f"missing; {field.hint}" if field.hint else "missing (required)")
        elif field.default is not _DATACLASS_DEFAULT:
            values[name] = field.parse(r, sub, field.default)
    return schema.build(**values)


def _section(schema: _Schema[Any]) -> _Parser:
    """A parser for a nested section (e.g. a service's `local:` block)."""
    return lambda r, key, value: _read(r, key, value, schema)


def _string(r: _Reader, key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        r.fail(key, f"expected a non-empty string, got {_describe(value)}")
    return value


def _integer(minimum: int, maximum: int | None = None) -> _Parser:
    """An integer in [minimum, maximum]; booleans and floats like 2.0 are refused."""
    bounds = f"≥ {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(r: _Reader, key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            r.fail(key, f"expected an integer {bounds}, got {_describe(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            r.fail(key, f"expected an integer {bounds}, got {value}")
        return value

    return parse


def _duration(positive: bool = False) -> _Parser:
    """A duration in seconds; `positive` refuses 0 where 0 would mean a busy loop or no wait."""

    def parse(r: _Reader, key: str, value: object) -> float:
        if value is None or isinstance(value, bool) or not isinstance(value, str | int | float):
            r.fail(key, f"expected a duration like 30s or 10m, got {_describe(value)}")
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            r.fail(key, str(exc))
        if positive and seconds == 0:
            r.fail(key, "must be greater than 0")
        return seconds

    return parse


def _duration_at_least(minimum: float) -> _Parser:
    """A duration of at least `minimum` seconds (an etcd lease shorter than 2s expires
    between two keep-alives on a busy machine)."""
    base = _duration()

    def parse(r: _Reader, key: str, value: object) -> float:
        seconds = float(base(r, key, value))
        if seconds < minimum:
            r.fail(key, f"must be at least {minimum:g}s, got {seconds:g}s")
        return seconds

    return parse


def _duration_within(low: float, high: float) -> _Parser:
    """A duration from `low` to `high` seconds, both inclusive."""
    base = _duration()

    def parse(r: _Reader, key: str, value: object) -> float:
        seconds = float(base(r, key, value))
        if not low <= seconds <= high:
            r.fail(key, f"expected a duration from {low:g}s to {high:g}s, got {seconds:g}s")
        return seconds

    return parse


#: control_plane.reload_poll bounds (besides 0, off): below 0.5 s the file is read for
#: nothing most of the time; above an hour a change waits longer than anyone expects.
MIN_RELOAD_POLL, MAX_RELOAD_POLL = 0.5, 3600.0


def _off_or_within(low: float, high: float) -> _Parser:
    """0 (off), or a duration from `low` to `high` seconds."""
    base = _duration()

    def parse(r: _Reader, key: str, value: object) -> float:
        seconds = float(base(r, key, value))
        if seconds != 0 and not low <= seconds <= high:
            r.fail(key, f"expected 0 (off) or a duration from {low:g}s to {high:g}s, got "
                        f"{seconds:g}s")
        return seconds

    return parse


def _key_prefix(r: _Reader, key: str, value: object) -> str:
    """An etcd key prefix: starts with "/"; a "/" is added at the end if missing."""
    text = _string(r, key, value)
    if not text.startswith("/") or any(c.isspace() for c in text):
        r.fail(key, f"expected a key prefix like /torpor/ (starts with '/', no spaces), "
                    f"got {text!r}")
    return text if text.endswith("/") else text + "/"


def _member_name(r: _Reader, key: str, value: object) -> str:
    text = _string(r, key, value)
    if not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", text) or len(text) > 253:
        r.fail(key, f"expected a name of letters, digits, '-', '_' and '.', got {text!r}")
    return text


def _boolean(r: _Reader, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        r.fail(key, f"expected true or false, got {_describe(value)}")
    return value


#: How Envoy finds a service (gateway.routing).
ROUTING_MODES = ("virtual_hosts", "host_header")
#: ADS variants an Envoy may be bootstrapped with (control_plane.xds_protocol).
XDS_PROTOCOLS = ("delta", "sotw")


def _choice(*options: str) -> _Parser:
    def parse(r: _Reader, key: str, value: object) -> str:
        if value not in options:
            r.fail(key, f"expected one of {', '.join(options)}, got {_describe(value)}")
        return str(value)

    return parse


_HOST_PORT_RE = re.compile(r"(?P<host>[^\s:/]+):(?P<port>[0-9]{1,5})")


def _split_host_port(r: _Reader, key: str, value: object) -> tuple[str, int]:
    match = _HOST_PORT_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        r.fail(key, f"expected an address host:port (e.g. 127.0.0.1:8080), got {_describe(value)}")
    port = int(match["port"])
    if port > 65535:
        r.fail(key, f"port {port} is out of range 0..65535")
    return match["host"], port


def _address(r: _Reader, key: str, value: object) -> Address:
    """host:port with port 0..65535; 0 means 'let the system pick' (tests)."""
    host, port = _split_host_port(r, key, value)
    return Address(host, port)


def _socket_address(r: _Reader, key: str, value: object) -> Address:
    """host:port, or unix:PATH (a Unix domain socket; relative to the config's folder)."""
    if isinstance(value, str) and value.startswith("unix:"):
        path = _path(r, key, value.removeprefix("unix:"))
        if len(str(path).encode()) > MAX_UNIX_PATH:
            r.fail(key, f"the socket path {path} is {len(str(path).encode())} bytes long; a "
                        f"Unix socket path has at most {MAX_UNIX_PATH}: give a shorter one")
        return Address.socket_file(path)
    return _address(r, key, value)


def _endpoints(r: _Reader, key: str, value: object) -> tuple[str, ...]:
    """A non-empty list of "host:port" client endpoints (etcd); port 0 cannot be dialled."""
    if not isinstance(value, list) or not value:
        r.fail(key, f"expected a non-empty list of host:port, got {_describe(value)}")
    for index, item in enumerate(value):
        _, port = _split_host_port(r, f"{key}[{index}]", item)
        if port == 0:
            r.fail(f"{key}[{index}]", "port 0 cannot be connected to; give the real port")
    return tuple(value)


def _path(r: _Reader, key: str, value: object) -> Path:
    """A path; relative ones are relative to the config file's folder, not to the cwd."""
    text = _string(r, key, value)
    return (r.folder / Path(text).expanduser()).resolve()


def _command(r: _Reader, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        r.fail(key, f"expected a non-empty list of strings, got {_describe(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            # Unquoted {port} is a YAML mapping and 8080 an integer: both need quotes.
            r.fail(f"{key}[{index}]", f"expected a string, got {_describe(item)} (quote it)")
    return tuple(value)


def _env(r: _Reader, key: str, value: object) -> tuple[tuple[str, str], ...]:
    pairs = _mapping(r, key, value)
    for name, item in pairs.items():
        if not isinstance(name, str) or not name or "=" in name:
            r.fail(key, f"environment variable name {name!r} is not valid")
        if not isinstance(item, str):
            r.fail(_join(key, name), f"expected a string, got {_describe(item)} (quote it)")
    return tuple(pairs.items())


def _ready_path(r: _Reader, key: str, value: object) -> str:
    text = _string(r, key, value)
    if not text.startswith("/") or any(c.isspace() for c in text):
        r.fail(key, f"expected a URL path starting with '/' (e.g. /healthz), got {text!r}")
    return text


_SERVICE_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _service_name(r: _Reader, key: str, value: object) -> str:
    """A DNS-1123 label: it becomes an Envoy cluster name, a metric label and a k8s name."""
    text = _string(r, key, value)
    if len(text) > 63 or not _SERVICE_NAME_RE.fullmatch(text):
        r.fail(
            key,
            f"{text!r} is not a valid service name; use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters",
        )
    return text


def _group_name(r: _Reader, key: str, value: object) -> str:
    """A service group's name: the rule of service names (it appears in logs, metrics and
    Kubernetes annotations alike)."""
    text = _string(r, key, value)
    if len(text) > 63 or not _SERVICE_NAME_RE.fullmatch(text):
        r.fail(key, f"{text!r} is not a valid group name; use lowercase letters, digits and "
                    "'-', starting and ending with a letter or digit, at most 63 characters")
    return text


_HOST_LABEL_RE = re.compile(r"[a-z0-9_]([-a-z0-9_]*[a-z0-9_])?")


def _service_host(r: _Reader, key: str, value: object) -> str:
    """The Host header to match, lowercased because Host matching ignores case. A DNS name
    (labels of letters, digits, '-' and '_', at most 253 characters): a wildcard or any
    other character would make Envoy refuse the whole route table, every service's."""
    text = _string(r, key, value)
    if any(c.isspace() for c in text) or ":" in text or "/" in text:
        r.fail(key, f"expected a bare host name without spaces, port or path, got {text!r}")
    host = text.lower()
    if "*" in host:
        r.fail(key, f"{text!r}: wildcard hosts are not supported; give the exact host name")
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(len(label) <= 63 and _HOST_LABEL_RE.fullmatch(label)
                                  for label in labels):
        r.fail(key, f"{text!r} is not a host name; expected labels of letters, digits, '-' "
               "and '_' separated by dots (each at most 63 characters, 253 in all)")
    return host


def _extra_hosts(r: _Reader, key: str, value: object) -> tuple[str, ...]:
    """More hosts, each exact (as `host`) or a wildcard `*.suffix` (every host that ends
    with `.suffix`: Envoy's only wildcard that routes by name)."""
    if not isinstance(value, list):
        r.fail(key, f"expected a list of hosts, got {_describe(value)}")
    hosts: list[str] = []
    for index, item in enumerate(value):
        at = f"{key}[{index}]"
        text = _string(r, at, item)
        wildcard = text.startswith("*.")
        host = _service_host(r, at, text[2:] if wildcard else text)
        host = "*." + host if wildcard else host
        if host in hosts:
            r.fail(at, f"{text!r} is listed twice")
        hosts.append(host)
    return tuple(hosts)


def _path_prefixes(r: _Reader, key: str, value: object) -> tuple[str, ...]:
    """Path prefixes: '/' or '/a/b' (no trailing '/', no '?' or '#', no spaces)."""
    if not isinstance(value, list) or not value:
        r.fail(key, f"expected a non-empty list of path prefixes, got {_describe(value)}")
    paths: list[str] = []
    for index, item in enumerate(value):
        at = f"{key}[{index}]"
        path = _string(r, at, item)
        if (not path.startswith("/") or any(c.isspace() for c in path) or "?" in path
                or "#" in path or (path != "/" and (path.endswith("/") or "//" in path))):
            r.fail(at, f"expected a path prefix like /v1/models/sentiment (a leading '/', "
                   f"no trailing '/', no '?', '#' or spaces), got {path!r}")
        if path in paths:
            r.fail(at, f"{path!r} is listed twice")
        paths.append(path)
    return tuple(paths)


def _rewrite(r: _Reader, key: str, value: object) -> str:
    path = _string(r, key, value)
    if not path.startswith("/") or any(c.isspace() for c in path) or "?" in path:
        r.fail(key, f"expected a path like / or /api (a leading '/', no '?' or spaces), "
               f"got {path!r}")
    return path


def _advertised_host(r: _Reader, key: str, value: object) -> str:
    """A host name or IP address, no port (the listen ports are used)."""
    text = _string(r, key, value)
    if not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?", text):
        r.fail(key, f"expected a host name or IPv4 address without a port, got {text!r}")
    return text


_CLIENT_TLS = _Schema(
    ClientTlsConfig, {"ca": _Field(_path), "cert": _Field(_path), "key": _Field(_path)})


def _client_tls(r: _Reader, key: str, value: object) -> ClientTlsConfig:
    """A client's TLS files; a certificate goes with its key."""
    tls = _read(r, key, value, _CLIENT_TLS)
    if (tls.cert is None) != (tls.key is None):
        r.fail(key, "give both cert and key (a client certificate needs its key), or neither")
    return tls


def _with_default(schema: _Schema[_T], name: str, raw: str) -> _Schema[_T]:
    """`schema` with the default of `name` computed at load time (a path in the log folder)."""
    field = dataclasses.replace(schema.fields[name], default=raw)
    return dataclasses.replace(schema, fields={**schema.fields, name: field})


_GATEWAY = _Schema(
    GatewayConfig,
    {"listen": _Field(_address, "127.0.0.1:8080"),
     # Default: a socket in the log folder (load_config), set by _with_default.
     "admin": _Field(_socket_address, _REQUIRED),
     "retry_buffer_bytes": _Field(_integer(0, 64 * 1024 * 1024)),
     "max_request_headers_kb": _Field(_integer(1, MAX_REQUEST_HEADERS_KB_LIMIT)),
     "xds_tls": _Field(_client_tls),
     "stats_flush_interval": _Field(_duration_within(MIN_STATS_FLUSH, MAX_STATS_FLUSH)),
     "stats_listen": _Field(_address),
     "tls": _Field(lambda r, key, value: _gateway_tls(r, key, value)),
     "auth": _Field(lambda r, key, value: _auth(r, key, value)),
     "upstream_code_stats": _Field(_boolean),
     "routing": _Field(_choice(*ROUTING_MODES))},
)
_SERVER_TLS = _Schema(
    ServerTlsConfig,
    {"cert": _Field(_path, _REQUIRED), "key": _Field(_path, _REQUIRED),
     "client_ca": _Field(_path, _REQUIRED, "mTLS needs the CA that signed the Envoys' "
                                           "certificates (torpor certs makes one)")},
)
_ADMIN_TLS = _Schema(
    AdminTlsConfig,
    {"cert": _Field(_path, _REQUIRED), "key": _Field(_path, _REQUIRED),
     "ca": _Field(_path, _REQUIRED, "clients check the admin API's certificate against it")},
)
_ADMIN_TOKENS = _Schema(
    AdminTokensConfig, {"operator": _Field(_path), "read_only": _Field(_path)})
_CONTROL_PLANE = _Schema(
    ControlPlaneConfig,
    {
        "xds": _Field(_socket_address, _REQUIRED),  # default: a socket (load_config)
        "admin_api": _Field(_address, "127.0.0.1:18001"),
        "metrics": _Field(_address, "127.0.0.1:19090"),
        "ack_timeout": _Field(_duration(positive=True)),
        "node_id": _Field(_string),
        "stats_flush_every": _Field(_duration(positive=True)),
        "tls": _Field(_section(_SERVER_TLS)),
        "admin_tokens": _Field(_section(_ADMIN_TOKENS)),
        "admin_tls": _Field(_section(_ADMIN_TLS)),
        "xds_protocol": _Field(_choice(*XDS_PROTOCOLS)),
        "reload_poll": _Field(_off_or_within(MIN_RELOAD_POLL, MAX_RELOAD_POLL)),
    },
)
_ACTIVATOR = _Schema(
    ActivatorConfig,
    {
        "listen": _Field(_address, "127.0.0.1:18080"),
        "metrics": _Field(_address, "127.0.0.1:19091"),
        "listen_h2": _Field(_address, "127.0.0.1:18081"),
        "max_held_per_service": _Field(_integer(1, MAX_HELD_PER_SERVICE)),
        "max_held": _Field(_integer(1, MAX_HELD_PER_SERVICE)),
        "wake_timeout": _Field(_duration(positive=True)),
        "drain_grace": _Field(_duration()),
        "waking_page_template": _Field(_path),
        "advertise": _Field(_advertised_host),
        "async_spool": _Field(_path),
        "async_max_bytes": _Field(_integer(1, 1024 * 1024 * 1024)),
        "async_result_ttl": _Field(_duration(positive=True)),
        "async_max_calls": _Field(_integer(1, MAX_HELD_PER_SERVICE)),
        "async_calls": _Field(_boolean),
    },
)
#: The store's keys depend on its kind, so that `path` under etcd is an error, not ignored.
_STORES: Mapping[str, _Schema[StoreConfig]] = {
    "sqlite": _Schema(
        StoreConfig,
        {
            "kind": _Field(_choice("sqlite", "etcd"), "sqlite"),
            "path": _Field(_path, "./torpor-state.db"),
        },
    ),
    "etcd": _Schema(
        StoreConfig,
        {
            "kind": _Field(_choice("sqlite", "etcd")),
            "endpoints": _Field(
                _endpoints, _REQUIRED, 'give the etcd servers, e.g. ["127.0.0.1:2379"]'
            ),
            "prefix": _Field(_key_prefix),
            "lease_ttl": _Field(_duration_at_least(2.0)),
            "timeout": _Field(_duration(positive=True)),
            "member": _Field(_member_name),
            "tls": _Field(_client_tls),
            "user": _Field(_string),
            "password_file": _Field(_path),
        },
    ),
}
def _names(r: _Reader, key: str, value: object) -> tuple[str, ...]:
    """A list of Kubernetes names (namespaces): DNS-1123 labels."""
    if not isinstance(value, list):
        r.fail(key, f"expected a list of names, got {_describe(value)}")
    return tuple(_kube_name(r, f"{key}[{index}]", item) for index, item in enumerate(value))


def _port_range(r: _Reader, key: str, value: object) -> tuple[int, int]:
    """LOW-HIGH, both inclusive, from 1024 to 65535 (local replicas' ports)."""
    text = str(value) if isinstance(value, str) else ""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if match is None:
        r.fail(key, f"expected a port range like 20000-29999, got {_describe(value)}")
    low, high = int(match[1]), int(match[2])
    if not 1024 <= low < high <= 65535:
        r.fail(key, f"expected LOW-HIGH with 1024 ≤ LOW < HIGH ≤ 65535, got {text.strip()}")
    return low, high


def _kube_name(r: _Reader, key: str, value: object) -> str:
    text = _string(r, key, value)
    if len(text) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", text):
        r.fail(key, f"{text!r} is not a Kubernetes name (lowercase letters, digits, '-', '.')")
    return text


#: Kubernetes-only keys under `kind: local` are errors, not silently ignored.
_WORKLOADS: Mapping[str, _Schema[WorkloadsConfig]] = {
    "local": _Schema(WorkloadsConfig, {"kind": _Field(_choice("local", "kubernetes"), "local"),
                                       "ports": _Field(_port_range)}),
    "kubernetes": _Schema(
        WorkloadsConfig,
        {
            "kind": _Field(_choice("local", "kubernetes")),
            "kubeconfig": _Field(_path),
            "context": _Field(_string),
            "discover": _Field(_boolean),
            "namespaces": _Field(_names),
            "poll_every": _Field(_duration(positive=True)),
        },
    ),
}
_POLICY = _Schema(
    PolicyConfig,
    {
        "kind": _Field(_choice(*POLICY_KINDS)),
        "idle_after": _Field(_duration()),
        "evict_after": _Field(_duration()),
        "creation_grace": _Field(_duration()),
        "check_every": _Field(_duration(positive=True)),
        "cold_start_price": _Field(_duration()),
        "prewake": _Field(_boolean),
    },
)
_SERVICE_POLICY = _Schema(
    ServicePolicyConfig,
    {
        "kind": _Field(_choice(*POLICY_KINDS)),
        "idle_after": _Field(_duration()),
        "evict_after": _Field(_duration()),
        "creation_grace": _Field(_duration()),
        "cold_start_price": _Field(_duration()),
        "prewake": _Field(_boolean),
    },
)
_RATE_LIMIT = _Schema(
    RateLimitConfig,
    {
        "requests_per_second": _Field(_integer(1, 1_000_000), _REQUIRED),
        "burst": _Field(_integer(1, 10_000_000)),
    },
)
_WAKE = _Schema(WakeConfig, {"flip_when": _Field(_choice("first_ready", "all_ready"))})
_LIVENESS = _Schema(
    LivenessConfig,
    {
        "enabled": _Field(_boolean),
        "period": _Field(_duration_within(0.5, 3600)),
        "timeout": _Field(_duration_within(0.1, 300)),
        "failures": _Field(_integer(1, 100)),
    },
)
_LOCAL = _Schema(
    LocalServiceConfig,
    {
        "command": _Field(
            _command,
            _REQUIRED,
            "a local service needs the command that starts one replica, e.g. "
            '[python, -m, torpor.examples.model_server, --port, "{port}"]',
        ),
        "ready_path": _Field(_ready_path),
        "cwd": _Field(_path, "."),
        "env": _Field(_env),
        "stop_grace": _Field(_duration()),
        "ready_probe": _Field(_choice("http", "tcp")),
        "liveness": _Field(_section(_LIVENESS)),
    },
)
_KUBERNETES = _Schema(
    KubernetesServiceConfig,
    {
        "namespace": _Field(_kube_name, _REQUIRED),
        "deployment": _Field(_kube_name, _REQUIRED),
        "port": _Field(_integer(1, 65535), _REQUIRED),
        "service": _Field(_kube_name),
    },
)
_SERVICE = _Schema(
    ServiceConfig,
    {
        "name": _Field(_service_name, _REQUIRED),
        "host": _Field(
            _service_host, _REQUIRED, "give the Host header it answers, e.g. echo.localhost"
        ),
        "replicas": _Field(_integer(0, MAX_REPLICAS)),
        "local": _Field(_section(_LOCAL)),
        "kubernetes": _Field(_section(_KUBERNETES)),
        "protocol": _Field(_choice("http1", "http2")),
        "never_sleep": _Field(_boolean),
        "policy": _Field(_section(_SERVICE_POLICY)),
        "retry_non_idempotent": _Field(_boolean),
        "waking_page": _Field(_boolean),
        "hosts": _Field(_extra_hosts),
        "paths": _Field(_path_prefixes),
        "rewrite": _Field(_rewrite),
        "auth": _Field(lambda r, key, value: _auth(r, key, value)),
        "versions": _Field(lambda r, key, value: _versions(r, key, value)),
        "rate_limit": _Field(_section(_RATE_LIMIT)),
        "max_concurrent": _Field(_integer(1, MAX_HELD_PER_SERVICE)),
        "wake_timeout": _Field(_duration(positive=True)),
        "max_held": _Field(_integer(1, MAX_HELD_PER_SERVICE)),
        "activation_replicas": _Field(_integer(1, MAX_REPLICAS)),
        "min_awake": _Field(_duration()),
        "group": _Field(_group_name),
    },
)
_TOP_LEVEL_KEYS = (
    "gateway",
    "control_plane",
    "activator",
    "store",
    "workloads",
    "policy",
    "wake",
    "services",
)


def _workloads(r: _Reader, key: str, value: object) -> WorkloadsConfig:
    kind = _mapping(r, key, value).get("kind", "local")
    _choice(*_WORKLOADS)(r, _join(key, "kind"), kind)
    return _read(r, key, value, _WORKLOADS[kind])


def _store(r: _Reader, key: str, value: object) -> StoreConfig:
    kind = _mapping(r, key, value).get("kind", "sqlite")
    _choice(*_STORES)(r, _join(key, "kind"), kind)
    return _read(r, key, value, _STORES[kind])


def _services(r: _Reader, key: str, value: object, workloads: str) -> tuple[ServiceConfig, ...]:
    """The service list; names and hosts are unique, each has the block its workloads need."""
    if value is None:
        return ()
    if not isinstance(value, list):
        r.fail(key, f"expected a list of services, got {_describe(value)}")
    services: list[ServiceConfig] = []
    first_by_name: dict[str, str] = {}
    table = RouteTable()
    where: list[str] = []
    for index, item in enumerate(value):
        at = f"{key}[{index}]"
        service = _read(r, at, item, _SERVICE)
        if service.versions:
            for name in ("local", "kubernetes"):
                if getattr(service, name) is not None:
                    r.fail(_join(at, name), "a service with versions runs each version's "
                           "workload: give it under versions[]")
            members = [(f"{at}.versions[{i}]", _version_service(service, v))
                       for i, v in enumerate(service.versions)]
        else:
            members = [(at, service)]
        names = [(at, service.name)] if service.versions else []
        for member_at, member in [*names, *((m_at, m.name) for m_at, m in members)]:
            if member in first_by_name:
                r.fail(_join(member_at, "name"),
                       f"duplicate service name {member!r}, already used by "
                       f"{first_by_name[member]}")
            first_by_name[member] = member_at
        for member_at, member_service in members:
            _check_workload(r, member_at, member_service, workloads)
        clashes = table.clashes(service.routes())
        if clashes:
            host, path, owner = clashes[0]
            r.fail(_join(at, "host" if host == service.host else "hosts"),
                   f"duplicate {describe_clash(host, path)}, already used by service "
                   f"{owner!r} ({first_by_name[owner]}); two services need different hosts "
                   "or paths")
        if service.rewrite is not None and not service.paths:
            r.fail(_join(at, "rewrite"), "rewrites the path prefix given in `paths`; "
                   "give the service paths too")
        table.put(service.routes())
        services.extend(member for _, member in members)
        where.extend(at for _ in members)
    for at, service in zip(where, services, strict=True):
        if service.rate_limit is not None and table.shares_host(service.version_of
                                                                or service.name):
            r.fail(_join(at, "rate_limit"),
                   f"service {service.name!r} shares a host with another service; a rate "
                   "limit needs a host of its own (it applies per host, to every path)")
    return tuple(services)


_WILDCARD_HOSTS = frozenset({"0.0.0.0"})
_HOST_ALIASES: Mapping[str, str] = {"localhost": "127.0.0.1"}


def _check_port_clashes(r: _Reader, config: Config) -> None:
    """Two listeners on one port fail at bind time, far from the cause; name both keys now."""
    seen: list[tuple[str, Address]] = []
    for key, address in config.listeners().items():
        if address.is_unix:
            for other_key, other in seen:
                if other.unix == address.unix:
                    r.fail(key, f"{address} is also {other_key}; each socket needs its own path")
        elif address.port != 0:
            host = _HOST_ALIASES.get(address.host, address.host)
            for other_key, other in seen:
                other_host = _HOST_ALIASES.get(other.host, other.host)
                same_host = host == other_host or bool({host, other_host} & _WILDCARD_HOSTS)
                if other.port == address.port and same_host:
                    r.fail(
                        key,
                        f"{address} clashes with {other_key} ({other}); "
                        "each listener needs its own port",
                    )
        seen.append((key, address))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            continue  # SafeLoader's construct_mapping reports unhashable keys itself
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping", mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _at(mark: yaml.Mark | None) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _while(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's context ("while parsing a flow sequence") and where it began, often the
    real culprit (an unclosed bracket lines above the point of detection)."""
    if not exc.context:
        return ""
    started = _at(exc.context_mark).replace(" at ", " started at ", 1)
    return f" ({exc.context}{started})"


def _parse_yaml(r: _Reader, text: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no objects
    except yaml.MarkedYAMLError as exc:
        r.fail("", f"YAML syntax error{_at(exc.problem_mark)}: {exc.problem}{_while(exc)}")
    except yaml.YAMLError as exc:
        r.fail("", f"YAML syntax error: {exc}")


def load_config(path: str | Path) -> Config:
    """Read, validate and default the YAML config at `path`.

    Every problem raises ConfigError naming the file, the dotted key and the problem, so a
    bad file stops `torpor up` before any process starts. Relative paths in the file
    (store.path, services[].local.cwd) are relative to the file's folder, so the same file
    works whatever the current directory is.
    """
    file = Path(path)
    r = _Reader(str(path), file.resolve().parent)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        r.fail("", "config file not found")
    except (OSError, UnicodeDecodeError) as exc:
        r.fail("", f"cannot read the config file: {exc}")
    raw = _parse_yaml(r, text)
    if raw is None:
        r.fail(
            "", f"the file is empty; expected a mapping of sections: {', '.join(_TOP_LEVEL_KEYS)}"
        )
    if not isinstance(raw, dict):
        r.fail("", f"expected a mapping of sections at the top level, got {_describe(raw)}")
    top: dict[Any, Any] = raw
    for name in top:
        if name not in _TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(name), _TOP_LEVEL_KEYS, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            r.fail(str(name), f"unknown key{guess}; allowed keys: {', '.join(_TOP_LEVEL_KEYS)}")
    workloads = _workloads(r, "workloads", top.get("workloads"))
    store = _store(r, "store", top.get("store"))
    # Envoy's admin and ADS default to owner-only sockets beside the state: no TCP port
    # that any local user could reach (README "Security").
    logs = log_dir_of(file.resolve(), store)
    config = Config(
        path=file.resolve(),
        gateway=_read(r, "gateway", top.get("gateway"),
                      _with_default(_GATEWAY, "admin", f"unix:{logs / 'envoy-admin.sock'}")),
        control_plane=_read(r, "control_plane", top.get("control_plane"),
                            _with_default(_CONTROL_PLANE, "xds", f"unix:{logs / 'xds.sock'}")),
        activator=_read(r, "activator", top.get("activator"), _ACTIVATOR),
        store=store,
        workloads=workloads,
        policy=_read(r, "policy", top.get("policy"), _POLICY),
        services=_services(r, "services", top.get("services"), workloads.kind),
        wake=_read(r, "wake", top.get("wake"), _WAKE),
    )
    _check_port_clashes(r, config)
    return config


_SNI_CERTIFICATE = _Schema(
    CertificateConfig,
    {"cert": _Field(_path, _REQUIRED), "key": _Field(_path, _REQUIRED),
     "hosts": _Field(_extra_hosts, _REQUIRED, "the names (SNI) this certificate is for")},
)


def _sni(r: _Reader, key: str, value: object) -> tuple[CertificateConfig, ...]:
    if not isinstance(value, list):
        r.fail(key, f"expected a list of {{hosts, cert, key}}, got {_describe(value)}")
    entries = [_read(r, f"{key}[{i}]", item, _SNI_CERTIFICATE) for i, item in enumerate(value)]
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        for host in entry.hosts:
            if host in seen:
                r.fail(f"{key}[{i}].hosts", f"{host!r} already has the certificate of "
                       f"{key}[{seen[host]}]")
            seen[host] = i
    return tuple(entries)


_GATEWAY_TLS = _Schema(
    GatewayTlsConfig,
    {"cert": _Field(_path, _REQUIRED), "key": _Field(_path, _REQUIRED),
     "sni": _Field(_sni), "http2": _Field(_boolean)},
)


def _gateway_tls(r: _Reader, key: str, value: object) -> GatewayTlsConfig:
    """The gateway's TLS, each certificate and key read and matched now: a bad file is a
    config error at start, not a listener Envoy refuses later."""
    tls = _read(r, key, value, _GATEWAY_TLS)
    pairs = [(key, tls.cert, tls.key)] + [(f"{key}.sni[{i}]", e.cert, e.key)
                                         for i, e in enumerate(tls.sni)]
    for at, cert, private in pairs:
        try:
            read_certificate(cert, private)
        except ValueError as exc:
            r.fail(at, str(exc))
    return tls


_VERSION = _Schema(
    VersionConfig,
    {"name": _Field(lambda r, key, value: _version_name(r, key, value), _REQUIRED),
     "replicas": _Field(_integer(0, MAX_REPLICAS)),
     "weight": _Field(_integer(0, 1_000_000)),
     "local": _Field(_section(_LOCAL)),
     "kubernetes": _Field(_section(_KUBERNETES))},
)
#: Between a service's name and its version's in the version's own service name.
VERSION_SEPARATOR = "--"


def _version_name(r: _Reader, key: str, value: object) -> str:
    name = _service_name(r, key, value)
    if VERSION_SEPARATOR in name:
        r.fail(key, f"a version name may not contain {VERSION_SEPARATOR!r}, got {name!r}")
    return name


def _versions(r: _Reader, key: str, value: object) -> tuple[VersionConfig, ...]:
    """Versions: names unique, weights not all 0 (some version takes the traffic)."""
    if not isinstance(value, list) or not value:
        r.fail(key, f"expected a non-empty list of versions, got {_describe(value)}")
    versions = [_read(r, f"{key}[{i}]", item, _VERSION) for i, item in enumerate(value)]
    seen: set[str] = set()
    for i, version in enumerate(versions):
        if version.name in seen:
            r.fail(f"{key}[{i}].name", f"version {version.name!r} is listed twice")
        seen.add(version.name)
    if not any(v.weight for v in versions):
        r.fail(key, "every weight is 0: give at least one version a weight (its share of "
               "the traffic)")
    return tuple(versions)


def _version_service(service: ServiceConfig, version: VersionConfig) -> ServiceConfig:
    """A version as a service of its own: the service's settings, the version's workload."""
    return dataclasses.replace(
        service, name=f"{service.name}{VERSION_SEPARATOR}{version.name}",
        replicas=version.replicas, local=version.local, kubernetes=version.kubernetes,
        versions=(), version_of=service.name, version=version.name, weight=version.weight)


def _check_workload(r: _Reader, at: str, service: ServiceConfig, workloads: str) -> None:
    needed, other = ("local", "kubernetes") if workloads == "local" else ("kubernetes", "local")
    if getattr(service, needed) is None:
        r.fail(_join(at, needed),
               f"missing; workloads.kind is {workloads}, so each service needs a {needed}: block")
    if getattr(service, other) is not None:
        r.fail(_join(at, other), f"not used when workloads.kind is {workloads}; remove it")
    if workloads == "local" and service.replicas > MAX_LOCAL_REPLICAS:
        r.fail(_join(at, "replicas"), f"expected at most {MAX_LOCAL_REPLICAS} replicas of "
               f"one service on this machine (each is a process), got {service.replicas}")


def _strings(r: _Reader, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        r.fail(key, f"expected a list of strings, got {_describe(value)}")
    return tuple(_string(r, f"{key}[{index}]", item) for index, item in enumerate(value))


#: jwt.jwks_cache bounds: Envoy keeps a fetched JWKS for whole seconds; beyond a day a
#: rotated key waits longer than anyone expects. jwt.jwks_timeout: one fetch's try.
JWKS_CACHE_BOUNDS, JWKS_TIMEOUT_BOUNDS = (1.0, 86400.0), (0.1, 60.0)
#: The keys of a JWKS fetched from a URL, refused beside a JWKS file.
_JWKS_URL_KEYS = ("jwks_cache", "jwks_timeout", "jwks_ca")


def _jwks_url(r: _Reader, key: str, value: object) -> str:
    """An http or https URL with a host (and no user or fragment): where Envoy fetches the
    JWKS."""
    text = _string(r, key, value)
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError as exc:
        r.fail(key, f"expected an http or https URL, got {text!r}: {exc}")
    if (url.scheme not in ("http", "https") or not url.hostname or url.username is not None
            or url.fragment or any(c.isspace() for c in text)):
        r.fail(key, "expected an http or https URL with a host, without user or fragment "
               f"(e.g. https://login.example.com/.well-known/jwks.json), got {text!r}")
    if port == 0:
        r.fail(key, f"expected a port from 1 to 65535 in {text!r}")
    return text


_JWT = _Schema(
    JwtConfig,
    {"issuer": _Field(_string, _REQUIRED, "the `iss` the tokens carry"),
     "jwks": _Field(_path),
     "audiences": _Field(_strings),
     "jwks_url": _Field(_jwks_url),
     "jwks_cache": _Field(_duration_within(*JWKS_CACHE_BOUNDS)),
     "jwks_timeout": _Field(_duration_within(*JWKS_TIMEOUT_BOUNDS)),
     "jwks_ca": _Field(_path)},
)
_AUTH = _Schema(AuthConfig, {"api_keys": _Field(_path), "jwt": _Field(_section(_JWT))})
#: `auth: none` on a service: not asked, even when gateway.auth is set.
NO_AUTH = AuthConfig()


def service_auth(service: ServiceConfig, gateway: GatewayConfig) -> AuthConfig | None:
    """Who may call `service`: its own auth, else the gateway's; None: anyone."""
    auth = service.auth if service.auth is not None else gateway.auth
    return None if auth is None or auth == NO_AUTH else auth


def _auth(r: _Reader, key: str, value: object) -> AuthConfig:
    """An auth section, its files read now (a missing or bad one is a config error)."""
    if value in ("none", False):
        return NO_AUTH
    auth = _read(r, key, value, _AUTH)
    if (auth.api_keys is None) == (auth.jwt is None):
        r.fail(key, "give one of api_keys (a file of `client: key` lines) or jwt "
               "({issuer, jwks or jwks_url, audiences}); `none` turns a gateway-wide one off")
    try:
        if auth.api_keys is not None:
            read_api_keys(auth.api_keys)
    except ValueError as exc:
        r.fail(_join(key, "api_keys"), str(exc))
    if auth.jwt is not None:
        raw = _mapping(r, key, value).get("jwt")
        _check_jwks(r, _join(key, "jwt"), auth.jwt, raw if isinstance(raw, dict) else {})
    return auth


def _check_jwks(r: _Reader, key: str, jwt: JwtConfig, raw: dict[str, Any]) -> None:
    """One JWKS, a file or a URL, and its files read now (a missing or bad one is a config
    error); the URL's own keys only beside a URL."""
    if (jwt.jwks is None) == (jwt.jwks_url is None):
        r.fail(key, "give exactly one of jwks (a JWKS file) or jwks_url (an http or https "
               "URL Envoy fetches the JWKS from)")
    if jwt.jwks is not None:
        given = [name for name in _JWKS_URL_KEYS if name in raw]
        if given:
            r.fail(_join(key, given[0]), "only with jwks_url (a JWKS file is re-read when it "
                   "changes)")
        try:
            read_jwks(jwt.jwks)
        except ValueError as exc:
            r.fail(_join(key, "jwks"), str(exc))
        return
    assert jwt.jwks_url is not None
    https = jwt.jwks_url.startswith("https:")
    if jwt.jwks_ca is not None and not https:
        r.fail(_join(key, "jwks_ca"), "only with an https jwks_url")
    if https:
        try:
            read_ca_bundle(jwks_ca_file(jwt.jwks_ca))
        except ValueError as exc:
            r.fail(_join(key, "jwks_ca"), str(exc))


def load_service(raw: object, source: str, config: Config) -> ServiceConfig:
    """One service given outside the file (`torpor register`): the keys, checks and errors
    of a `services:` entry under `config`'s workloads kind, relative paths against the
    config file's folder. Raises ConfigError naming `source` and the key."""
    r = _Reader(source, config.path.parent)
    try:
        return _services(r, "service", [raw], config.workloads.kind)[0]
    except ConfigError as exc:
        key = exc.key.removeprefix("service[0]").lstrip(".")
        raise ConfigError(source, key, exc.problem) from None
