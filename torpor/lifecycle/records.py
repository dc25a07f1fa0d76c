"""Writing a state change: the one path by which a service record changes state.

Owns what every transition produces, whoever makes it (hibernation, wake, repair): an entry
in the record's history written to the store with compare-and-set, one structured log line
with the service name, and the state metrics; and the record of a service seen for the first
time. Must not decide *whether* or *where* to change state: transitions.py does, and the
procedures that call `change_state` hold the service's lock.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torpor import metrics
from torpor.lifecycle.transitions import initial_state
from torpor.logs import event
from torpor.model import ServiceRecord, ServiceState, Transition
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


def first_record(name: str, configured: int, running: int, sleeping: int | None,
                 now: float) -> ServiceRecord:
    """The record of a service seen for the first time: ACTIVE with the replicas running
    now (a Deployment) or configured; HIBERNATED with the count the workload recorded at an
    earlier hibernation (a Deployment's annotation outlives a lost store)."""
    record = ServiceRecord.new(name, running or configured, now)
    if initial_state(running, sleeping) is ServiceState.ACTIVE or sleeping is None:
        return record
    found = Transition(at=now, from_state=None, to_state=ServiceState.HIBERNATED,
                       reason="found scaled to 0 by torpor (recorded-replicas annotation)")
    return dataclasses.replace(record, state=ServiceState.HIBERNATED, desired_replicas=0,
                               recorded_replicas=sleeping, history=(found,))


def last_woken(record: ServiceRecord) -> float | None:
    """When the service last became ACTIVE after sleeping (a wake counts as activity)."""
    for entry in reversed(record.history):
        if entry.to_state is ServiceState.ACTIVE and entry.from_state is not None:
            return entry.at
    return None
