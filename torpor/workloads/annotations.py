"""Kubernetes discovery: a Deployment's `torpor.io/*` annotations read into a ServiceConfig.

Owns: which labels and annotations torpor reads, their defaults and their validation, and
the fingerprint a watcher compares to tell "config changed" from "status changed". It takes
the plain dict the API returns (`ApiClient.sanitize_for_serialization` or JSON, so camelCase
keys such as `containerPort`) and does no I/O.

A bad Deployment raises one AnnotationError listing every problem at once, so the operator
fixes them in one round, and the caller leaves that Deployment out rather than serving a
half-configured service. The value rules (service name, host, Kubernetes names, durations)
are config.py's own, so a service reads the same from YAML and from annotations.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torpor.config import (
    _SERVICE_NAME_RE,
    MAX_HELD_PER_SERVICE,
    MAX_REPLICAS,
    POLICY_KINDS,
    VERSION_SEPARATOR,
    KubernetesServiceConfig,
    RateLimitConfig,
    ServiceConfig,
    ServicePolicyConfig,
    _choice,
    _duration,
    _extra_hosts,
    _group_name,
    _integer,
    _kube_name,
    _path_prefixes,
    _Reader,
    _rewrite,
    _service_host,
    _service_name,
    _version_name,
    parse_duration,
)
from torpor.errors import ConfigError, TorporError

ENABLED_LABEL = "torpor.io/enabled"
#: A Deployment that is one version of a service (`torpor.io/name` names the service; each
#: version's Deployment carries the same name and its own version label).
VERSION_LABEL = "torpor.io/version"
PREFIX = "torpor.io/"

NAME = PREFIX + "name"
HOST = PREFIX + "host"
PORT = PREFIX + "port"
SERVICE = PREFIX + "service"
PROTOCOL = PREFIX + "protocol"
NEVER_SLEEP = PREFIX + "never-sleep"
IDLE_AFTER = PREFIX + "idle-after"
EVICT_AFTER = PREFIX + "evict-after"
CREATION_GRACE = PREFIX + "creation-grace"
POLICY_KIND = PREFIX + "policy"
COLD_START_PRICE = PREFIX + "cold-start-price"
PREWAKE = PREFIX + "prewake"
RETRY_NON_IDEMPOTENT = PREFIX + "retry-non-idempotent"
WAKING_PAGE = PREFIX + "waking-page"
WAKE_TIMEOUT = PREFIX + "wake-timeout"
MAX_HELD = PREFIX + "max-held"
ACTIVATION_REPLICAS = PREFIX + "activation-replicas"
MIN_AWAKE = PREFIX + "min-awake"
GROUP = PREFIX + "group"
HOSTS = PREFIX + "hosts"
PATHS = PREFIX + "paths"
REWRITE = PREFIX + "rewrite"
RATE_LIMIT = PREFIX + "rate-limit"
RATE_LIMIT_BURST = PREFIX + "rate-limit-burst"
MAX_CONCURRENT = PREFIX + "max-concurrent"
WEIGHT = PREFIX + "weight"

#: Annotations torpor writes on a Deployment it hibernates; never read here, and left out of
#: the fingerprint so that torpor's own writes do not look like a config change.
RECORDED_REPLICAS = PREFIX + "recorded-replicas"
RECORDED_MIN_REPLICAS = PREFIX + "recorded-min-replicas"
HIBERNATED = PREFIX + "hibernated"
WRITTEN_BY_TORPOR = frozenset({RECORDED_REPLICAS, RECORDED_MIN_REPLICAS, HIBERNATED})

#: Every annotation an operator may set, in the order problems are reported.
KNOWN_ANNOTATIONS = (
    NAME,
    HOST,
    PORT,
    SERVICE,
    PROTOCOL,
    NEVER_SLEEP,
    IDLE_AFTER,
    EVICT_AFTER,
    CREATION_GRACE,
    POLICY_KIND,
    COLD_START_PRICE,
    PREWAKE,
    RETRY_NON_IDEMPOTENT,
    WAKING_PAGE,
    WAKE_TIMEOUT,
    MAX_HELD,
    ACTIVATION_REPLICAS,
    MIN_AWAKE,
    GROUP,
    HOSTS,
    PATHS,
    REWRITE,
    RATE_LIMIT,
    RATE_LIMIT_BURST,
    MAX_CONCURRENT,
    WEIGHT,
)
PROTOCOLS = ("http1", "http2")

_T = TypeVar("_T")

# Appended when a default taken from the Deployment's name fails a rule.
_DEFAULTED = " (the Deployment's name, used by default; set {key})"

# config.py's rules take a reader (for the file name in ConfigError); only `.problem` is kept.
_READER = _Reader("<annotations>", Path("."))


class AnnotationError(TorporError):
    """A Deployment labelled for torpor whose metadata cannot make a service.

    `problems` holds every problem found, each starting with the annotation (or field) it
    is about, so that one message tells the operator everything to fix.
    """

    def __init__(self, namespace: str, name: str, problems: tuple[str, ...]) -> None:
        self.namespace = namespace
        self.name = name
        self.problems = problems
        super().__init__(f"deployment {namespace}/{name}: " + "; ".join(problems))


class _Problems:
    """Collects problems instead of raising at the first, so all are reported together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, problem: str) -> None:
        self.items.append(f"{key}: {problem}")

    def check(self, key: str, rule: Callable[[_Reader, str, Any], _T], value: object) -> _T | None:
        """`rule(value)` with config.py's ConfigError turned into a problem under `key`."""
        try:
            return rule(_READER, key, value)
        except ConfigError as exc:
            self.add(key, exc.problem)
            return None


# --------------------------------------------------------------------------------------
# Reading the Deployment dict (absent and null are the same: the API omits or nulls them)
# --------------------------------------------------------------------------------------


def _dict(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, Mapping) else {}


def _list(parent: Mapping[str, Any], key: str) -> list[Any]:
    value = parent.get(key)
    return value if isinstance(value, list) else []


def _labels(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    return _dict(_dict(deployment, "metadata"), "labels")


def _annotations(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    return _dict(_dict(deployment, "metadata"), "annotations")


def _torpor_annotations(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The `torpor.io/*` annotations an operator sets (torpor's own writes left out)."""
    return {
        key: value
        for key, value in _annotations(deployment).items()
        if isinstance(key, str) and key.startswith(PREFIX) and key not in WRITTEN_BY_TORPOR
    }


def _container_ports(deployment: Mapping[str, Any]) -> Iterator[tuple[str, str | None, int]]:
    """(container, port name or None, number) for each port of the pod template.

    Entries without an integer containerPort are skipped: the API server refuses them, so
    they only occur in hand-made dicts.
    """
    pod = _dict(_dict(_dict(deployment, "spec"), "template"), "spec")
    for container in _list(pod, "containers"):
        if not isinstance(container, Mapping):
            continue
        for port in _list(container, "ports"):
            number = port.get("containerPort") if isinstance(port, Mapping) else None
            if isinstance(number, int) and not isinstance(number, bool):
                name = port.get("name") or None
                yield (
                    str(container.get("name", "")),
                    name if isinstance(name, str) else None,
                    number,
                )


def _describe_ports(ports: list[tuple[str, str | None, int]]) -> str:
    return ", ".join(f"{name}={number}" if name else str(number) for _, name, number in ports)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def is_enabled(deployment: Mapping[str, Any]) -> bool:
    """Whether the Deployment opts in: label `torpor.io/enabled` is exactly "true".

    Exact and case-sensitive, like Kubernetes' own boolean labels and annotations: "True",
    "yes" or "1" do not count, so that no spelling enables a service by accident.
    """
    return _labels(deployment).get(ENABLED_LABEL) == "true"


def fingerprint(deployment: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """Everything `service_from_deployment` reads besides the Deployment's identity, sorted.

    A watcher compares fingerprints to tell a config change (rebuild the service) from the
    status, replica and resourceVersion churn of every event (nothing to do). It holds the
    enabled label, the `torpor.io/*` annotations except those torpor writes itself, and the
    pod template's container ports (which the default and named `torpor.io/port` use).
    """
    pairs: list[tuple[str, str]] = []
    label = _labels(deployment).get(ENABLED_LABEL)
    if label is not None:
        pairs.append((f"label:{ENABLED_LABEL}", str(label)))
    pairs.extend((f"annotation:{k}", str(v)) for k, v in _torpor_annotations(deployment).items())
    pairs.extend(
        (f"port:{container}", f"{name or ''}={number}")
        for container, name, number in _container_ports(deployment)
    )
    return tuple(sorted(pairs))


def service_from_deployment(
    deployment: Mapping[str, Any], replicas_default: int = 1
) -> ServiceConfig:
    """The ServiceConfig (with a `kubernetes` block) a labelled Deployment describes.

    `replicas_default` becomes ServiceConfig.replicas: the caller knows it (the Deployment's
    spec.replicas, or the count torpor recorded when it hibernated it); annotations do not
    hold it. Raises AnnotationError listing every problem (including a missing or
    non-"true" enabled label), never a partial service.
    """
    if replicas_default < 0:
        raise ValueError(f"replicas_default must be ≥ 0, got {replicas_default}")
    problems = _Problems()
    metadata = _dict(deployment, "metadata")
    name = problems.check("metadata.name", _kube_name, metadata.get("name"))
    namespace = problems.check("metadata.namespace", _kube_name, metadata.get("namespace"))
    if not is_enabled(deployment):
        got = _labels(deployment).get(ENABLED_LABEL)
        problems.add(ENABLED_LABEL, f'expected the label "true", got {_shown(got)}')
    given = _strings(problems, _torpor_annotations(deployment))
    _check_unknown(problems, given)
    service = _build(problems, given, deployment, name, namespace, replicas_default)
    service = _as_version(problems, service, _labels(deployment).get(VERSION_LABEL), given)
    if problems.items or service is None:
        raise AnnotationError(
            _shown_name(metadata.get("namespace")),
            _shown_name(metadata.get("name")),
            tuple(problems.items),
        )
    return service


# --------------------------------------------------------------------------------------
# One function per annotation; each reports its own problems and returns None on failure
# --------------------------------------------------------------------------------------


def _shown(value: object) -> str:
    return "nothing" if value is None else repr(value)


def _shown_name(value: object) -> str:
    return value if isinstance(value, str) and value else "?"


def _strings(problems: _Problems, annotations: Mapping[str, Any]) -> dict[str, str]:
    """Annotation values are strings in Kubernetes; anything else comes from a hand-made dict."""
    strings: dict[str, str] = {}
    for key, value in annotations.items():
        if isinstance(value, str):
            strings[key] = value
        else:
            problems.add(key, f"expected a string value, got {_shown(value)}")
    return strings


def _check_unknown(problems: _Problems, given: Mapping[str, str]) -> None:
    """Unknown `torpor.io/*` annotations are typos until proven otherwise: name the closest."""
    suffixes = [key.removeprefix(PREFIX) for key in KNOWN_ANNOTATIONS]
    for key in sorted(set(given) - set(KNOWN_ANNOTATIONS)):
        if key == ENABLED_LABEL:
            problems.add(key, "is a label, not an annotation; move it to metadata.labels")
            continue
        close = difflib.get_close_matches(key.removeprefix(PREFIX), suffixes, n=1)
        guess = f" (did you mean {PREFIX + close[0]!r}?)" if close else ""
        problems.add(
            key, f"unknown annotation{guess}; known annotations: {', '.join(KNOWN_ANNOTATIONS)}"
        )


def _build(
    problems: _Problems,
    given: Mapping[str, str],
    deployment: Mapping[str, Any],
    name: str | None,
    namespace: str | None,
    replicas: int,
) -> ServiceConfig | None:
    """Every annotation parsed (so all problems are found), then the service if none failed."""
    service_name = _name(problems, given, name)
    host = _host(problems, given, name, namespace)
    port = _port(problems, given, deployment)
    kube_service = _kube_service(problems, given, name)
    protocol = problems.check(PROTOCOL, _choice(*PROTOCOLS), given.get(PROTOCOL, "http1"))
    never_sleep = _flag(problems, given, NEVER_SLEEP)
    retry_non_idempotent = _flag(problems, given, RETRY_NON_IDEMPOTENT)
    waking_page = _flag(problems, given, WAKING_PAGE, default="true")
    policy = _policy(problems, given)
    wake = _wake(problems, given)
    routing = _routing(problems, given)
    if (
        name is None
        or namespace is None
        or service_name is None
        or host is None
        or port is None
        or kube_service is None
        or protocol is None
        or never_sleep is None
        or retry_non_idempotent is None
        or waking_page is None
        or policy is None
        or wake is None
        or routing is None
    ):
        return None
    return ServiceConfig(
        name=service_name,
        host=host,
        replicas=replicas,
        local=None,
        kubernetes=KubernetesServiceConfig(
            namespace=namespace, deployment=name, port=port, service=kube_service
        ),
        protocol=protocol,
        never_sleep=never_sleep,
        policy=policy,
        retry_non_idempotent=retry_non_idempotent,
        waking_page=waking_page,
        **wake,
        **routing,
    )


def _name(problems: _Problems, given: Mapping[str, str], deployment: str | None) -> str | None:
    """The torpor service name; the Deployment's by default, which may hold dots that a
    service name (an Envoy cluster and metric label) cannot."""
    if NAME in given:
        return problems.check(NAME, _service_name, given[NAME])
    if deployment is None:
        return None
    checked = problems.check(NAME, _service_name, deployment)
    if checked is None:
        problems.items[-1] += _DEFAULTED.format(key=NAME)
    return checked


def _host(
    problems: _Problems, given: Mapping[str, str], name: str | None, namespace: str | None
) -> str | None:
    """The Host header matched; default "{deployment}.{namespace}", lowercased by the rule."""
    if HOST in given:
        return problems.check(HOST, _service_host, given[HOST])
    if name is None or namespace is None:
        return None
    return problems.check(HOST, _service_host, f"{name}.{namespace}")


def _kube_service(problems: _Problems, given: Mapping[str, str], name: str | None) -> str | None:
    """The Service whose EndpointSlices list the replicas: a DNS-1123 label."""
    text = given.get(SERVICE, name)
    if text is None:
        return None
    if len(text) > 63 or not _SERVICE_NAME_RE.fullmatch(text):
        problems.add(
            SERVICE,
            f"{text!r} is not a Kubernetes Service name; expected a DNS-1123 label "
            "(lowercase letters, digits and '-', starting and ending with a letter or digit, "
            "at most 63 characters)" + ("" if SERVICE in given else _DEFAULTED.format(key=SERVICE)),
        )
        return None
    return text


def _flag(problems: _Problems, given: Mapping[str, str], key: str,
          default: str = "false") -> bool | None:
    """A "true"/"false" annotation; absent is `default`."""
    text = given.get(key, default)
    if text not in ("true", "false"):
        problems.add(key, f'expected "true" or "false", got {text!r}')
        return None
    return text == "true"


def _policy(problems: _Problems, given: Mapping[str, str]) -> ServicePolicyConfig | None:
    """Per-service policy overrides; an absent annotation leaves the policy section's value."""
    values: dict[str, float | None] = {}
    failed = False
    for key in (IDLE_AFTER, EVICT_AFTER, CREATION_GRACE, COLD_START_PRICE):
        field = key.removeprefix(PREFIX).replace("-", "_")
        values[field] = None
        if key in given:
            try:
                values[field] = parse_duration(given[key])
            except ValueError as exc:
                problems.add(key, str(exc))
                failed = True
    kind = given.get(POLICY_KIND)
    if kind is not None and kind not in POLICY_KINDS:
        problems.add(POLICY_KIND, f"expected one of {', '.join(POLICY_KINDS)}, got {kind!r}")
        failed = True
    prewake = given.get(PREWAKE)
    if prewake is not None and prewake not in ("true", "false"):
        problems.add(PREWAKE, f'expected "true" or "false", got {prewake!r}')
        failed = True
    if failed:
        return None
    return ServicePolicyConfig(idle_after=values["idle_after"], evict_after=values["evict_after"],
                               creation_grace=values["creation_grace"], kind=kind,
                               cold_start_price=values["cold_start_price"],
                               prewake=None if prewake is None else prewake == "true")


def _wake(problems: _Problems, given: Mapping[str, str]) -> dict[str, Any] | None:
    """The wake settings (`ServiceConfig` keyword arguments of those given), by config.py's
    rules: durations, integers in the same bounds (written as decimal strings), a group
    name like a service name."""
    rules: dict[str, Callable[[_Reader, str, Any], Any]] = {
        WAKE_TIMEOUT: _duration(positive=True),
        MAX_HELD: _integer(1, MAX_HELD_PER_SERVICE),
        ACTIVATION_REPLICAS: _integer(1, MAX_REPLICAS),
        MIN_AWAKE: _duration(),
        GROUP: _group_name,
    }
    values: dict[str, Any] = {}
    failed = False
    for key, rule in rules.items():
        if key not in given:
            continue
        text: object = given[key]
        if key in (MAX_HELD, ACTIVATION_REPLICAS):
            stripped = given[key].strip()
            text = int(stripped) if stripped.isascii() and stripped.isdigit() else given[key]
        value = problems.check(key, rule, text)
        if value is None:
            failed = True
        values[key.removeprefix(PREFIX).replace("-", "_")] = value
    return None if failed else values


def _as_version(problems: _Problems, service: ServiceConfig | None, version: object,
                given: Mapping[str, str]) -> ServiceConfig | None:
    """A Deployment labelled torpor.io/version is that version of the service it names:
    the service `NAME--VERSION`, reached where the service is, with the weight of
    torpor.io/weight (default 0: no traffic until `torpor traffic` gives it some)."""
    if version is None:
        if WEIGHT in given:
            problems.add(WEIGHT, f"is a version's weight; label the Deployment "
                         f"{VERSION_LABEL} too")
        return service
    checked = problems.check(VERSION_LABEL, _version_name, version)
    weight = problems.check(WEIGHT, _integer(0, 1_000_000), _number(given.get(WEIGHT, "0")))
    if service is None or checked is None or weight is None:
        return None
    return dataclasses.replace(service, name=f"{service.name}{VERSION_SEPARATOR}{checked}",
                               version_of=service.name, version=checked, weight=weight)


def _routing(problems: _Problems, given: Mapping[str, str]) -> dict[str, Any] | None:
    """Hosts and paths (comma-separated lists), the rewrite, and the limits, by config.py's
    rules (`ServiceConfig` keyword arguments of those given)."""
    values: dict[str, Any] = {}
    failed = False

    def check(key: str, rule: Callable[[_Reader, str, Any], Any], text: object) -> Any:
        nonlocal failed
        value = problems.check(key, rule, text)
        failed = failed or value is None
        return value

    if HOSTS in given:
        values["hosts"] = check(HOSTS, _extra_hosts, _listed(given[HOSTS]))
    if PATHS in given:
        values["paths"] = check(PATHS, _path_prefixes, _listed(given[PATHS]))
    if REWRITE in given:
        values["rewrite"] = check(REWRITE, _rewrite, given[REWRITE])
        if PATHS not in given:
            problems.add(REWRITE, f"rewrites the path prefix given in {PATHS}; set it too")
            failed = True
    limits = {key: check(key, _integer(1, bound), _number(given[key]))
              for key, bound in ((RATE_LIMIT, 1_000_000), (RATE_LIMIT_BURST, 10_000_000),
                                 (MAX_CONCURRENT, MAX_HELD_PER_SERVICE)) if key in given}
    if limits.get(RATE_LIMIT_BURST) is not None and RATE_LIMIT not in limits:
        problems.add(RATE_LIMIT_BURST, f"is the burst of {RATE_LIMIT}; set it too")
        failed = True
    if limits.get(RATE_LIMIT) is not None:
        values["rate_limit"] = RateLimitConfig(limits[RATE_LIMIT], limits.get(RATE_LIMIT_BURST))
    if MAX_CONCURRENT in limits:
        values["max_concurrent"] = limits[MAX_CONCURRENT]
    return None if failed else values


def _listed(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _number(text: str) -> object:
    stripped = text.strip()
    return int(stripped) if stripped.isascii() and stripped.isdigit() else text


def _port(
    problems: _Problems, given: Mapping[str, str], deployment: Mapping[str, Any]
) -> int | None:
    """A number, the name of a container port, or by default the template's only port."""
    ports = list(_container_ports(deployment))
    if PORT not in given:
        return _default_port(problems, ports)
    text = given[PORT].strip()
    if text.isascii() and text.isdigit():
        number = int(text)
        if 1 <= number <= 65535:
            return number
        problems.add(PORT, f"expected a port number from 1 to 65535, got {given[PORT]!r}")
        return None
    return _named_port(problems, text, ports)


def _default_port(problems: _Problems, ports: list[tuple[str, str | None, int]]) -> int | None:
    numbers = {number for _, _, number in ports}
    if len(numbers) == 1:
        return numbers.pop()
    declared = f" ({_describe_ports(ports)})" if ports else ""
    problems.add(
        PORT,
        f"not set, and the pod template declares {len(ports)} container ports{declared}; "
        "set torpor.io/port to the number or name of the port that serves traffic",
    )
    return None


def _named_port(
    problems: _Problems, text: str, ports: list[tuple[str, str | None, int]]
) -> int | None:
    numbers = {number for _, name, number in ports if name == text}
    if len(numbers) == 1:
        return numbers.pop()
    names = sorted({name for _, name, _ in ports if name})
    if numbers:
        problems.add(PORT, f"container port name {text!r} is ambiguous: {sorted(numbers)}")
        return None
    close = difflib.get_close_matches(text, names, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    known = f"the pod template names: {', '.join(names)}" if names else "it names no ports"
    problems.add(
        PORT,
        f"{text!r} is neither a port number (1..65535) nor the name of a container port"
        f"{guess}; {known}",
    )
    return None


__all__ = [
    "ENABLED_LABEL",
    "KNOWN_ANNOTATIONS",
    "PREFIX",
    "RECORDED_REPLICAS",
    "WRITTEN_BY_TORPOR",
    "AnnotationError",
    "fingerprint",
    "is_enabled",
    "service_from_deployment",
]
