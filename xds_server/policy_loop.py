"""The policy loop: every `check_every`, the idle policy's verdict on each service becomes a
lifecycle event.

Owns asking the policy (policies/) about each service with its calling statistics and its
settings (the policy section with the service's own overrides), turning the verdict into
the table's event, and handing the resulting step to the hibernation procedure; in a
fleet only the leader does. Must not choose states (torpor.lifecycle.transitions does) nor
carry out a hibernation (torpor.lifecycle.hibernation does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from policies import Activity, PolicySettings, decide
from torpor import metrics
from torpor.catalog import ServiceCatalog
from torpor.clock import Clock
from torpor.config import Config, ServiceConfig
from torpor.errors import InvalidTransitionError, TorporError
from torpor.lifecycle.hibernation import Hibernation
from torpor.lifecycle.records import last_woken
from torpor.lifecycle.transitions import Event, step
from torpor.locks import LockTimeoutError
from torpor.logs import event
from torpor.model import ServiceRecord, ServiceState
from xds_server.collector import CallCollector

log = logging.getLogger("torpor.reconciler")

#: How long a policy pass waits for a service's lock before leaving it for the next pass
#: (a wake in progress holds it; the next pass sees the outcome).
POLICY_LOCK_WAIT = 0.5

#: The policy's verdict as a lifecycle event.
VERDICTS: Mapping[Activity, Event] = {
    Activity.ACTIVE: Event.POLICY_ACTIVE,
    Activity.LOW: Event.POLICY_LOW,
    Activity.DORMANT: Event.POLICY_DORMANT,
}


def policy_settings(config: Config, service: ServiceConfig) -> PolicySettings:
    """The policy section with the service's own overrides applied."""
    base, own = config.policy, service.policy
    return PolicySettings(
        idle_after=base.idle_after if own.idle_after is None else own.idle_after,
        evict_after=base.evict_after if own.evict_after is None else own.evict_after,
        creation_grace=base.creation_grace if own.creation_grace is None else own.creation_grace,
        never_sleep=service.never_sleep,
    )


class PolicyLoop:
    """Applies the idle policy to the table's services."""

    def __init__(self, config: Config, catalog: ServiceCatalog,
                 records: Callable[[], Mapping[str, ServiceRecord]],
                 collector: CallCollector, hibernation: Hibernation, clock: Clock,
                 is_leader: Callable[[], bool] = lambda: True) -> None:
        self._config = config
        self._catalog = catalog  # discovered services come and go: looked up per pass
        self._records = records
        self._collector = collector
        self._hibernation = hibernation
        self._clock = clock
        self._is_leader = is_leader

    async def run(self) -> None:
        """A pass every `policy.check_every`, when leading."""
        while True:
            await asyncio.sleep(self._config.policy.check_every)
            if not self._is_leader():
                continue
            try:
                await self.check()
            except Exception:
                log.exception("policy.check_failed")

    async def check(self) -> None:
        """One pass: repair what a crash left half-done, then act on every verdict."""
        metrics.POLICY_CHECKS.inc()
        await self._hibernation.repair(self._records().values())
        for name, record in list(self._records().items()):
            service = self._catalog.get(name)
            if service is None:
                continue
            stats = self._collector.ensure(name, record.created_at)
            verdict = decide(stats, policy_settings(self._config, service), self._clock.now(),
                             last_woken(record))
            await self._act(record, VERDICTS[verdict.activity], verdict.reason)

    async def _act(self, record: ServiceRecord, verdict: Event, reason: str) -> None:
        """Hand the verdict's step to the procedure that carries it out; the procedure
        decides again on the record under the service's lock."""
        name = record.name
        target = step(record.state, verdict).to
        try:
            if target is ServiceState.HIBERNATING:
                await self._hibernation.hibernate(name, reason, POLICY_LOCK_WAIT, cause=verdict)
            elif target is ServiceState.EVICTED:
                await self._hibernation.evict(name, reason, POLICY_LOCK_WAIT)
        except (LockTimeoutError, InvalidTransitionError) as exc:
            event(log, "policy.skipped", service=name, why=str(exc), level=logging.DEBUG)
        except TorporError as exc:
            event(log, "policy.failed", service=name, error=str(exc), level=logging.ERROR)
