"""Config loading: the example loads, and every bad file fails with one message that names
the file, the dotted key and the problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from torpor.config import Address, Config, load_config, parse_duration
from torpor.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torpor.yaml"

# A valid service block, reused by the bad cases that are about something else.
SERVICE = """
services:
  - name: echo
    host: echo.localhost
    local: {command: [python, -m, torpor.examples.model_server, --port, "{port}"]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "torpor.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def assert_names(err: ConfigError, path: Path, key: str, *problem: str) -> None:
    message = str(err)
    assert str(path) in message
    assert err.key == key
    assert f": {key}: " in message if key else True
    for part in problem:
        assert part in message, message


# --- the example ----------------------------------------------------------------------


def test_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert isinstance(config, Config)
    assert config.path == EXAMPLE
    assert config.gateway.listen == Address("127.0.0.1", 8080)
    assert config.activator.wake_timeout == 120.0
    assert config.policy.idle_after == 600.0
    assert config.policy.evict_after == 86400.0
    assert config.store.kind == "sqlite"
    assert config.store.path == EXAMPLE.parent / "torpor-state.db"
    assert config.workloads.kind == "local"
    assert [(s.name, s.host, s.replicas) for s in config.services] == [
        ("echo", "echo.localhost", 2),
        ("sentiment", "sentiment.localhost", 1),
    ]
    for service in config.services:
        assert service.local is not None
        assert service.local.command[:3] == ("python", "-m", "torpor.examples.model_server")
        assert "{port}" in service.local.command
        assert service.local.command[-2:] == ("--name", service.name)
        assert service.local.ready_path == "/healthz"
        assert service.kubernetes is None
    assert config.service("sentiment") is config.services[1]
    assert config.service("nope") is None


def test_defaults_fill_every_omitted_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "services: []\n"))
    assert {key: str(address) for key, address in config.listeners().items()} == {
        "gateway.listen": "127.0.0.1:8080",
        # Envoy's admin and ADS: owner-only sockets beside the state, no TCP port.
        "gateway.admin": f"unix:{tmp_path.resolve() / 'torpor-logs' / 'envoy-admin.sock'}",
        "control_plane.xds": f"unix:{tmp_path.resolve() / 'torpor-logs' / 'xds.sock'}",
        "control_plane.admin_api": "127.0.0.1:18001",
        "control_plane.metrics": "127.0.0.1:19090",
        "activator.listen": "127.0.0.1:18080",
        "activator.listen_h2": "127.0.0.1:18081",
        "activator.metrics": "127.0.0.1:19091",
    }
    assert config.control_plane.ack_timeout == 10.0
    assert config.control_plane.node_id == "torpor-gateway"
    assert config.activator.max_held_per_service == 1000
    assert config.store.kind == "sqlite"
    assert config.store.path == tmp_path.resolve() / "torpor-state.db"
    assert config.workloads.kind == "local"
    assert config.policy.check_every == 10.0
    assert config.services == ()


def test_full_local_service_and_relative_paths(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            control_plane: {ack_timeout: 250ms, node_id: edge-1}
            store: {kind: sqlite, path: state/db.sqlite}
            services:
              - name: m-1
                host: Model.Localhost
                replicas: 0
                local:
                  command: [python, serve.py, "{port}"]
                  ready_path: /ready
                  cwd: models
                  env: {OMP_NUM_THREADS: "4"}
                  stop_grace: 2s
            """,
        )
    )
    assert config.control_plane.ack_timeout == 0.25
    assert config.control_plane.node_id == "edge-1"
    assert config.store.path == tmp_path.resolve() / "state" / "db.sqlite"
    (service,) = config.services
    assert service.host == "model.localhost"
    assert service.replicas == 0
    assert service.local is not None
    assert service.local.cwd == tmp_path.resolve() / "models"
    assert service.local.env == (("OMP_NUM_THREADS", "4"),)
    assert service.local.stop_grace == 2.0


def test_etcd_store_and_kubernetes_workloads(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            store: {kind: etcd, endpoints: ["127.0.0.1:2379", "127.0.0.1:22379"]}
            workloads: {kind: kubernetes}
            services:
              - name: echo
                host: echo.localhost
                kubernetes: {namespace: models, deployment: echo, port: 8080}
            """,
        )
    )
    assert config.store.endpoints == ("127.0.0.1:2379", "127.0.0.1:22379")
    assert config.services[0].kubernetes is not None
    assert config.services[0].kubernetes.port == 8080
    assert config.services[0].local is None


def test_port_zero_never_clashes(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "gateway: {listen: 127.0.0.1:0, admin: 127.0.0.1:0}\n" + SERVICE)
    )
    assert config.gateway.listen.port == 0


# --- durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("10m", 600.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("1.5s", 1.5),
        ("0", 0.0),
        ("45", 45.0),
        (" 10m ", 600.0),
        (30, 30.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "   ", "10 minutes", "-5s", "-1", "5x", "s", "1h30m", "ten", "nan", "inf"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), True])
def test_parse_duration_rejects_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)


# --- bad files: one table, one message each ---------------------------------------------

BAD_CASES = [
    pytest.param(
        "gateway: {listn: 127.0.0.1:8080}\n" + SERVICE,
        "gateway.listn",
        ["unknown key", "did you mean 'listen'", "allowed keys: listen, admin"],
        id="unknown-key",
    ),
    pytest.param(
        "colour: blue\n" + SERVICE,
        "colour",
        ["unknown key", "gateway", "services"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        SERVICE + "    flavour: vanilla\n",
        "services[0].flavour",
        ["unknown key", "name, host, replicas, local, kubernetes"],
        id="unknown-service-key",
    ),
    pytest.param(
        "policy: {idle_after: 10 minutes}\n" + SERVICE,
        "policy.idle_after",
        ["'10 minutes' is not a duration", "30s"],
        id="bad-duration",
    ),
    pytest.param(
        "activator: {wake_timeout: 0s}\n" + SERVICE,
        "activator.wake_timeout",
        ["greater than 0"],
        id="zero-wake-timeout",
    ),
    pytest.param(
        SERVICE + "  - {name: echo, host: other.localhost, local: {command: [x]}}\n",
        "services[1].name",
        ["duplicate service name 'echo'", "services[0]"],
        id="duplicate-name",
    ),
    pytest.param(
        SERVICE + "  - {name: other, host: ECHO.localhost, local: {command: [x]}}\n",
        "services[1].host",
        ["duplicate host 'echo.localhost'", "services[0]"],
        id="duplicate-host-case-insensitive",
    ),
    pytest.param(
        "activator: {listen: 127.0.0.1:8080}\n" + SERVICE,
        "activator.listen",
        ["127.0.0.1:8080", "gateway.listen", "clashes"],
        id="port-clash",
    ),
    pytest.param(
        "gateway: {admin: 0.0.0.0:18001}\n" + SERVICE,
        "control_plane.admin_api",
        ["gateway.admin", "0.0.0.0:18001", "clashes"],
        id="port-clash-wildcard",
    ),
    pytest.param(
        "gateway: {admin: unix:/run/t/a.sock}\ncontrol_plane: {xds: unix:/run/t/a.sock}\n"
        + SERVICE,
        "control_plane.xds",
        ["unix:/run/t/a.sock", "gateway.admin", "own path"],
        id="socket-clash",
    ),
    pytest.param(
        "gateway: {admin: unix:/" + "d" * 120 + "/a.sock}\n" + SERVICE,
        "gateway.admin",
        ["at most 107", "shorter"],
        id="socket-path-too-long",
    ),
    pytest.param(
        "control_plane: {tls: {cert: s.pem, key: s-key.pem}}\n" + SERVICE,
        "control_plane.tls.client_ca",
        ["missing", "torpor certs"],
        id="mtls-without-client-ca",
    ),
    pytest.param(
        "gateway: {xds_tls: {cert: e.pem, ca: ca.pem}}\n" + SERVICE,
        "gateway.xds_tls",
        ["both cert and key"],
        id="client-cert-without-key",
    ),
    pytest.param(
        "control_plane: {admin_tokens: {operatr: t}}\n" + SERVICE,
        "control_plane.admin_tokens.operatr",
        ["unknown key", "did you mean 'operator'"],
        id="admin-tokens-typo",
    ),
    pytest.param(
        "store: {kind: sqlite, tls: {ca: ca.pem}}\n" + SERVICE,
        "store.tls",
        ["unknown key"],
        id="tls-under-sqlite",
    ),
    pytest.param(
        "services:\n  - {name: echo, host: echo.localhost, local: {ready_path: /healthz}}\n",
        "services[0].local.command",
        ["missing", "command that starts one replica"],
        id="missing-command",
    ),
    pytest.param(
        "services:\n  - {name: echo, host: echo.localhost, local: {command: []}}\n",
        "services[0].local.command",
        ["non-empty list of strings"],
        id="empty-command",
    ),
    pytest.param(
        "services:\n  - {name: echo, host: e.localhost, local: {command: [x, --port, {port}]}}\n",
        "services[0].local.command[2]",
        ["expected a string", "mapping", "quote it"],
        id="unquoted-port-placeholder",
    ),
    pytest.param(
        "services:\n  - {name: echo, host: echo.localhost}\n",
        "services[0].local",
        ["missing", "workloads.kind is local"],
        id="missing-local-block",
    ),
    pytest.param(
        "workloads: {kind: kubernetes}\n" + SERVICE,
        "services[0].kubernetes",
        ["missing", "workloads.kind is kubernetes"],
        id="missing-kubernetes-block",
    ),
    pytest.param(
        SERVICE + "    kubernetes: {namespace: m, deployment: echo, port: 8080}\n",
        "services[0].kubernetes",
        ["not used when workloads.kind is local"],
        id="extra-kubernetes-block",
    ),
    pytest.param(
        SERVICE + "    replicas: two\n",
        "services[0].replicas",
        ["expected an integer from 0 to 10000", "the string 'two'"],
        id="wrong-type",
    ),
    pytest.param(
        SERVICE + "    replicas: -1\n",
        "services[0].replicas",
        ["expected an integer from 0 to 10000", "-1"],
        id="negative-replicas",
    ),
    pytest.param(
        "activator: {max_held_per_service: 0}\n" + SERVICE,
        "activator.max_held_per_service",
        ["expected an integer from 1 to 1000000", "got 0"],
        id="zero-max-held",
    ),
    # One value Envoy would refuse (or that would crash at run time) is a config error,
    # never a route table Envoy refuses for every service.
    pytest.param(
        "activator: {max_held_per_service: 1000000000000000}\n" + SERVICE,
        "activator.max_held_per_service",
        ["expected an integer from 1 to 1000000", "got 1000000000000000"],
        id="huge-max-held",
    ),
    pytest.param(
        "activator: {wake_timeout: 4000000d}\n" + SERVICE,
        "activator.wake_timeout",
        ["'4000000d' is longer than 366d"],
        id="wake-timeout-out-of-envoys-range",
    ),
    pytest.param(
        "activator: {wake_timeout: 1.0e+300}\n" + SERVICE,
        "activator.wake_timeout",
        ["is longer than 366d"],
        id="wake-timeout-huge-number",
    ),
    pytest.param(
        "policy: {evict_after: 400d}\n" + SERVICE,
        "policy.evict_after",
        ["'400d' is longer than 366d"],
        id="evict-after-past-a-year",
    ),
    pytest.param(
        SERVICE.replace("echo.localhost", '"*"'),
        "services[0].host",
        ["'*': wildcard hosts are not supported"],
        id="wildcard-host",
    ),
    pytest.param(
        SERVICE.replace("echo.localhost", "'*.example.com'"),
        "services[0].host",
        ["wildcard hosts are not supported"],
        id="wildcard-subdomain-host",
    ),
    pytest.param(
        SERVICE.replace("echo.localhost", "'echo!.example.com'"),
        "services[0].host",
        ["'echo!.example.com' is not a host name"],
        id="host-with-a-bad-character",
    ),
    pytest.param(
        SERVICE + "    replicas: 10001\n",
        "services[0].replicas",
        ["expected an integer from 0 to 10000", "got 10001"],
        id="replicas-past-the-bound",
    ),
    pytest.param(
        SERVICE + "    replicas: 65\n",
        "services[0].replicas",
        ["at most 64 replicas of one service on this machine", "got 65"],
        id="too-many-local-replicas",
    ),
    pytest.param(
        "gateway: {max_request_headers_kb: 0}\n" + SERVICE,
        "gateway.max_request_headers_kb",
        ["expected an integer from 1 to 8192", "got 0"],
        id="header-limit-zero",
    ),
    pytest.param(
        "gateway: {max_request_headers_kb: 8193}\n" + SERVICE,
        "gateway.max_request_headers_kb",
        ["expected an integer from 1 to 8192", "got 8193"],
        id="header-limit-past-envoys-bound",
    ),
    pytest.param(
        "gateway: {listen: 127.0.0.1:70000}\n" + SERVICE,
        "gateway.listen",
        ["port 70000", "0..65535"],
        id="port-out-of-range",
    ),
    pytest.param(
        "gateway: {listen: localhost}\n" + SERVICE,
        "gateway.listen",
        ["expected an address host:port"],
        id="address-without-port",
    ),
    pytest.param(
        "services:\n  - {name: Echo_1, host: echo.localhost, local: {command: [x]}}\n",
        "services[0].name",
        ["'Echo_1' is not a valid service name"],
        id="bad-service-name",
    ),
    pytest.param(
        "services:\n  - {name: echo, host: 'echo.localhost:8080', local: {command: [x]}}\n",
        "services[0].host",
        ["without spaces, port or path"],
        id="host-with-port",
    ),
    pytest.param(
        "services:\n  - {name: echo, local: {command: [x]}}\n",
        "services[0].host",
        ["missing"],
        id="missing-host",
    ),
    pytest.param(
        "services:\n  - {name: echo, host: e.localhost, local: {command: [x], ready_path: h}}\n",
        "services[0].local.ready_path",
        ["starting with '/'"],
        id="ready-path-without-slash",
    ),
    pytest.param(
        "services:\n  - {name: echo, host: e.localhost, local: {command: [x], env: {A: 1}}}\n",
        "services[0].local.env.A",
        ["expected a string", "integer 1"],
        id="env-value-not-string",
    ),
    pytest.param(
        "store: {kind: etcd}\n" + SERVICE,
        "store.endpoints",
        ["missing", "127.0.0.1:2379"],
        id="etcd-without-endpoints",
    ),
    pytest.param(
        "store: {kind: etcd, endpoints: []}\n" + SERVICE,
        "store.endpoints",
        ["non-empty list of host:port"],
        id="etcd-empty-endpoints",
    ),
    pytest.param(
        "store: {kind: etcd, endpoints: ['127.0.0.1:2379'], path: x.db}\n" + SERVICE,
        "store.path",
        ["unknown key", "kind, endpoints"],
        id="path-under-etcd",
    ),
    pytest.param(
        "store: {kind: redis}\n" + SERVICE,
        "store.kind",
        ["one of sqlite, etcd", "'redis'"],
        id="unknown-store-kind",
    ),
    pytest.param(
        "workloads: {kind: docker}\n" + SERVICE,
        "workloads.kind",
        ["one of local, kubernetes"],
        id="unknown-workloads-kind",
    ),
    pytest.param(
        "services: {echo: {}}\n",
        "services",
        ["expected a list of services", "mapping"],
        id="services-not-a-list",
    ),
    pytest.param(
        "policy: 10m\n" + SERVICE,
        "policy",
        ["expected a mapping", "'10m'"],
        id="section-not-a-mapping",
    ),
    pytest.param(
        "wake: {flip_when: sometimes}\n" + SERVICE,
        "wake.flip_when",
        ["one of first_ready, all_ready", "'sometimes'"],
        id="bad-flip-when",
    ),
    pytest.param(
        SERVICE + "    never_sleep: yes please\n",
        "services[0].never_sleep",
        ["expected true or false"],
        id="never-sleep-not-boolean",
    ),
    pytest.param(
        SERVICE + "    retry_non_idempotent: sometimes\n",
        "services[0].retry_non_idempotent",
        ["expected true or false"],
        id="retry-non-idempotent-not-boolean",
    ),
    pytest.param(
        SERVICE + "    policy: {idle_after: soon}\n",
        "services[0].policy.idle_after",
        ["not a duration"],
        id="service-policy-bad-duration",
    ),
    pytest.param(
        SERVICE + "    policy: {check_every: 1s}\n",
        "services[0].policy.check_every",
        ["unknown key", "idle_after, evict_after, creation_grace"],
        id="service-policy-check-every-is-global",
    ),
    pytest.param(
        "control_plane: {stats_flush_every: 0s}\n" + SERVICE,
        "control_plane.stats_flush_every",
        ["greater than 0"],
        id="zero-flush-interval",
    ),
    pytest.param(
        "policy: {kind: smart}\n" + SERVICE,
        "policy.kind",
        ["expected one of learned, fixed", "'smart'"],
        id="policy-kind-unknown",
    ),
    pytest.param(
        "policy: {cold_start_price: expensive}\n" + SERVICE,
        "policy.cold_start_price",
        ["not a duration"],
        id="cold-start-price-not-a-duration",
    ),
    pytest.param(
        "policy: {prewake: sometimes}\n" + SERVICE,
        "policy.prewake",
        ["expected true or false"],
        id="prewake-not-boolean",
    ),
    pytest.param(
        SERVICE + "    policy: {kind: timer}\n",
        "services[0].policy.kind",
        ["expected one of learned, fixed"],
        id="service-policy-kind-unknown",
    ),
    pytest.param(
        SERVICE + "    policy: {cold_start_pric: 1h}\n",
        "services[0].policy.cold_start_pric",
        ["unknown key", "did you mean 'cold_start_price'"],
        id="service-policy-typo",
    ),
]


def test_hibernation_keys(tmp_path: Path) -> None:
    path = write(tmp_path, SERVICE + """\
    never_sleep: true
    retry_non_idempotent: true
    policy: {idle_after: 30s}
wake: {flip_when: all_ready}
control_plane: {stats_flush_every: 5s}
""")
    config = load_config(path)
    service = config.services[0]
    assert service.never_sleep is True
    assert service.retry_non_idempotent is True
    assert service.policy.idle_after == 30.0
    assert service.policy.evict_after is None  # inherits policy.evict_after
    assert config.wake.flip_when == "all_ready"
    assert config.control_plane.stats_flush_every == 5.0
    defaults = load_config(write(tmp_path, SERVICE))
    assert defaults.wake.flip_when == "first_ready"
    assert defaults.services[0].never_sleep is False
    assert defaults.services[0].retry_non_idempotent is False


@pytest.mark.parametrize(("text", "key", "problem"), BAD_CASES)
def test_bad_config(tmp_path: Path, text: str, key: str, problem: list[str]) -> None:
    path = tmp_path / "torpor.yaml"
    err = load_error(tmp_path, text)
    assert_names(err, path, key, *problem)


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "torpor.yaml"
    err = load_error(tmp_path, "gateway:\n  listen: [127.0.0.1:8080\nservices: []\n")
    assert_names(err, path, "", "YAML syntax error", "line 3, column")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "torpor.yaml"
    err = load_error(tmp_path, "policy:\n  idle_after: 1m\n  idle_after: 2m\n")
    assert_names(err, path, "", "line 3", "'idle_after' is given twice")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "torpor.yaml"
    err = load_error(tmp_path, text)
    assert str(path) in str(err)
    assert "mapping" in err.problem


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_policy_kind_and_learning_keys(tmp_path: Path) -> None:
    defaults = load_config(write(tmp_path, SERVICE))
    assert defaults.policy.kind == "learned"  # the default
    assert (defaults.policy.cold_start_price, defaults.policy.prewake) == (7200.0, True)
    own = defaults.services[0].policy
    assert (own.kind, own.cold_start_price, own.prewake) == (None, None, None)
    config = load_config(write(tmp_path, """\
policy: {kind: fixed, cold_start_price: 30m, prewake: false}
""" + SERVICE + """\
    policy: {kind: learned, cold_start_price: 90s, prewake: true}
"""))
    assert (config.policy.kind, config.policy.cold_start_price, config.policy.prewake) == (
        "fixed", 1800.0, False)
    own = config.services[0].policy
    assert (own.kind, own.cold_start_price, own.prewake) == ("learned", 90.0, True)


def test_security_keys_resolve_relative_to_the_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
        gateway:
          admin: unix:run/admin.sock
          xds_tls: {cert: c/e.pem, key: c/e-key.pem, ca: c/ca.pem}
        control_plane:
          xds: 127.0.0.1:18000
          tls: {cert: c/s.pem, key: c/s-key.pem, client_ca: c/ca.pem}
          admin_tokens: {operator: secrets/op, read_only: secrets/ro}
        store: {kind: etcd, endpoints: ["127.0.0.1:2379"], tls: {ca: c/ca.pem}, user: torpor,
                password_file: secrets/etcd}
        services: []
        """))
    root = tmp_path.resolve()
    assert config.gateway.admin.unix == root / "run" / "admin.sock"
    assert str(config.gateway.admin) == f"unix:{root / 'run' / 'admin.sock'}"
    assert config.gateway.admin.port == 0 and config.gateway.admin.is_unix
    assert config.gateway.xds_tls is not None and config.gateway.xds_tls.cert == root / "c/e.pem"
    assert config.control_plane.tls is not None
    assert config.control_plane.tls.client_ca == root / "c/ca.pem"
    assert config.control_plane.admin_tokens.operator == root / "secrets/op"
    assert config.control_plane.admin_tokens.read_only == root / "secrets/ro"
    assert config.store.tls is not None and config.store.tls.ca == root / "c/ca.pem"
    assert config.store.tls.cert is None
    assert config.store.user == "torpor" and config.store.password_file == root / "secrets/etcd"
