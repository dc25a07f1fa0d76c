"""The service lifecycle: one home for the state machine and the procedures that move it.

- transitions.py: the pure table, (state, event) → step; what a state means for Envoy.
- records.py: the one writer of a state change, and a service's first record.
- hibernation.py: hibernate (make-before-break), evict, repair.
- wake.py: the wake (lock, scale, wait, write), once per service however many ask.
- ports.py: the small interfaces the procedures need besides store, workloads and locks.

Depends only on torpor's core (model, store, workloads, locks); never on a component.
"""

from torpor.lifecycle.hibernation import Hibernation
from torpor.lifecycle.ports import CallTimes, RouteConfirmation, Routing, Wakes
from torpor.lifecycle.transitions import Action, Event, Route, Step, decide, route, routed
from torpor.lifecycle.wake import SingleFlight, Waker

__all__ = [
           "Action",
           "CallTimes",
           "Event",
           "Hibernation",
           "Route",
           "RouteConfirmation",
           "Routing",
           "SingleFlight",
           "Step",
           "Waker",
           "Wakes",
           "decide",
           "route",
           "routed",
]
