"""Per-service wake settings: a service's own `wake_timeout`, `max_held`,
`activation_replicas`, `min_awake` and `group`, resolved against the activator section.

Owns the one rule "the service's own value, else the gateway's", so that the activator's
holding, the lifecycle's wake, the policy loop, Envoy's timeouts and `torpor status` agree
on a service's settings, and the group membership rule (which services wake and sleep
together). Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from torpor.config import ActivatorConfig, ServiceConfig


@dataclasses.dataclass(frozen=True)
class WakeSettings:
    """What a wake of one service may take and start."""

    #: Seconds a wake of it (and each of its held requests) may take.
    wake_timeout: float
    #: Requests held at once for it in one activator.
    max_held: int
    #: Replicas a wake starts first; None: the recorded count at once.
    activation_replicas: int | None = None
    #: Seconds after a wake during which the policy does not hibernate it.
    min_awake: float = 0.0
    #: The group it wakes and sleeps with; None: on its own.
    group: str | None = None


#: name → the service's wake settings (the gateway's for a service not known).
SettingsOf = Callable[[str], WakeSettings]


def wake_settings(activator: ActivatorConfig, service: ServiceConfig | None) -> WakeSettings:
    """`service`'s own settings, the activator section's where it has none (or no service)."""
    if service is None:
        return WakeSettings(activator.wake_timeout, activator.max_held_per_service)
    return WakeSettings(
        wake_timeout=(activator.wake_timeout if service.wake_timeout is None
                      else service.wake_timeout),
        max_held=activator.max_held_per_service if service.max_held is None else service.max_held,
        activation_replicas=service.activation_replicas,
        min_awake=service.min_awake,
        group=service.group,
    )


def settings_lookup(activator: ActivatorConfig,
                    service: Callable[[str], ServiceConfig | None]) -> SettingsOf:
    """A SettingsOf over a catalog's `get` (read per call: discovered services change)."""
    return lambda name: wake_settings(activator, service(name))


def first_replicas(recorded: int, activation: int | None) -> int:
    """How many replicas a wake starts first: the recorded count (at least 1), or
    `activation_replicas` when that is fewer."""
    full = max(1, recorded)
    return full if activation is None else max(1, min(activation, full))


def group_members(services: Iterable[ServiceConfig], name: str) -> tuple[str, ...]:
    """The other services of `name`'s group, sorted (empty: no group, or alone in it)."""
    listed = list(services)
    group = next((s.group for s in listed if s.name == name), None)
    if group is None:
        return ()
    return tuple(sorted(s.name for s in listed if s.group == group and s.name != name))


def groups(services: Iterable[ServiceConfig]) -> dict[str, tuple[str, ...]]:
    """Group name → its members, sorted (services without a group left out)."""
    found: dict[str, list[str]] = {}
    for service in services:
        if service.group is not None:
            found.setdefault(service.group, []).append(service.name)
    return {group: tuple(sorted(names)) for group, names in sorted(found.items())}


def longest_wake_timeout(activator: ActivatorConfig, services: Iterable[ServiceConfig]) -> float:
    """The longest wake_timeout of the gateway and its services (Envoy's route timeout must
    outlast it)."""
    return max([activator.wake_timeout]
               + [s.wake_timeout for s in services if s.wake_timeout is not None])


def largest_max_held(activator: ActivatorConfig, services: Iterable[ServiceConfig]) -> int:
    """The largest max_held of the gateway and its services (Envoy's circuit breakers must
    let that many requests through to the activator)."""
    return max([activator.max_held_per_service]
               + [s.max_held for s in services if s.max_held is not None])
