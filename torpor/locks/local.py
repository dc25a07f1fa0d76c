"""Locks within one process: an asyncio.Lock per name, dropped when nobody holds or waits.

Enough for `torpor up`, where the activator and the control plane share one event loop;
the etcd lease lock replaces it when several processes may wake the same service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from torpor.locks.base import LockTimeoutError, ServiceLocks


class LocalLocks(ServiceLocks):
    def __init__(self) -> None:
        # name -> (lock, number of holders + waiters), so idle names don't accumulate.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str, timeout: float) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            try:
                await asyncio.wait_for(lock.acquire(), timeout)
            except TimeoutError:
                raise LockTimeoutError(f"lock {name!r} is held by another task for longer "
                                       f"than {timeout:g}s") from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[name]
            if users <= 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def held(self, name: str) -> bool:
        """Whether `name` is held now (tests, status)."""
        entry = self._locks.get(name)
        return entry is not None and entry[0].locked()
