"""The policy loop: every `check_every`, the idle policy's verdict on each service becomes a
lifecycle event.

Owns asking the policy (policies/) about each service with its calling statistics and its
settings (the policy section with the service's own overrides), turning the verdict into
the table's event, and handing the resulting step to the hibernation procedure (or, for a
pre-wake of a HIBERNATED service, to the waker, in a task of its own); in a fleet only the
leader does. With `kind: learned` each pass first feeds every service's calls to its
learned state (xds_server/learning_state.py), which a leader loads before its first pass
and saves as it goes and at stop. Must not choose states (torpor.lifecycle.transitions
does) nor carry out a hibernation or a wake (torpor.lifecycle does).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from policies import Activity, Decision, PolicySettings, decide, learning
from policies.awake import group_decisions, keep_awake
from torpor import metrics
from torpor.call_stats import CallStats
from torpor.catalog import ServiceCatalog
from torpor.clock import Clock
from torpor.config import Config, ServiceConfig
from torpor.errors import InvalidTransitionError, TorporError
from torpor.lifecycle.hibernation import Hibernation
from torpor.lifecycle.records import last_woken
from torpor.lifecycle.transitions import Event, step
from torpor.locks import LockTimeoutError
from torpor.logs import event
from torpor.model import Endpoint, ServiceRecord, ServiceState
from torpor.store.base import Store
from xds_server.collector import CallCollector
from xds_server.learning_state import LearnedStates

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


def policy_kind(config: Config, service: ServiceConfig) -> str:
    """"learned" or "fixed": the service's own `policy.kind`, else the policy section's."""
    return service.policy.kind or config.policy.kind


def learning_settings(config: Config, service: ServiceConfig) -> learning.LearningSettings:
    """The learning policy's settings of `service`: its `cold_start_price` and `prewake`
    (own, else the policy section's); the shortest keep-alive is `check_every`, the finest
    gap a pass can tell."""
    base, own = config.policy, service.policy
    return learning.LearningSettings(
        cold_start_price=(base.cold_start_price if own.cold_start_price is None
                          else own.cold_start_price),
        min_keep=base.check_every,
        prewake=base.prewake if own.prewake is None else own.prewake,
    )


def prewake_wanted(state: ServiceState, decision: Decision, never_sleep: bool,
                   enabled: bool = True) -> bool:
    """Whether the loop raises PREWAKE for a service in `state` with `decision`: only for a
    HIBERNATED one (an EVICTED service waits for a real request; a WAKING, HIBERNATING or
    ACTIVE one has nothing to gain), never for a `never_sleep` one or with pre-wake off."""
    return (enabled and decision.prewake and not never_sleep
            and state is ServiceState.HIBERNATED)


def prewake_reason(next_call: float | None) -> str:
    """The history reason of a pre-wake: starts with "pre-wake"."""
    if next_call is None:
        return "pre-wake: call predicted"
    at = datetime.datetime.fromtimestamp(next_call, datetime.UTC).strftime("%H:%M:%SZ")
    return f"pre-wake: call predicted at {at}"


@dataclasses.dataclass(frozen=True)
class Outlook:
    """What the policy expects of a service, for `torpor status`: its keep-alive (seconds
    idle before it is hibernated; None: never, e.g. never_sleep) and the predicted time of
    its next call (None: no prediction)."""

    keep_alive: float | None = None
    next_call: float | None = None


class PrewakeWaker(Protocol):
    """What a pre-wake needs: torpor.lifecycle.wake.Waker."""

    async def wake(self, name: str, reason: str,
                   cause: Event = Event.WAKE) -> tuple[Endpoint, ...]: ...


class PolicyLoop:
    """Applies the idle policy to the table's services."""

    def __init__(self, config: Config, catalog: ServiceCatalog,
                 records: Callable[[], Mapping[str, ServiceRecord]],
                 collector: CallCollector, hibernation: Hibernation, clock: Clock,
                 is_leader: Callable[[], bool] = lambda: True, *,
                 waker: PrewakeWaker | None = None, store: Store | None = None) -> None:
        """`waker`: carries out pre-wakes (None: no pre-wake). `store`: where learned states
        are kept (None: in memory only)."""
        self._config = config
        self._catalog = catalog  # discovered services come and go: looked up per pass
        self._records = records
        self._collector = collector
        self._hibernation = hibernation
        self._clock = clock
        self._is_leader = is_leader
        self._waker = waker
        self.learned = LearnedStates(
            store, prior_every=min(max(10 * config.policy.check_every, 1.0), 300.0))
        self._outlooks: dict[str, Outlook] = {}
        self._prewakes: dict[str, asyncio.Task[None]] = {}
        self._saved_at: float | None = None

    def set_config(self, config: Config) -> None:
        """A reloaded config: its `policy` section applies from the next pass on."""
        self._config = config

    async def run(self) -> None:
        """A pass every `policy.check_every`, when leading; learned states are saved every
        `control_plane.stats_flush_every` (and at `close`)."""
        while True:
            await asyncio.sleep(self._config.policy.check_every)
            if not self._is_leader():
                if self.learned.loaded:  # leadership lost: the new leader owns the states
                    self.learned.unload()
                    self._outlooks.clear()
                continue
            try:
                await self.check()
                await self._save_now_and_then()
            except Exception:
                log.exception("policy.check_failed")

    async def close(self) -> None:
        """Stop pre-wakes under way (the wake itself ends as the waker ends it) and save
        the learned states that changed, if this loop was the one learning."""
        for task in list(self._prewakes.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._prewakes.clear()
        if self.learned.loaded and self._is_leader():
            try:
                saved = await self.learned.save()
            except TorporError as exc:
                event(log, "learning.save_failed", error=str(exc), level=logging.ERROR)
            else:
                event(log, "learning.saved", services=saved, level=logging.DEBUG)

    def outlook(self, name: str) -> Outlook:
        """The keep-alive and next predicted call of `name` as of the last pass."""
        return self._outlooks.get(name, Outlook())

    def prewaking(self, name: str) -> bool:
        return name in self._prewakes

    async def check(self) -> None:
        """One pass: repair what a crash left half-done, take in the calls since the last
        pass, then act on every verdict."""
        metrics.POLICY_CHECKS.inc()
        if not self.learned.loaded:  # a new leader: what the previous one learned first
            await self.learned.load()
        await self._hibernation.repair(self._records().values())
        now = self._clock.now()
        services = []
        for name, record in list(self._records().items()):
            service = self._catalog.get(name)
            if service is None:
                continue
            stats = self._collector.ensure(name, record.created_at)
            self.learned.observe(name, stats, now)
            services.append((record, service, stats))
        self.learned.refresh_prior(now)
        verdicts = {record.name: keep_awake(self._decide(record, service, stats, now),
                                            last_woken(record), service.min_awake, now)
                    for record, service, stats in services}
        verdicts = group_decisions(verdicts, {service.name: service.group
                                              for _, service, _ in services if service.group})
        together: dict[str, list[tuple[ServiceRecord, Decision]]] = {}
        for record, service, _ in services:
            verdict = verdicts[record.name]
            if prewake_wanted(record.state, verdict, service.never_sleep,
                              learning_settings(self._config, service).prewake):
                self._prewake(record.name, verdict.next_call)
            if service.group is None:
                await self._act(record, VERDICTS[verdict.activity], verdict.reason)
            else:
                together.setdefault(service.group, []).append((record, verdict))
        for group, members in together.items():
            await self._act_together(group, members)

    async def _act_together(self, group: str,
                            members: list[tuple[ServiceRecord, Decision]]) -> None:
        """The verdicts of one group's members, carried out at once: when the group is idle
        (group_decisions left no member ACTIVE), every member that runs is hibernated in
        this pass, concurrently, with the group named in its history."""
        moving = [record.name for record, verdict in members
                  if step(record.state, VERDICTS[verdict.activity]).to is not None
                  and verdict.activity is not Activity.ACTIVE]
        if moving:
            event(log, "policy.group_idle", group=group, services=moving)
        await asyncio.gather(*(
            self._act(record, VERDICTS[verdict.activity],
                      verdict.reason if verdict.activity is Activity.ACTIVE
                      else f"group {group} idle; {verdict.reason}")
            for record, verdict in members))

    def _decide(self, record: ServiceRecord, service: ServiceConfig, stats: CallStats,
                now: float) -> Decision:
        """The verdict of the service's policy kind; notes its outlook for status."""
        settings = policy_settings(self._config, service)
        if policy_kind(self._config, service) == "fixed":
            verdict = decide(stats, settings, now, last_woken(record))
            keep = None if service.never_sleep else settings.idle_after
            self._outlooks[record.name] = Outlook(keep_alive=keep)
            return verdict
        plan_ = self.learned.plan_for(record.name, learning_settings(self._config, service),
                                      settings.idle_after)
        verdict = learning.decide(stats, plan_, settings, now, last_woken(record))
        if service.never_sleep:
            self._outlooks[record.name] = Outlook(next_call=plan_.next_call(stats.last_call))
        else:
            self._outlooks[record.name] = Outlook(plan_.keep_alive,
                                                  plan_.next_call(stats.last_call))
        return verdict

    def _prewake(self, name: str, next_call: float | None) -> None:
        """Wake `name` ahead of its predicted call, in a task of its own (one per service);
        the pass goes on."""
        if self._waker is None or name in self._prewakes:
            return
        task = asyncio.create_task(self._run_prewake(name, prewake_reason(next_call)))
        self._prewakes[name] = task
        task.add_done_callback(
            lambda t: self._prewakes.pop(name) if self._prewakes.get(name) is t else None)

    async def _run_prewake(self, name: str, reason: str) -> None:
        assert self._waker is not None
        metrics.POLICY_PREWAKES.labels(service=name).inc()
        event(log, "policy.prewake", service=name, reason=reason)
        try:
            await self._waker.wake(name, reason, cause=Event.PREWAKE)
        except TorporError as exc:
            event(log, "policy.prewake_failed", service=name, error=str(exc),
                  level=logging.WARNING)

    async def _save_now_and_then(self) -> None:
        """Save the learned states that changed, at most every `stats_flush_every`."""
        now = self._clock.monotonic()
        if self._saved_at is not None and (
                now - self._saved_at < self._config.control_plane.stats_flush_every):
            return
        self._saved_at = now
        try:
            await self.learned.save()
        except TorporError as exc:
            event(log, "learning.save_failed", error=str(exc), level=logging.ERROR)

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
