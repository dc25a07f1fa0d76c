"""Writing a state change: the one path by which a service changes state.

Owns what every transition produces, whoever makes it (reconciler, waker, start-up repair):
an entry in the record's history written to the store with compare-and-set, one structured
log line with the service name, and the state metrics. Must not decide *whether* to change
state; callers hold the service's lock and decide.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torpor import metrics
from torpor.logs import event
from torpor.model import ServiceRecord, ServiceState
from torpor.store.base import Store

log = logging.getLogger("torpor.transitions")


async def change_state(store: Store, record: ServiceRecord, to: ServiceState, reason: str,
                       now: float, **changes: Any) -> ServiceRecord:
    """Store `record` moved to `to` (plus field `changes`, e.g. recorded_replicas); returns
    the stored record. Raises InvalidTransitionError, ConflictError or StoreError, in which
    case nothing was logged or counted: the change did not happen."""
    moved = dataclasses.replace(record.with_state(to, now, reason), **changes)
    stored = await store.put(moved)
    fields: dict[str, Any] = {k: v for k, v in changes.items()
                              if isinstance(v, int | float | str)}
    event(log, "service.state_changed", service=record.name, from_state=record.state.value,
          to_state=to.value, reason=reason, **fields)
    metrics.set_service_state(record.name, to, stored.recorded_replicas)
    metrics.SERVICE_TRANSITIONS.labels(service=record.name, to_state=to.value).inc()
    return stored


def last_woken(record: ServiceRecord) -> float | None:
    """When the service last became ACTIVE after sleeping (a wake counts as activity)."""
    for entry in reversed(record.history):
        if entry.to_state is ServiceState.ACTIVE and entry.from_state is not None:
            return entry.at
    return None
