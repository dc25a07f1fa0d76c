"""Plain data of the service model and its state machine.

Owns: what a service record holds, which state changes are allowed at all (the graph), and
how a change is written into a record's history. Must not do I/O nor choose a next state:
the store persists records, torpor.lifecycle decides and carries out every change.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Mapping
from typing import Any


class ServiceState(enum.StrEnum):
    """The service states (docs/architecture.md). The string values are part of the contract
    (status --json)."""

    ACTIVE = "ACTIVE"
    HIBERNATING = "HIBERNATING"
    HIBERNATED = "HIBERNATED"
    EVICTED = "EVICTED"
    WAKING = "WAKING"


S = ServiceState

#: The edges of the state graph: a record refuses any other change. Which edge is taken on
#: which event is torpor.lifecycle.transitions' table, whose edges are exactly these (a
#: test checks). WAKING falls back to HIBERNATED when a wake fails; a hibernation that could
#: not complete returns to ACTIVE; a wake may take over a hibernation a crash left half-done.
ALLOWED_TRANSITIONS: Mapping[ServiceState, frozenset[ServiceState]] = {
    S.ACTIVE: frozenset({S.HIBERNATING}),
    S.HIBERNATING: frozenset({S.HIBERNATED, S.ACTIVE, S.WAKING}),
    S.HIBERNATED: frozenset({S.EVICTED, S.WAKING}),
    S.EVICTED: frozenset({S.WAKING}),
    S.WAKING: frozenset({S.ACTIVE, S.HIBERNATED}),
}

#: How many transitions a record keeps; older ones are dropped (status shows the recent ones).
HISTORY_LIMIT = 50



def is_ip_literal(host: str) -> bool:
    """True for an IPv4 or IPv6 address, False for a name: Envoy takes a literal as a
    STATIC endpoint and needs STRICT_DNS for a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

@dataclasses.dataclass(frozen=True, order=True)
class Endpoint:
    """One ready address of a service replica."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Transition:
    """One entry of a service's history."""

    at: float
    from_state: ServiceState | None
    to_state: ServiceState
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "from": self.from_state.value if self.from_state else None,
            "to": self.to_state.value,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transition:
        return cls(
            at=float(data["at"]),
            from_state=ServiceState(data["from"]) if data.get("from") else None,
            to_state=ServiceState(data["to"]),
            reason=str(data.get("reason", "")),
        )


@dataclasses.dataclass(frozen=True)
class ServiceRecord:
    """What the store keeps about one service.

    `desired_replicas` is how many replicas should run while ACTIVE; `recorded_replicas` is
    the count saved at hibernation, which a wake restores. `revision` is the store's
    version of this record, used for compare-and-set writes (0 = not stored yet).
    """

    name: str
    state: ServiceState
    desired_replicas: int
    recorded_replicas: int
    created_at: float
    updated_at: float
    last_call: float | None = None
    history: tuple[Transition, ...] = ()
    revision: int = 0

    @classmethod
    def new(cls, name: str, replicas: int, now: float, reason: str = "registered") -> ServiceRecord:
        """A service seen for the first time: ACTIVE, with its first history entry."""
        first = Transition(at=now, from_state=None, to_state=ServiceState.ACTIVE, reason=reason)
        return cls(
            name=name,
            state=ServiceState.ACTIVE,
            desired_replicas=replicas,
            recorded_replicas=replicas,
            created_at=now,
            updated_at=now,
            history=(first,),
        )

    def with_state(self, to: ServiceState, now: float, reason: str) -> ServiceRecord:
        """This record moved to state `to`; raises InvalidTransitionError if not allowed."""
        from torpor.errors import InvalidTransitionError

        if to not in ALLOWED_TRANSITIONS[self.state]:
            raise InvalidTransitionError(f"{self.name}: {self.state} -> {to} is not allowed")
        entry = Transition(at=now, from_state=self.state, to_state=to, reason=reason)
        history = (*self.history, entry)[-HISTORY_LIMIT:]
        return dataclasses.replace(self, state=to, updated_at=now, history=history)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "desired_replicas": self.desired_replicas,
            "recorded_replicas": self.recorded_replicas,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_call": self.last_call,
            "history": [t.to_dict() for t in self.history],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], revision: int = 0) -> ServiceRecord:
        return cls(
            name=str(data["name"]),
            state=ServiceState(data["state"]),
            desired_replicas=int(data["desired_replicas"]),
            recorded_replicas=int(data["recorded_replicas"]),
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]),
            last_call=None if data.get("last_call") is None else float(data["last_call"]),
            history=tuple(Transition.from_dict(t) for t in data.get("history", [])),
            revision=revision,
        )


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    """What `torpor status` shows of one service: its record joined with live workload facts.

    `replicas` is how many run now; `recorded_replicas` is what a wake restores.
    `keep_alive`: seconds idle before the policy hibernates it (None: unknown, or never);
    `next_call`: when the policy predicts its next call (unix seconds; None: no prediction).
    """

    name: str
    host: str
    state: ServiceState
    replicas: int
    desired_replicas: int
    recorded_replicas: int
    ready_endpoints: tuple[Endpoint, ...]
    last_call: float | None
    created_at: float
    updated_at: float
    history: tuple[Transition, ...]
    keep_alive: float | None = None
    next_call: float | None = None
    # Why Envoy's config leaves the service out (or at its last good config): the
    # validator's or Envoy's words. None when it is routed as configured.
    problem: str | None = None
    # Why its replicas do not run as they should (Workloads.problem), None while they do.
    replica_problem: str | None = None
    # Where the service comes from: "config", "registered" (torpor register) or the
    # discovery source (e.g. "deployment/models/echo"); None when unknown.
    source: str | None = None
    # Its wake settings as they apply (its own, else the activator section's; None:
    # unknown) and its group (None: none): torpor/wake_settings.py.
    group: str | None = None
    wake_timeout: float | None = None
    max_held: int | None = None
    activation_replicas: int | None = None
    min_awake: float | None = None
    # Where it is reached (torpor/routes.py): every host (the first is `host`), its path
    # prefixes ("/": every path) and what Envoy rewrites the matched prefix to (None: not).
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    rewrite: str | None = None
    # A service with versions (torpor/traffic.py): each version's weight now, state and
    # replicas; empty for a plain service.
    versions: tuple[VersionStatus, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The `status --json` object: contract fields first, then extras."""
        return {
            "name": self.name,
            "state": self.state.value,
            "replicas": self.replicas,
            "recorded_replicas": self.recorded_replicas,
            "last_call": self.last_call,
            "host": self.host,
            "desired_replicas": self.desired_replicas,
            "ready_endpoints": [str(e) for e in self.ready_endpoints],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "history": [t.to_dict() for t in self.history],
            "keep_alive": self.keep_alive,
            "next_call": self.next_call,
            "problem": self.problem,
            "replica_problem": self.replica_problem,
            "source": self.source,
            "group": self.group,
            "wake_timeout": self.wake_timeout,
            "max_held": self.max_held,
            "activation_replicas": self.activation_replicas,
            "min_awake": self.min_awake,
            "hosts": list(self.hosts or ((self.host,) if self.host else ())),
            "paths": list(self.paths or ("/",)),
            "rewrite": self.rewrite,
            "versions": [v.to_json() for v in self.versions],
        }


@dataclasses.dataclass(frozen=True)
class TrafficChange:
    """A split as applied: the weights now and before, how long the push took until
    every Envoy applied it, and whether every Envoy did in time."""

    name: str
    weights: dict[str, int]
    previous: dict[str, int] | None
    push_seconds: float
    applied: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    """One version of a service, as `status` shows it under the service."""

    name: str
    weight: int
    state: ServiceState
    replicas: int
    recorded_replicas: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "state": self.state.value,
                "replicas": self.replicas, "recorded_replicas": self.recorded_replicas}


def host_of(authority: str) -> str:
    """A Host header (or :authority) as the service table keys it: lowercase, without port or
    trailing dot. One rule for the access-log collector and the activator alike."""
    host = authority.lower()
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        return host if end == -1 else host[: end + 1]
    head, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        host = head
    return host.rstrip(".")
