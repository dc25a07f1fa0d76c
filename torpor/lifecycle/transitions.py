"""The service state machine as one pure table: (state, event) → step.

Owns every choice of a service's next state, whoever observes the event (the policy loop,
`torpor hibernate`/`wake`, a held request, the end of a wake or of a hibernation, start-up
repair) and whichever backends run it (sqlite or etcd, `torpor up` or a fleet). A step says
what to do before the state is written, which state to write, and what to do after;
hibernation.py and wake.py carry the steps out. Also owns what each state means for Envoy
(replicas, activator, nowhere) and whether its replicas run.

Must not do I/O or know who carries a step out: like xds_server/protocol.py, it is a table
that tests read line by line. To add a transition: add the event (if new), add its row for
every state in `_TABLE`, add the edge to torpor.model.ALLOWED_TRANSITIONS if the step writes
a new edge, add the row to tests/torpor/lifecycle/test_transitions.py, and make the
procedure that observes the event call `decide`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from torpor.errors import InvalidTransitionError
from torpor.model import ServiceState

S = ServiceState


class Event(enum.StrEnum):
    """Everything that can happen to a service."""

    # Verdicts of the idle policy, once per policy pass.
    POLICY_ACTIVE = "policy_active"
    POLICY_LOW = "policy_low"
    POLICY_DORMANT = "policy_dormant"
    # Asked for: `torpor hibernate`, a held request or `torpor wake`.
    HIBERNATE = "hibernate"
    WAKE = "wake"
    # Wakes nobody waits on: a predicted call (pre-wake) or a traffic shift that gives a
    # sleeping version a share of the traffic.
    PREWAKE = "prewake"
    VERSION_SHIFT = "version_shift"
    # How a wake ended.
    WAKE_SUCCEEDED = "wake_succeeded"
    WAKE_FAILED = "wake_failed"
    WAKE_TIMED_OUT = "wake_timed_out"
    # How a hibernation went on after the switch to the activator was pushed.
    HIBERNATION_ACKED = "hibernation_acked"
    HIBERNATION_ABANDONED = "hibernation_abandoned"  # an Envoy did not apply the switch
    HIBERNATION_SCALE_FAILED = "hibernation_scale_failed"
    # Start-up (and every policy pass): a half-done state nobody holds the lock of.
    REPAIR_READY = "repair_ready"  # the service has ready replicas
    REPAIR_NOT_READY = "repair_not_ready"


class Action(enum.StrEnum):
    """One effect of a step, carried out by the procedure that observed the event."""

    PUSH = "push"  # send the table to every Envoy; the outcome does not matter
    AWAIT_APPLIED = "await_applied"  # push, and fail unless every Envoy applied it
    SCALE_TO_ZERO = "scale_to_zero"
    SCALE_UP = "scale_up"  # to the recorded count (at least one)
    RESTORE_REPLICAS = "restore_replicas"  # back to the count before a failed scale to 0
    WAIT_READY = "wait_ready"  # until enough replicas are ready (flip_when), or time out


class Route(enum.StrEnum):
    """Where Envoy sends a service's traffic in a state."""

    REPLICAS = "replicas"  # its ready endpoints (the activator while none is ready)
    ACTIVATOR = "activator"  # held, and the service woken
    NOWHERE = "nowhere"  # no virtual host: the catch-all sends the host to the activator


@dataclasses.dataclass(frozen=True)
class Step:
    """What an event does: `before` the write, the state written (`to`; None: no write),
    then `after`. `refused`: the event is not allowed in this state (an error for whoever
    asked, e.g. `torpor hibernate` of a sleeping service)."""

    to: ServiceState | None = None
    before: tuple[Action, ...] = ()
    after: tuple[Action, ...] = ()
    refused: bool = False


STAY = Step()
REFUSED = Step(refused=True)

_HIBERNATE = Step(S.HIBERNATING, after=(Action.AWAIT_APPLIED,))
_WAKE = Step(S.WAKING, after=(Action.SCALE_UP, Action.WAIT_READY))
_GIVE_UP = Step(S.HIBERNATED, before=(Action.SCALE_TO_ZERO,))

E = Event

#: The whole state machine. Every (state, event) pair is listed: nothing is implied.
_TABLE: Mapping[tuple[ServiceState, Event], Step] = {
    # ACTIVE: serving from its replicas.
    (S.ACTIVE, E.POLICY_ACTIVE): STAY,
    (S.ACTIVE, E.POLICY_LOW): _HIBERNATE,
    (S.ACTIVE, E.POLICY_DORMANT): _HIBERNATE,  # through HIBERNATED first, never straight out
    (S.ACTIVE, E.HIBERNATE): _HIBERNATE,
    (S.ACTIVE, E.WAKE): Step(after=(Action.WAIT_READY,)),  # awake: its ready endpoints
    (S.ACTIVE, E.PREWAKE): STAY,
    (S.ACTIVE, E.VERSION_SHIFT): STAY,
    (S.ACTIVE, E.WAKE_SUCCEEDED): STAY,  # another waker finished first
    (S.ACTIVE, E.WAKE_FAILED): STAY,  # it was awake: its replicas are not this wake's
    (S.ACTIVE, E.WAKE_TIMED_OUT): STAY,
    (S.ACTIVE, E.HIBERNATION_ACKED): REFUSED,
    (S.ACTIVE, E.HIBERNATION_ABANDONED): REFUSED,
    (S.ACTIVE, E.HIBERNATION_SCALE_FAILED): REFUSED,
    (S.ACTIVE, E.REPAIR_READY): STAY,
    (S.ACTIVE, E.REPAIR_NOT_READY): STAY,
    # HIBERNATING: traffic switched to the activator, waiting for every Envoy, then scale 0.
    (S.HIBERNATING, E.POLICY_ACTIVE): STAY,  # under way, or left to repair
    (S.HIBERNATING, E.POLICY_LOW): STAY,
    (S.HIBERNATING, E.POLICY_DORMANT): STAY,
    (S.HIBERNATING, E.HIBERNATE): REFUSED,
    (S.HIBERNATING, E.WAKE): _WAKE,  # seen only under the lock: a crash left it half-done
    (S.HIBERNATING, E.PREWAKE): STAY,
    (S.HIBERNATING, E.VERSION_SHIFT): STAY,
    (S.HIBERNATING, E.WAKE_SUCCEEDED): REFUSED,
    (S.HIBERNATING, E.WAKE_FAILED): REFUSED,
    (S.HIBERNATING, E.WAKE_TIMED_OUT): REFUSED,
    (S.HIBERNATING, E.HIBERNATION_ACKED): _GIVE_UP,  # scale to 0, then HIBERNATED
    (S.HIBERNATING, E.HIBERNATION_ABANDONED): Step(S.ACTIVE, after=(Action.PUSH,)),
    (S.HIBERNATING, E.HIBERNATION_SCALE_FAILED): Step(
        S.ACTIVE, after=(Action.RESTORE_REPLICAS, Action.PUSH)),
    (S.HIBERNATING, E.REPAIR_READY): Step(S.ACTIVE),  # the policy decides again
    (S.HIBERNATING, E.REPAIR_NOT_READY): Step(S.ACTIVE),
    # HIBERNATED: no replicas, traffic to the activator.
    (S.HIBERNATED, E.POLICY_ACTIVE): STAY,
    (S.HIBERNATED, E.POLICY_LOW): STAY,
    # Evicted: the publisher removes the routes first, then the cluster.
    (S.HIBERNATED, E.POLICY_DORMANT): Step(S.EVICTED, after=(Action.PUSH,)),
    (S.HIBERNATED, E.HIBERNATE): REFUSED,
    (S.HIBERNATED, E.WAKE): _WAKE,
    (S.HIBERNATED, E.PREWAKE): _WAKE,
    (S.HIBERNATED, E.VERSION_SHIFT): _WAKE,
    (S.HIBERNATED, E.WAKE_SUCCEEDED): REFUSED,
    (S.HIBERNATED, E.WAKE_FAILED): REFUSED,
    (S.HIBERNATED, E.WAKE_TIMED_OUT): REFUSED,
    (S.HIBERNATED, E.HIBERNATION_ACKED): REFUSED,
    (S.HIBERNATED, E.HIBERNATION_ABANDONED): REFUSED,
    (S.HIBERNATED, E.HIBERNATION_SCALE_FAILED): REFUSED,
    (S.HIBERNATED, E.REPAIR_READY): STAY,
    (S.HIBERNATED, E.REPAIR_NOT_READY): STAY,
    # EVICTED: no route at all; the catch-all virtual host still reaches the activator.
    (S.EVICTED, E.POLICY_ACTIVE): STAY,
    (S.EVICTED, E.POLICY_LOW): STAY,
    (S.EVICTED, E.POLICY_DORMANT): STAY,
    (S.EVICTED, E.HIBERNATE): REFUSED,
    (S.EVICTED, E.WAKE): _WAKE,  # WAKING re-adds the route
    (S.EVICTED, E.PREWAKE): STAY,  # a prediction never brings back an evicted service
    (S.EVICTED, E.VERSION_SHIFT): _WAKE,
    (S.EVICTED, E.WAKE_SUCCEEDED): REFUSED,
    (S.EVICTED, E.WAKE_FAILED): REFUSED,
    (S.EVICTED, E.WAKE_TIMED_OUT): REFUSED,
    (S.EVICTED, E.HIBERNATION_ACKED): REFUSED,
    (S.EVICTED, E.HIBERNATION_ABANDONED): REFUSED,
    (S.EVICTED, E.HIBERNATION_SCALE_FAILED): REFUSED,
    (S.EVICTED, E.REPAIR_READY): STAY,
    (S.EVICTED, E.REPAIR_NOT_READY): STAY,
    # WAKING: replicas starting, traffic held by the activator.
    (S.WAKING, E.POLICY_ACTIVE): STAY,
    (S.WAKING, E.POLICY_LOW): STAY,
    (S.WAKING, E.POLICY_DORMANT): STAY,
    (S.WAKING, E.HIBERNATE): REFUSED,
    # Seen only under the lock: a waker that stopped half-way; this one carries on.
    (S.WAKING, E.WAKE): Step(after=(Action.SCALE_UP, Action.WAIT_READY)),
    (S.WAKING, E.PREWAKE): Step(after=(Action.SCALE_UP, Action.WAIT_READY)),
    (S.WAKING, E.VERSION_SHIFT): Step(after=(Action.SCALE_UP, Action.WAIT_READY)),
    (S.WAKING, E.WAKE_SUCCEEDED): Step(S.ACTIVE),  # ACTIVE flips the endpoints back
    (S.WAKING, E.WAKE_FAILED): _GIVE_UP,  # a later request wakes it from a known state
    (S.WAKING, E.WAKE_TIMED_OUT): _GIVE_UP,
    (S.WAKING, E.HIBERNATION_ACKED): REFUSED,
    (S.WAKING, E.HIBERNATION_ABANDONED): REFUSED,
    (S.WAKING, E.HIBERNATION_SCALE_FAILED): REFUSED,
    (S.WAKING, E.REPAIR_READY): Step(S.ACTIVE),
    (S.WAKING, E.REPAIR_NOT_READY): Step(S.HIBERNATED),
}

_ROUTES: Mapping[ServiceState, Route] = {
    S.ACTIVE: Route.REPLICAS,
    S.HIBERNATING: Route.ACTIVATOR,
    S.HIBERNATED: Route.ACTIVATOR,
    S.WAKING: Route.ACTIVATOR,
    S.EVICTED: Route.NOWHERE,
}

#: States whose replicas run (or are being started).
RUNNING_STATES = frozenset({S.ACTIVE, S.WAKING})

#: What a refused request is told, by event: the state it needs.
_NEEDS: Mapping[Event, tuple[str, str]] = {
    E.HIBERNATE: ("ACTIVE", "hibernated"),
}


def step(state: ServiceState, event: Event) -> Step:
    """The table's row: what `event` does to a service in `state`."""
    return _TABLE[(state, event)]


def decide(name: str, state: ServiceState, event: Event) -> Step:
    """`step`, raising InvalidTransitionError (naming the service) when it is refused."""
    found = _TABLE[(state, event)]
    if found.refused:
        need, verb = _NEEDS.get(event, ("", event.value))
        detail = f"; only a service that is {need} can be {verb}" if need else ""
        raise InvalidTransitionError(
            f"service {name!r} is {state.value}: {event.value} is not allowed{detail}")
    return found


def route(state: ServiceState) -> Route:
    """Where Envoy sends the traffic of a service in `state`."""
    return _ROUTES[state]


def routed(state: ServiceState) -> bool:
    """Whether the service keeps its virtual host and cluster in Envoy."""
    return _ROUTES[state] is not Route.NOWHERE


def runs_replicas(state: ServiceState) -> bool:
    """Whether the service's replicas should run (a restarted control plane starts them)."""
    return state in RUNNING_STATES


def initial_state(running: int, sleeping: int | None) -> ServiceState:
    """The state of a service seen for the first time: HIBERNATED when nothing runs and the
    workload carries torpor's record of an earlier hibernation (a lost store), else ACTIVE."""
    return S.HIBERNATED if not running and sleeping is not None else S.ACTIVE


def edges() -> frozenset[tuple[ServiceState, ServiceState]]:
    """Every state change some row of the table writes."""
    return frozenset((state, s.to) for (state, _), s in _TABLE.items()
                     if s.to is not None and s.to is not state)
