"""The wake procedure: lock → WAKING → scale to the recorded count → ready → ACTIVE.

Owns carrying out the wake steps of transitions.py: doing a wake once however many requests
ask (single flight within the process, the service lock across processes), and turning how
it ended (ready, scale failed, timed out) into the table's event, so that a failed wake
leaves the service HIBERNATED, never stuck in WAKING. Must not hold or proxy requests (the
activator) nor push Envoy config: whoever routes sees the store change (WAKING re-adds an
evicted route, ACTIVE flips the endpoints back) and pushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from torpor import metrics
from torpor.clock import Clock, SystemClock
from torpor.errors import (
    ConflictError,
    StoreError,
    TorporError,
    UnknownServiceError,
    WakeFailedError,
    WorkloadError,
)
from torpor.lifecycle.ports import WakeProgress
from torpor.lifecycle.records import change_state
from torpor.lifecycle.transitions import Action, Event, Step, decide
from torpor.locks import LockTimeoutError, ServiceLocks, lock_key
from torpor.logs import event
from torpor.model import Endpoint, ServiceRecord, ServiceState
from torpor.store.base import Store
from torpor.wake_settings import SettingsOf, WakeSettings, first_replicas
from torpor.workloads.base import Workloads

log = logging.getLogger("torpor.waker")

FLIP_WHEN = ("first_ready", "all_ready")

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """One running task per key; every caller awaits the same one (a wake per service, a
    flip confirmation per service).

    A caller that gives up (deadline, client gone) is cancelled alone: the task goes on
    for the others and for the next caller.
    """

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[T]] = {}

    def running(self, key: str) -> bool:
        return key in self._running

    async def join(self, key: str, start: Callable[[], Awaitable[T]]) -> T:
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(start())
            self._running[key] = future
            future.add_done_callback(lambda f: self._finished(key, f))
        return await asyncio.shield(future)

    def _finished(self, key: str, future: asyncio.Future[T]) -> None:
        if self._running.get(key) is future:
            del self._running[key]
        if not future.cancelled():
            future.exception()  # retrieved: nobody may be left waiting on a failed task


#: How the history reason of a wake nobody waits on starts (torpor/ledger.py reads it: such
#: a wake is not a cold start).
PREWAKE_REASON = "pre-wake"
VERSION_SHIFT_REASON = "version shift"
_REASON_PREFIXES = {Event.PREWAKE: PREWAKE_REASON, Event.VERSION_SHIFT: VERSION_SHIFT_REASON}


def reason_for(reason: str, cause: Event) -> str:
    """`reason` as the wake writes it: starting with "pre-wake" for a PREWAKE and with
    "version shift" for a VERSION_SHIFT (unless it already does)."""
    prefix = _REASON_PREFIXES.get(cause)
    if prefix is None or reason.startswith(prefix):
        return reason
    return f"{prefix}: {reason}"


class _Wake:
    """One wake of one service, under its lock: the record as it goes, and the clock.

    `replicas` is the count the service runs once awake (the recorded one, at least 1);
    `first` those the wake starts and waits for (its activation_replicas, when fewer): the
    rest are started once the first are ready."""

    def __init__(self, record: ServiceRecord, reason: str, started: float,
                 settings: WakeSettings) -> None:
        self.record = record
        self.reason = reason
        self.started = started
        self.timeout = settings.wake_timeout
        self.deadline = started + settings.wake_timeout
        self.replicas = max(1, record.recorded_replicas)
        self.first = first_replicas(record.recorded_replicas, settings.activation_replicas)
        self.scaled = False


class Waker:
    """Wakes services through the store, the workloads and the service lock.

    Implements torpor.lifecycle.ports.Wakes."""

    def __init__(self, store: Store, workloads: Workloads, locks: ServiceLocks, *,
                 wake_timeout: float, flip_when: str = "first_ready",
                 clock: Clock | None = None, settings: SettingsOf | None = None,
                 members: Callable[[str], tuple[str, ...]] | None = None) -> None:
        """`settings(name)`: the service's own wake settings (default: `wake_timeout` for
        every service, the recorded count at once). `members(name)`: the other services of
        its group, woken with it (default: none)."""
        if flip_when not in FLIP_WHEN:
            raise ValueError(f"flip_when must be one of {FLIP_WHEN}, not {flip_when!r}")
        self._store = store
        self._workloads = workloads
        self._locks = locks
        self._flip_when = flip_when
        self._clock = clock or SystemClock()
        self._settings: SettingsOf = settings or (
            lambda name: WakeSettings(wake_timeout, 1))
        self._members = members or (lambda name: ())
        self._flights: SingleFlight[tuple[Endpoint, ...]] = SingleFlight()
        self._running: dict[str, _Wake] = {}
        self._group_wakes: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Stop the wakes of group members still under way (each ends as a wake cut
        short does: repair takes over)."""
        for task in list(self._group_wakes):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._group_wakes.clear()

    def progress(self, name: str) -> WakeProgress | None:
        """How far the wake of `name` running in this process is (None: none runs)."""
        wake = self._running.get(name)
        if wake is None:
            return None
        try:
            ready = len(self._workloads.ready_endpoints(name))
        except TorporError:
            ready = 0
        return WakeProgress(ready=min(ready, wake.first), replicas=wake.first)

    def waking(self, name: str) -> bool:
        """Whether a wake of `name` is under way in this process."""
        return self._flights.running(name)

    async def wake(self, name: str, reason: str,
                   cause: Event = Event.WAKE) -> tuple[Endpoint, ...]:
        """Ready endpoints of `name`, waking it first if it sleeps. `cause`: WAKE (a request
        or `torpor wake`), PREWAKE or VERSION_SHIFT. Raises UnknownServiceError, or
        WakeFailedError when it did not get ready in time."""
        return await self._flights.join(name, lambda: self._wake(name, reason, cause))

    async def _wake(self, name: str, reason: str, cause: Event) -> tuple[Endpoint, ...]:
        started = self._clock.monotonic()
        reason = reason_for(reason, cause)
        settings = self._settings(name)
        try:
            async with self._locks.hold(lock_key(name), settings.wake_timeout):
                record = await self._store.get(name)
                if record is None:
                    raise UnknownServiceError(f"unknown service {name!r}")
                wake = _Wake(record, reason, started, settings)
                self._running[name] = wake
                try:
                    return await self._carry_out(wake, cause)
                finally:
                    self._running.pop(name, None)
        except LockTimeoutError as exc:
            self._count(name, "failed", started)
            raise WakeFailedError(f"service {name!r}: {exc}", "failed") from exc
        except ConflictError as exc:
            self._count(name, "failed", started)
            raise WakeFailedError(f"service {name!r}: its record kept changing during the "
                                  f"wake ({exc})", "failed") from exc
        except StoreError as exc:
            # etcd down (or sqlite failing): no wake without the lock and the record.
            self._count(name, "failed", started)
            raise WakeFailedError(f"service {name!r} cannot be woken now: the store is "
                                  f"unavailable ({exc})", "failed") from exc

    async def _carry_out(self, wake: _Wake, cause: Event) -> tuple[Endpoint, ...]:
        """The table's wake step, then the step of how it ended."""
        name = wake.record.name
        step = decide(name, wake.record.state, cause)
        if step.to is None and not step.before and not step.after:
            # Nothing to do (a pre-wake of an EVICTED or HIBERNATING service): no wake
            # happened, so no "woken" outcome; whatever is ready now.
            event(log, "wake.not_needed", service=name, state=wake.record.state.value,
                  cause=cause.value, level=logging.DEBUG)
            return self._workloads.ready_endpoints(name)
        # Already ACTIVE (another activator's wake finished while this one waited for the
        # lock): only its ready endpoints; no wake of this process to count.
        woke = wake.record.state is not ServiceState.ACTIVE
        await self._take(wake, step, wake.reason)
        if step.to is ServiceState.WAKING:
            self._wake_group(name, cause)
        try:
            ready = await self._run(wake, step.after)
        except WorkloadError as exc:
            await self._end(wake, Event.WAKE_FAILED, f"wake failed: {exc}", "failed")
            raise WakeFailedError(f"service {name!r}: {exc}", "failed") from exc
        except TimeoutError as exc:
            await self._end(wake, Event.WAKE_TIMED_OUT,
                            f"wake timed out: not ready after {wake.timeout:g}s",
                            "timeout")
            raise WakeFailedError(
                f"service {name!r} did not become ready within {wake.timeout:g}s "
                f"({exc})", "timeout") from exc
        took = self._clock.monotonic() - wake.started
        done = decide(name, wake.record.state, Event.WAKE_SUCCEEDED)
        try:
            await self._take(wake, done, f"{wake.reason}; {len(ready)} ready after {took:.1f}s",
                             desired_replicas=wake.replicas)
        except StoreError as exc:
            # The replicas are ready: serve what is held. The record stays WAKING until
            # the store is back and the leader's repair sees ready replicas (→ ACTIVE).
            event(log, "wake.state_write_failed", service=name, error=str(exc),
                  level=logging.ERROR)
        await self._scale_rest(wake)
        if woke:
            self._count(name, "woken", wake.started)
        return ready

    async def _scale_rest(self, wake: _Wake) -> None:
        """After a wake that started fewer replicas than recorded (activation_replicas):
        the rest, now, still under the lock (a hibernation cannot interleave). Starting
        replicas does not wait for them: the held requests go to the first ones."""
        if not wake.scaled or wake.first >= wake.replicas:
            return
        name = wake.record.name
        event(log, "wake.scaling_rest", service=name, replicas=wake.replicas,
              first=wake.first)
        try:
            await self._workloads.scale(name, wake.replicas)
        except WorkloadError as exc:
            event(log, "wake.scale_rest_failed", service=name, error=str(exc),
                  level=logging.WARNING)

    def _wake_group(self, name: str, cause: Event) -> None:
        """`name` starts waking: wake the other members of its group too, each in a task
        of its own (from its recorded count), joining a wake of theirs already running."""
        members = self._members(name)
        if not members:
            return
        group = self._settings(name).group
        event(log, "wake.group", service=name, group=group, members=list(members))
        for member in members:
            if self._flights.running(member):
                continue
            reason = f"group {group}: woken with {name}" if group else f"woken with {name}"
            task = asyncio.create_task(self._wake_member(member, reason, cause))
            self._group_wakes.add(task)
            task.add_done_callback(self._group_wakes.discard)

    async def _wake_member(self, member: str, reason: str, cause: Event) -> None:
        try:
            await self._flights.join(member, lambda: self._wake(member, reason, cause))
        except TorporError as exc:
            event(log, "wake.group_member_failed", service=member, error=str(exc),
                  level=logging.WARNING)
        except Exception:  # a task of its own: nobody else would see it
            log.exception("wake.group_member_failed service=%s", member)

    async def _run(self, wake: _Wake, actions: tuple[Action, ...]) -> tuple[Endpoint, ...]:
        """The step's effects in order; returns the ready endpoints WAIT_READY found."""
        ready: tuple[Endpoint, ...] = ()
        for action in actions:
            if action is Action.SCALE_UP:
                event(log, "wake.scaling", service=wake.record.name, replicas=wake.first,
                      recorded=wake.replicas, flip_when=self._flip_when)
                await self._workloads.scale(wake.record.name, wake.first)
                wake.scaled = True
            elif action is Action.WAIT_READY:
                ready = await self._ready(wake)
            elif action is Action.SCALE_TO_ZERO:  # giving up: best effort, logged
                try:
                    await self._workloads.scale(wake.record.name, 0)
                except WorkloadError as exc:
                    event(log, "wake.scale_down_failed", service=wake.record.name,
                          error=str(exc), level=logging.WARNING)
            else:  # pragma: no cover - the table gives a wake no other action
                raise AssertionError(f"a wake cannot {action.value}")
        return ready

    async def _ready(self, wake: _Wake) -> tuple[Endpoint, ...]:
        """Wait until enough replicas are ready (all of them with flip_when all_ready, when
        this wake started them), at most until the wake's deadline."""
        name = wake.record.name
        needed = wake.first if wake.scaled and self._flip_when == "all_ready" else 1
        current = self._workloads.ready_endpoints(name)
        if len(current) >= needed:
            return current
        remaining = max(0.0, wake.deadline - self._clock.monotonic())
        return await self._workloads.wait_ready(name, needed, remaining)

    async def _end(self, wake: _Wake, ended: Event, reason: str, outcome: str) -> None:
        """How a failed wake leaves the service: the table's step for `ended`, on the record
        as stored now (HIBERNATED with no replica after a wake that started them, so that a
        later request tries again from a known state)."""
        current = await self._store.get(wake.record.name)
        if current is not None:
            wake.record = current
            await self._take(wake, decide(current.name, current.state, ended), reason)
        self._count(wake.record.name, outcome, wake.started)

    async def _take(self, wake: _Wake, step: Step, reason: str, **changes: int) -> None:
        """Carry out `step`'s `before` effects and write its state into `wake.record`. The
        `after` effects are the caller's (they decide how the wake ends)."""
        if step.before:
            await self._run(wake, step.before)
        if step.to is not None:
            wake.record = await self._move(wake.record, step, reason, **changes)

    async def _move(self, record: ServiceRecord, step: Step, reason: str,
                    **changes: int) -> ServiceRecord:
        """change_state, re-reading once if the record changed meanwhile (a status write)."""
        assert step.to is not None
        now = self._clock.now()
        try:
            return await change_state(self._store, record, step.to, reason, now, **changes)
        except ConflictError:
            fresh = await self._store.get(record.name)
            if fresh is None:
                raise UnknownServiceError(f"unknown service {record.name!r}") from None
            return await change_state(self._store, fresh, step.to, reason, now, **changes)

    def _count(self, name: str, outcome: str, started: float) -> None:
        took = self._clock.monotonic() - started
        metrics.WAKE_OUTCOMES.labels(service=name, outcome=outcome).inc()
        metrics.WAKE_DURATION.labels(service=name, outcome=outcome).observe(took)
        event(log, "wake.finished", service=name, outcome=outcome, seconds=round(took, 3),
              level=logging.INFO if outcome == "woken" else logging.WARNING)
