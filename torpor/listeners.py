"""A list of callbacks that backends notify of changes (store writes, ready endpoints).

Owns: registering, removing and calling listeners so that one failing listener is logged
and never hides a change from the others. Every backend (sqlite and etcd stores, local and
Kubernetes workloads) uses this one instead of its own copy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Generic, ParamSpec

from torpor.logs import event

P = ParamSpec("P")

log = logging.getLogger("torpor.listeners")


class Listeners(Generic[P]):
    """Callbacks of one signature; `failure_event` names the log line of a failing one."""

    def __init__(self, failure_event: str) -> None:
        self._callbacks: list[Callable[P, None]] = []
        self._failure_event = failure_event

    def add(self, callback: Callable[P, None]) -> Callable[[], None]:
        """Register `callback`; returns the function that removes it (safe to call twice)."""
        self._callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove

    def notify(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Call every listener; a raising one is logged and the others still run."""
        for callback in list(self._callbacks):
            try:
                callback(*args, **kwargs)
            except Exception as exc:
                event(log, self._failure_event, level=logging.ERROR, error=repr(exc),
                      change=[str(a)[:200] for a in args])
