"""Held requests: finding a request's service, a bounded count per service, and the one way a
held request waits and leaves, whatever protocol it came in on.

Owns: the Host → service lookup both fronts use (asking for a catalog refresh once when the
host is unknown, so that a service discovered a moment ago is found on its first request);
admission (at most `max_held_per_service` requests of one service wait at once; the next
one is refused); the wait itself (the wake, then the route confirmation when the caller needs
one, both within `wake_timeout`); and, in one place, counting and logging how each held
request left: ready, refused, deadline passed, wake failed, flip unconfirmed or client gone.
Returns an `Outcome` value rather than raising, so that HTTP/1 and HTTP/2 cannot drift apart
again on what a failure means (answers.py maps outcomes to answers).

Must not: wake (that is the `Wakes` given), proxy or answer (handler.py, h2_holder.py), or
decide status codes (answers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal, Protocol

from torpor import metrics
from torpor.clock import Clock, SystemClock
from torpor.config import ServiceConfig
from torpor.errors import TorporError, UnknownServiceError, WakeFailedError
from torpor.lifecycle.ports import Wakes
from torpor.logs import event
from torpor.model import Endpoint
from torpor.routes import ROOT
from torpor.wake_settings import SettingsOf, WakeSettings

log = logging.getLogger("torpor.activator")

#: "The flip back to `name`'s replicas is applied by every Envoy": returns once confirmed,
#: raises TorporError when it cannot be.
AfterWake = Callable[[str], Awaitable[None]]
#: The service for a Host header (or :authority), or None when there is none even after a
#: catalog refresh.
class Lookup(Protocol):
    """Request (Host, path, the service Envoy named if any) → its service."""

    def __call__(self, host: str, path: str = ..., named: str | None = ...,
                 version: str | None = ...) -> Awaitable[ServiceConfig | None]: ...
#: What a held request was waiting for when it left: the wake, or the route confirmation.
Phase = Literal["wake", "flip"]


class QueueFullError(TorporError):
    """The service already has as many held requests as allowed."""


class HeldRequests:
    """Counts of requests waiting for a wake, per service and in all."""

    def __init__(self, max_per_service: int, max_total: int | None = None) -> None:
        if max_per_service < 1 or (max_total is not None and max_total < 1):
            raise ValueError("max_per_service and max_total must be at least 1")
        self.max_per_service = max_per_service
        self.max_total = max_total
        self._held: dict[str, int] = {}
        self._total = 0

    def count(self, name: str) -> int:
        return self._held.get(name, 0)

    def total(self) -> int:
        return self._total

    @contextlib.contextmanager
    def slot(self, name: str, limit: int | None = None) -> Iterator[None]:
        """Hold one request of `name` for the duration of the block; raises QueueFullError
        when the service's queue (`limit`: its own max_held, else max_per_service), or the
        activator as a whole, is full. The slot is given back however the block ends."""
        held = self._held.get(name, 0)
        own = limit is not None and limit != self.max_per_service
        if held >= (limit if limit is not None else self.max_per_service):
            metrics.QUEUE_OVERFLOWS.labels(service=name).inc()
            setting = "services[].max_held" if own else "activator.max_held_per_service"
            raise QueueFullError(
                f"service {name!r} already has {held} requests waiting for it to wake "
                f"({setting})")
        if self.max_total is not None and self._total >= self.max_total:
            metrics.QUEUE_OVERFLOWS.labels(service=name).inc()
            raise QueueFullError(
                f"this activator already holds {self._total} requests for sleeping services "
                f"(activator.max_held)")
        self._set(name, held + 1)
        metrics.HELD_REQUESTS_TOTAL.labels(service=name).inc()
        try:
            yield
        finally:
            self._set(name, self._held.get(name, 1) - 1)

    def _set(self, name: str, value: int) -> None:
        self._total += value - self._held.get(name, 0)
        if value > 0:
            self._held[name] = value
        else:
            self._held.pop(name, None)
        metrics.HELD_REQUESTS.labels(service=name).set(value)


def abandoned(name: str, reason: str) -> None:
    """A held request left without an answer from its service: `reason` is "deadline"
    (wake_timeout passed), "failed" (the wake or the flip failed), "disconnected" (the
    client hung up while held) or "drained" (still held when the drain grace ended)."""
    metrics.HELD_ABANDONED.labels(service=name, reason=reason).inc()


class ServiceLookup:
    """Request → service for both fronts, refreshing the catalog once on a miss.

    By the service Envoy named (`x-torpor-service`, set on the routes of services whose
    path Envoy rewrites and on each version of a service's split: their request no longer
    shows which; Envoy drops a client's own), else by Host and path (torpor/routes.py).
    Async because the refresh is (a standalone activator asks the control plane): callers
    run it in the request's own task, never in a protocol callback.
    """

    def __init__(self, by_host: Callable[[str, str], ServiceConfig | None],
                 on_miss: Callable[[], Awaitable[None]] | None = None,
                 by_name: Callable[[str], ServiceConfig | None] | None = None) -> None:
        self._by_host = by_host
        self._by_name = by_name
        self._on_miss = on_miss

    async def __call__(self, host: str, path: str = ROOT, named: str | None = None,
                       version: str | None = None) -> ServiceConfig | None:
        service = self._find(host, path, named, version)
        if service is None and self._on_miss is not None:
            await self._on_miss()
            service = self._find(host, path, named, version)
        return service

    def _find(self, host: str, path: str, named: str | None,
              version: str | None) -> ServiceConfig | None:
        path = path.split("?", 1)[0]
        routed: ServiceConfig | None = None
        if named and self._by_name is not None:
            routed = self._by_name(named)
            # Only the routes of a rewritten path name their service (and only then does
            # Envoy drop a client's own header): a name for any other is not trusted.
            if routed is not None and routed.rewrite is None:
                routed = None
        # The service with versions Envoy named (its rewritten routes name it), or the one
        # the request's route reaches.
        unit = named if named and routed is None else None
        routed = routed or self._by_host(host, path)
        if routed is not None:
            unit = routed.version_of or routed.name
        if version and self._by_name is not None and unit is not None:
            chosen = self._by_name(version)
            # A version of that service: Envoy's choice (its header overwrites a
            # client's); a name of any other service is not trusted.
            if chosen is not None and chosen.version_of == unit:
                return chosen
        return routed


# --- outcomes: how a held request left ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ready:
    """The service is awake (and, when asked for, its route confirmed): serve the request."""

    service: str
    endpoints: tuple[Endpoint, ...]
    waited: float  # seconds held: the request's cold start


@dataclasses.dataclass(frozen=True)
class QueueFull:
    """Refused at once: the service already holds as many requests as allowed."""

    service: str
    message: str


@dataclasses.dataclass(frozen=True)
class DeadlinePassed:
    """`wake_timeout` passed while waiting for the wake ("wake") or the route ("flip")."""

    service: str
    phase: Phase
    wake_timeout: float


@dataclasses.dataclass(frozen=True)
class WakeFailed:
    """The wake itself gave up: not ready in its own time ("timeout") or could not start
    ("failed": scaling failed, lock busy, store unavailable)."""

    service: str
    outcome: Literal["failed", "timeout"]
    message: str


@dataclasses.dataclass(frozen=True)
class UnknownService:
    """The waker does not know the service (removed between lookup and wake)."""

    service: str
    message: str


@dataclasses.dataclass(frozen=True)
class FlipUnconfirmed:
    """The service is awake but the gateway could not confirm it routes to the replicas."""

    service: str
    error: str


@dataclasses.dataclass(frozen=True)
class Draining:
    """The activator is shutting down: refused at once when it arrived during the drain
    ("refused"), or still held when the drain grace ended ("grace_ended")."""

    service: str
    when: Literal["refused", "grace_ended"]


Outcome = (Ready | QueueFull | DeadlinePassed | WakeFailed | UnknownService | FlipUnconfirmed
           | Draining)


class _DrainEnded(Exception):
    """The drain grace ended while the request was still held."""


class Holding:
    """Holds one request of a service until it can be served, for either protocol."""

    def __init__(self, held: HeldRequests, wakes: Wakes, wake_timeout: float,
                 clock: Clock | None = None,
                 on_held: Callable[[str], None] | None = None,
                 settings: SettingsOf | None = None) -> None:
        """`settings(name)`: the service's own wake_timeout and max_held (default: the
        `wake_timeout` given and the held requests' max_per_service for every service)."""
        self.held = held
        self._wakes = wakes
        self._settings: SettingsOf = settings or (
            lambda name: WakeSettings(wake_timeout, held.max_per_service))
        self._clock = clock or SystemClock()
        # Told of every request that arrives for a sleeping service (the idle policy
        # counts them as calls), refused or not.
        self._on_held = on_held or (lambda name: None)
        self._draining = False
        self._drain_ended = asyncio.Event()

    @property
    def draining(self) -> bool:
        return self._draining

    def note_call(self, name: str) -> None:
        """A request of `name` that is answered without being held (the waking page): the
        idle policy counts it as a call all the same."""
        self._on_held(name)

    def start_drain(self) -> None:
        """Refuse every request from now on (Draining "refused"); those already held go on
        waiting for their wake."""
        self._draining = True

    def end_drain(self) -> None:
        """Release every request still held with Draining "grace_ended"."""
        self._draining = True
        self._drain_ended.set()

    async def hold(self, name: str, after_wake: AfterWake | None = None) -> Outcome:
        """Hold one request of `name`: take a slot, trigger or join its wake, then, when
        `after_wake` is given, wait for it too; all within one `wake_timeout` deadline (the
        service's own, else the activator's), in a queue of the service's `max_held`.

        Returns how the request left; raises CancelledError (counted as abandoned
        "disconnected") when the caller is cancelled, i.e. the client went away. The wake
        goes on for the others either way.
        """
        arrived = self._clock.monotonic()
        self._on_held(name)
        if self._draining:
            refused = Draining(name, "refused")
            self._report(refused, 0.0)
            return refused
        phases: list[Phase] = ["wake"]
        unconfirmed: str | None = None
        outcome: Outcome
        own = self._settings(name)
        try:
            with self.held.slot(name, own.max_held):
                async with asyncio.timeout(own.wake_timeout):
                    endpoints, unconfirmed = await self._until_drain_ends(
                        self._wait(name, after_wake, phases))
        except _DrainEnded:
            outcome = Draining(name, "grace_ended")
        except QueueFullError as exc:
            outcome = QueueFull(name, str(exc))
        except TimeoutError:
            outcome = DeadlinePassed(name, phases[-1], own.wake_timeout)
        except WakeFailedError as exc:
            outcome = WakeFailed(name, "timeout" if exc.outcome == "timeout" else "failed",
                                 str(exc))
        except UnknownServiceError as exc:
            outcome = UnknownService(name, str(exc))
        except asyncio.CancelledError:
            abandoned(name, "disconnected")
            event(log, "activator.client_gone", service=name, phase=phases[-1],
                  waited=self._waited(arrived))
            raise
        else:
            if unconfirmed is not None:
                outcome = FlipUnconfirmed(name, unconfirmed)
            else:
                outcome = Ready(name, endpoints, self._clock.monotonic() - arrived)
        self._report(outcome, self._waited(arrived))
        return outcome

    async def _wait(self, name: str, after_wake: AfterWake | None,
                    phases: list[Phase]) -> tuple[tuple[Endpoint, ...], str | None]:
        """The wake, then the route confirmation when asked for: (endpoints, why the flip
        is unconfirmed or None). Appends "flip" to `phases` once the wake is done."""
        endpoints = await self._wakes.wake(name, "first request")
        phases.append("flip")
        if after_wake is not None:
            try:
                await after_wake(name)
            except TorporError as exc:
                return endpoints, str(exc)
        return endpoints, None

    async def _until_drain_ends(
            self, waiting: Awaitable[tuple[tuple[Endpoint, ...], str | None]]
    ) -> tuple[tuple[Endpoint, ...], str | None]:
        """`waiting`'s result, unless the drain grace ends first (raises _DrainEnded; the
        wake goes on for nobody, the process is stopping)."""
        task = asyncio.ensure_future(waiting)
        ended = asyncio.ensure_future(self._drain_ended.wait())
        try:
            await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise _DrainEnded
        return task.result()

    def _waited(self, arrived: float) -> float:
        return round(self._clock.monotonic() - arrived, 3)

    @staticmethod
    def _report(outcome: Outcome, waited: float) -> None:
        """Count and log how a held request left (the client gone is counted by hold)."""
        name = outcome.service
        match outcome:
            case Ready():
                event(log, "activator.released", service=name, waited=waited)
            case QueueFull():
                event(log, "activator.queue_full", service=name, level=logging.WARNING)
            case DeadlinePassed(phase=phase):
                abandoned(name, "deadline")
                event(log, "activator.deadline", service=name, phase=phase, waited=waited,
                      level=logging.WARNING)
            case WakeFailed(outcome=result, message=message):
                abandoned(name, "deadline" if result == "timeout" else "failed")
                event(log, "activator.wake_failed", service=name, outcome=result,
                      error=message, level=logging.WARNING)
            case UnknownService():
                event(log, "activator.unknown_service", service=name, level=logging.WARNING)
            case Draining(when="refused"):
                event(log, "activator.refused_draining", service=name)
            case Draining():
                abandoned(name, "drained")
                event(log, "activator.drain_ended", service=name, waited=waited,
                      level=logging.WARNING)
            case FlipUnconfirmed(error=error):
                abandoned(name, "failed")
                event(log, "activator.flip_failed", service=name, error=error,
                      level=logging.WARNING)
