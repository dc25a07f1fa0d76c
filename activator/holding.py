"""Held requests: a bounded count per service, and how a held request leaves the queue.

Owns: admission (at most `max_held_per_service` requests of one service wait at once; the
next gets QueueFullError, which the handler answers with 503 + Retry-After), the held
gauge, and counting requests that leave unanswered (deadline passed, client hung up).
Must not wake or proxy: it only bounds and counts the waiting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torpor import metrics
from torpor.errors import TorporError


class QueueFullError(TorporError):
    """The service already has as many held requests as allowed."""


class HeldRequests:
    """Counts of requests waiting for a wake, per service."""

    def __init__(self, max_per_service: int) -> None:
        if max_per_service < 1:
            raise ValueError("max_per_service must be at least 1")
        self.max_per_service = max_per_service
        self._held: dict[str, int] = {}

    def count(self, name: str) -> int:
        return self._held.get(name, 0)

    def total(self) -> int:
        return sum(self._held.values())

    @contextlib.contextmanager
    def slot(self, name: str) -> Iterator[None]:
        """Hold one request of `name` for the duration of the block; raises QueueFullError
        when the queue is full. The slot is given back however the block ends."""
        held = self._held.get(name, 0)
        if held >= self.max_per_service:
            metrics.QUEUE_OVERFLOWS.labels(service=name).inc()
            raise QueueFullError(
                f"service {name!r} already has {held} requests waiting for it to wake "
                f"(activator.max_held_per_service)")
        self._set(name, held + 1)
        metrics.HELD_REQUESTS_TOTAL.labels(service=name).inc()
        try:
            yield
        finally:
            self._set(name, self._held.get(name, 1) - 1)

    def _set(self, name: str, value: int) -> None:
        if value > 0:
            self._held[name] = value
        else:
            self._held.pop(name, None)
        metrics.HELD_REQUESTS.labels(service=name).set(value)


def abandoned(name: str, reason: str) -> None:
    """A held request left without an answer from its service: `reason` is "deadline"
    (wake_timeout passed) or "disconnected" (the client hung up while held)."""
    metrics.HELD_ABANDONED.labels(service=name, reason=reason).inc()
