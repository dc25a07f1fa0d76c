"""The lifecycle table, line by line: every (state, event) pair with the step it must give.

Read it as the specification of the state machine. A row reads: state, event → the state
written ("-" none), the effects before the write, the effects after it; REFUSED rows are
errors for whoever asked.
"""

from __future__ import annotations

import pytest

from torpor.errors import InvalidTransitionError
from torpor.lifecycle.transitions import (
    Action,
    Event,
    Route,
    Step,
    decide,
    edges,
    initial_state,
    route,
    routed,
    runs_replicas,
    step,
)
from torpor.model import ALLOWED_TRANSITIONS, ServiceState

S, E, A = ServiceState, Event, Action

STAY = Step()
REFUSED = Step(refused=True)
HIBERNATE = Step(S.HIBERNATING, after=(A.AWAIT_APPLIED,))
WAKE = Step(S.WAKING, after=(A.SCALE_UP, A.WAIT_READY))
CARRY_ON = Step(after=(A.SCALE_UP, A.WAIT_READY))
GIVE_UP = Step(S.HIBERNATED, before=(A.SCALE_TO_ZERO,))

EXPECTED: dict[tuple[ServiceState, Event], Step] = {
    (S.ACTIVE, E.POLICY_ACTIVE): STAY,
    (S.ACTIVE, E.POLICY_LOW): HIBERNATE,
    (S.ACTIVE, E.POLICY_DORMANT): HIBERNATE,
    (S.ACTIVE, E.HIBERNATE): HIBERNATE,
    (S.ACTIVE, E.WAKE): Step(after=(A.WAIT_READY,)),
    (S.ACTIVE, E.PREWAKE): STAY,
    (S.ACTIVE, E.VERSION_SHIFT): STAY,
    (S.ACTIVE, E.WAKE_SUCCEEDED): STAY,
    (S.ACTIVE, E.WAKE_FAILED): STAY,
    (S.ACTIVE, E.WAKE_TIMED_OUT): STAY,
    (S.ACTIVE, E.HIBERNATION_ACKED): REFUSED,
    (S.ACTIVE, E.HIBERNATION_ABANDONED): REFUSED,
    (S.ACTIVE, E.HIBERNATION_SCALE_FAILED): REFUSED,
    (S.ACTIVE, E.REPAIR_READY): STAY,
    (S.ACTIVE, E.REPAIR_NOT_READY): STAY,

    (S.HIBERNATING, E.POLICY_ACTIVE): STAY,
    (S.HIBERNATING, E.POLICY_LOW): STAY,
    (S.HIBERNATING, E.POLICY_DORMANT): STAY,
    (S.HIBERNATING, E.HIBERNATE): REFUSED,
    (S.HIBERNATING, E.WAKE): WAKE,
    (S.HIBERNATING, E.PREWAKE): STAY,
    (S.HIBERNATING, E.VERSION_SHIFT): STAY,
    (S.HIBERNATING, E.WAKE_SUCCEEDED): REFUSED,
    (S.HIBERNATING, E.WAKE_FAILED): REFUSED,
    (S.HIBERNATING, E.WAKE_TIMED_OUT): REFUSED,
    (S.HIBERNATING, E.HIBERNATION_ACKED): GIVE_UP,
    (S.HIBERNATING, E.HIBERNATION_ABANDONED): Step(S.ACTIVE, after=(A.PUSH,)),
    (S.HIBERNATING, E.HIBERNATION_SCALE_FAILED): Step(
        S.ACTIVE, after=(A.RESTORE_REPLICAS, A.PUSH)),
    (S.HIBERNATING, E.REPAIR_READY): Step(S.ACTIVE),
    (S.HIBERNATING, E.REPAIR_NOT_READY): Step(S.ACTIVE),

    (S.HIBERNATED, E.POLICY_ACTIVE): STAY,
    (S.HIBERNATED, E.POLICY_LOW): STAY,
    (S.HIBERNATED, E.POLICY_DORMANT): Step(S.EVICTED, after=(A.PUSH,)),
    (S.HIBERNATED, E.HIBERNATE): REFUSED,
    (S.HIBERNATED, E.WAKE): WAKE,
    (S.HIBERNATED, E.PREWAKE): WAKE,
    (S.HIBERNATED, E.VERSION_SHIFT): WAKE,
    (S.HIBERNATED, E.WAKE_SUCCEEDED): REFUSED,
    (S.HIBERNATED, E.WAKE_FAILED): REFUSED,
    (S.HIBERNATED, E.WAKE_TIMED_OUT): REFUSED,
    (S.HIBERNATED, E.HIBERNATION_ACKED): REFUSED,
    (S.HIBERNATED, E.HIBERNATION_ABANDONED): REFUSED,
    (S.HIBERNATED, E.HIBERNATION_SCALE_FAILED): REFUSED,
    (S.HIBERNATED, E.REPAIR_READY): STAY,
    (S.HIBERNATED, E.REPAIR_NOT_READY): STAY,

    (S.EVICTED, E.POLICY_ACTIVE): STAY,
    (S.EVICTED, E.POLICY_LOW): STAY,
    (S.EVICTED, E.POLICY_DORMANT): STAY,
    (S.EVICTED, E.HIBERNATE): REFUSED,
    (S.EVICTED, E.WAKE): WAKE,
    (S.EVICTED, E.PREWAKE): STAY,
    (S.EVICTED, E.VERSION_SHIFT): WAKE,
    (S.EVICTED, E.WAKE_SUCCEEDED): REFUSED,
    (S.EVICTED, E.WAKE_FAILED): REFUSED,
    (S.EVICTED, E.WAKE_TIMED_OUT): REFUSED,
    (S.EVICTED, E.HIBERNATION_ACKED): REFUSED,
    (S.EVICTED, E.HIBERNATION_ABANDONED): REFUSED,
    (S.EVICTED, E.HIBERNATION_SCALE_FAILED): REFUSED,
    (S.EVICTED, E.REPAIR_READY): STAY,
    (S.EVICTED, E.REPAIR_NOT_READY): STAY,

    (S.WAKING, E.POLICY_ACTIVE): STAY,
    (S.WAKING, E.POLICY_LOW): STAY,
    (S.WAKING, E.POLICY_DORMANT): STAY,
    (S.WAKING, E.HIBERNATE): REFUSED,
    (S.WAKING, E.WAKE): CARRY_ON,
    (S.WAKING, E.PREWAKE): CARRY_ON,
    (S.WAKING, E.VERSION_SHIFT): CARRY_ON,
    (S.WAKING, E.WAKE_SUCCEEDED): Step(S.ACTIVE),
    (S.WAKING, E.WAKE_FAILED): GIVE_UP,
    (S.WAKING, E.WAKE_TIMED_OUT): GIVE_UP,
    (S.WAKING, E.HIBERNATION_ACKED): REFUSED,
    (S.WAKING, E.HIBERNATION_ABANDONED): REFUSED,
    (S.WAKING, E.HIBERNATION_SCALE_FAILED): REFUSED,
    (S.WAKING, E.REPAIR_READY): Step(S.ACTIVE),
    (S.WAKING, E.REPAIR_NOT_READY): Step(S.HIBERNATED),
}


def test_the_expected_table_lists_every_pair() -> None:
    assert set(EXPECTED) == {(s, e) for s in ServiceState for e in Event}


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED))
def test_step(state: ServiceState, event: Event) -> None:
    assert step(state, event) == EXPECTED[(state, event)]


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED))
def test_decide_refuses_exactly_the_refused_rows(state: ServiceState, event: Event) -> None:
    if EXPECTED[(state, event)].refused:
        with pytest.raises(InvalidTransitionError, match=f"'svc' is {state.value}"):
            decide("svc", state, event)
    else:
        assert decide("svc", state, event) == EXPECTED[(state, event)]


def test_a_refused_hibernation_says_what_it_needs() -> None:
    with pytest.raises(InvalidTransitionError, match="only a service that is ACTIVE can be "
                                                     "hibernated"):
        decide("svc", S.HIBERNATED, E.HIBERNATE)


def test_the_table_writes_exactly_the_model_graph() -> None:
    """The records' own guard (ServiceRecord.with_state) and the table agree: every edge a
    row writes is allowed, and no allowed edge is one no row takes."""
    allowed = {(a, b) for a, targets in ALLOWED_TRANSITIONS.items() for b in targets}
    assert edges() == allowed


@pytest.mark.parametrize(("state", "where", "keeps_route", "runs"), [
    (S.ACTIVE, Route.REPLICAS, True, True),
    (S.HIBERNATING, Route.ACTIVATOR, True, False),
    (S.HIBERNATED, Route.ACTIVATOR, True, False),
    (S.WAKING, Route.ACTIVATOR, True, True),
    (S.EVICTED, Route.NOWHERE, False, False),
])
def test_what_each_state_means(state: ServiceState, where: Route, keeps_route: bool,
                               runs: bool) -> None:
    assert route(state) is where
    assert routed(state) is keeps_route
    assert runs_replicas(state) is runs


@pytest.mark.parametrize(("running", "sleeping", "expected"), [
    (2, None, S.ACTIVE),  # running now
    (0, None, S.ACTIVE),  # new: started with its configured count
    (0, 3, S.HIBERNATED),  # torpor's recorded-replicas annotation, nothing running
    (2, 3, S.ACTIVE),  # running wins over an old annotation
])
def test_first_state(running: int, sleeping: int | None, expected: ServiceState) -> None:
    assert initial_state(running, sleeping) is expected
