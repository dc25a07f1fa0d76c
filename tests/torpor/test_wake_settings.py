"""Per-service wake settings and groups: the config keys and their bounds, the Kubernetes
annotations, the resolution against the activator section, and what Envoy is given."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from tests.torpor.test_annotations import deployment, problems
from torpor.config import ActivatorConfig, Address, ServiceConfig, load_config
from torpor.errors import ConfigError
from torpor.model import Endpoint
from torpor.wake_settings import (
    WakeSettings,
    first_replicas,
    group_members,
    groups,
    largest_max_held,
    longest_wake_timeout,
    wake_settings,
)
from torpor.workloads.annotations import service_from_deployment
from xds_server.routing import gateway_settings

ACTIVATOR = ActivatorConfig(Address("127.0.0.1", 1), Address("127.0.0.1", 2),
                            max_held_per_service=100, wake_timeout=120.0)


def config_with(tmp_path: Path, service_keys: str, activator: str = "") -> Path:
    path = tmp_path / "torpor.yaml"
    path.write_text(textwrap.dedent(f"""
        activator: {{wake_timeout: 10s, max_held_per_service: 50{activator}}}
        services:
          - name: llm
            host: llm.localhost
            replicas: 3
            local: {{command: [python, -m, torpor.examples.model_server, --port, "{{port}}"]}}
        """) + textwrap.indent(textwrap.dedent(service_keys), " " * 4))
    return path


def test_the_keys_are_read(tmp_path: Path) -> None:
    config = load_config(config_with(tmp_path, """\
        wake_timeout: 5m
        max_held: 7
        activation_replicas: 1
        min_awake: 90s
        group: pipeline
        """))
    llm = config.services[0]
    assert (llm.wake_timeout, llm.max_held, llm.activation_replicas, llm.min_awake,
            llm.group) == (300.0, 7, 1, 90.0, "pipeline")
    assert wake_settings(config.activator, llm) == WakeSettings(300.0, 7, 1, 90.0, "pipeline")


def test_absent_keys_take_the_activator_section(tmp_path: Path) -> None:
    config = load_config(config_with(tmp_path, ""))
    llm = config.services[0]
    assert (llm.wake_timeout, llm.max_held, llm.activation_replicas, llm.min_awake,
            llm.group) == (None, None, None, 0.0, None)
    assert wake_settings(config.activator, llm) == WakeSettings(10.0, 50, None, 0.0, None)
    assert wake_settings(config.activator, None) == WakeSettings(10.0, 50)


@pytest.mark.parametrize(("keys", "key", "words"), [
    ("wake_timeout: 0s", "wake_timeout", "greater than 0"),
    ("wake_timeout: ten minutes", "wake_timeout", "not a duration"),
    ("max_held: 0", "max_held", "from 1 to 1000000"),
    ("max_held: 2000000", "max_held", "from 1 to 1000000"),
    ("max_held: 1.5", "max_held", "expected an integer"),
    ("activation_replicas: 0", "activation_replicas", "from 1 to 10000"),
    ("activation_replicas: true", "activation_replicas", "expected an integer"),
    ("min_awake: -5s", "min_awake", "must not be negative"),
    ("group: Pipe Line", "group", "not a valid group name"),
    ("group: ''", "group", "non-empty string"),
    ("wake_timout: 5m", "wake_timout", "did you mean 'wake_timeout'"),
])
def test_bad_values_name_the_key(tmp_path: Path, keys: str, key: str, words: str) -> None:
    path = config_with(tmp_path, keys + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == f"services[0].{key}"
    assert words in str(info.value) and str(path) in str(info.value)


def test_first_replicas() -> None:
    assert first_replicas(3, None) == 3
    assert first_replicas(3, 1) == 1
    assert first_replicas(3, 5) == 3  # never more than recorded
    assert first_replicas(0, None) == 1  # a wake starts at least one
    assert first_replicas(0, 2) == 1


def service(name: str, group: str | None = None, **keys: object) -> ServiceConfig:
    return ServiceConfig(name=name, host=f"{name}.localhost", group=group,
                         **keys)  # type: ignore[arg-type]


def test_group_membership() -> None:
    services = [service("a", "p"), service("b", "p"), service("c"), service("d", "q"),
                service("e", "p")]
    assert group_members(services, "b") == ("a", "e")
    assert group_members(services, "c") == ()
    assert group_members(services, "d") == ()  # alone in its group
    assert group_members(services, "unknown") == ()
    assert groups(services) == {"p": ("a", "b", "e"), "q": ("d",)}


def test_envoy_is_given_the_longest_timeout_and_the_largest_queue(tmp_path: Path) -> None:
    services = [service("a", wake_timeout=600.0), service("b", max_held=5000),
                service("c", wake_timeout=30.0)]
    assert longest_wake_timeout(ACTIVATOR, services) == 600.0
    assert largest_max_held(ACTIVATOR, services) == 5000
    assert longest_wake_timeout(ACTIVATOR, []) == 120.0
    assert largest_max_held(ACTIVATOR, [service("x", max_held=3)]) == 100

    config = load_config(config_with(tmp_path, "wake_timeout: 10m\nmax_held: 2000\n"))
    settings = gateway_settings(config, (Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)))
    assert settings.route_timeout == 600.0 + 30.0
    assert settings.max_requests == 4 * 2000


# --- annotations ----------------------------------------------------------------------------


def test_the_annotations_are_read() -> None:
    llm = service_from_deployment(deployment({
        "torpor.io/wake-timeout": "5m", "torpor.io/max-held": "7",
        "torpor.io/activation-replicas": "1", "torpor.io/min-awake": "90s",
        "torpor.io/group": "pipeline"}))
    assert (llm.wake_timeout, llm.max_held, llm.activation_replicas, llm.min_awake,
            llm.group) == (300.0, 7, 1, 90.0, "pipeline")


def test_absent_annotations_leave_the_defaults() -> None:
    echo = service_from_deployment(deployment())
    assert (echo.wake_timeout, echo.max_held, echo.activation_replicas, echo.min_awake,
            echo.group) == (None, None, None, 0.0, None)


def test_bad_annotations_are_reported_together() -> None:
    found = problems(deployment({
        "torpor.io/wake-timeout": "0s", "torpor.io/max-held": "many",
        "torpor.io/activation-replicas": "0", "torpor.io/min-awake": "soon",
        "torpor.io/group": "Pipe_Line", "torpor.io/wake-timout": "5m"}))
    text = "\n".join(found)
    assert "torpor.io/wake-timeout: must be greater than 0" in text
    assert "torpor.io/max-held: expected an integer from 1 to 1000000, got the string 'many'" \
        in text
    assert "torpor.io/activation-replicas: expected an integer from 1 to 10000, got 0" in text
    assert "torpor.io/min-awake: 'soon' is not a duration" in text
    assert "torpor.io/group: 'Pipe_Line' is not a valid group name" in text
    assert "did you mean 'torpor.io/wake-timeout'?" in text
    assert len(found) == 6


# --- status and a standalone activator's mirror -----------------------------------------------


def test_status_carries_the_settings_and_a_mirror_applies_them() -> None:
    from activator.catalog_mirror import mirrored
    from tests.xds_server.test_admin_api import make_status
    from torpor import admin_client
    from xds_server.admin_api import status_to_message

    plain = admin_client.status_from_message(status_to_message(make_status("echo")))
    assert {k: plain[k] for k in ("group", "wake_timeout", "max_held", "activation_replicas",
                                  "min_awake")} == dict.fromkeys(
        ("group", "wake_timeout", "max_held", "activation_replicas", "min_awake"))
    assert plain["state"] == "ACTIVE" and plain["recorded_replicas"] == 2  # unchanged fields

    own = dataclasses.replace(make_status("llm"), group="pipeline", wake_timeout=300.0,
                              max_held=7, activation_replicas=1, min_awake=90.0)
    back = admin_client.status_from_message(status_to_message(own))
    assert (back["group"], back["wake_timeout"], back["max_held"], back["activation_replicas"],
            back["min_awake"]) == ("pipeline", 300.0, 7, 1, 90.0)
    copy = mirrored(back)
    assert wake_settings(ACTIVATOR, copy) == WakeSettings(300.0, 7, 1, 90.0, "pipeline")
    assert copy.host == "llm.localhost"
    assert wake_settings(ACTIVATOR, mirrored(plain)) == WakeSettings(120.0, 100)
