"""Locks for a fleet: one key per lock under the prefix, on the process's lease.

Holding `wake/<service>` means the key `<prefix>locks/wake/<service>` exists and was
created by this process (on its session lease). Acquire is one transaction ("create if
absent"); a waiter watches the key for its deletion and tries again, so a hand-off costs
one watch event and one transaction. The key goes when the holder releases it, when its
process stops cleanly (lease revoked), or when a killed holder's lease expires: then
another replica takes over. Release deletes the key only if it is still the one this
holder created. Not fair: waiters race, as with etcd's own lock; one wake per service is
all that is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from torpor import metrics
from torpor.errors import StoreError
from torpor.etcd.connection import EtcdConnection, StoreUnavailableError, reraise_if_cancelling
from torpor.etcd.session import EtcdSession
from torpor.etcd.watch import is_delete, watch
from torpor.locks.base import LockTimeoutError, ServiceLocks
from torpor.logs import event

log = logging.getLogger("torpor.locks")

#: While etcd does not answer, how long an acquire keeps trying before it gives up with
#: the error (a wake then answers 503 at once instead of holding requests for nothing).
UNAVAILABLE_GRACE = 5.0


class EtcdLocks(ServiceLocks):
    def __init__(self, session: EtcdSession, unavailable_grace: float = UNAVAILABLE_GRACE
                 ) -> None:
        self._session = session
        self._conn: EtcdConnection = session.conn
        self._grace = unavailable_grace
        self._releasing: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def hold(self, name: str, timeout: float) -> AsyncIterator[None]:
        key = self._conn.key("locks", name)
        started = time.monotonic()
        created = await self._acquire(name, key, started + timeout, timeout)
        metrics.LOCK_ACQUIRE_SECONDS.observe(time.monotonic() - started)
        try:
            yield
        finally:
            await self._release(name, key, created)

    async def _acquire(self, name: str, key: bytes, deadline: float, timeout: float) -> int:
        """Create the key or wait for it to go; returns its create revision."""
        unavailable_since: float | None = None
        while True:
            attempt = time.monotonic()
            lease = 0
            try:
                lease = await self._session.lease_id()
                created, response = await self._conn.create(
                    key, self._session.member.encode(), lease)
                if created:
                    return int(response.header.revision)
                unavailable_since = None
                holder = response.responses[0].response_range.kvs
                await self._wait_gone(key, response.header.revision + 1, deadline, name,
                                      holder[0].value.decode() if holder else "?", timeout)
            except StoreUnavailableError:
                # Counted from the start of the first failed attempt: a frozen etcd costs
                # the grace, not the grace plus a call timeout.
                unavailable_since = unavailable_since or attempt
                now = time.monotonic()
                if now - unavailable_since >= self._grace or now >= deadline:
                    raise
                await asyncio.sleep(0.2)
            except StoreError as exc:
                if not lease or not await self._session.renew_if_unknown(exc, lease):
                    raise

    async def _wait_gone(self, key: bytes, from_revision: int, deadline: float, name: str,
                         holder: str, timeout: float) -> None:
        """Return once the key was deleted (released, or its holder's lease expired)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LockTimeoutError(f"lock {name!r} is held by {holder} for longer than "
                                   f"{timeout:g}s")
        try:
            async with asyncio.timeout(remaining):
                async for _revision, events in watch(self._conn, key,
                                                     start_revision=from_revision,
                                                     deletes_only=True):
                    if any(is_delete(e) for e in events):
                        return
        except TimeoutError:
            raise LockTimeoutError(f"lock {name!r} is held by {holder} for longer than "
                                   f"{timeout:g}s") from None

    async def _release(self, name: str, key: bytes, created: int) -> None:
        """Delete our key. If etcd cannot be reached, try again in the background until it
        can (our live lease would keep the key, and the lock, forever); meanwhile the lock
        is held longer, never by two holders."""
        try:
            await self._conn.delete_if_created_at(key, created)
        except StoreError as exc:
            event(log, "lock.release_failed", lock=name, error=str(exc), retrying=True,
                  level=logging.WARNING)
            task = asyncio.create_task(self._release_later(name, key, created))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _release_later(self, name: str, key: bytes, created: int) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self._conn.delete_if_created_at(key, created)
                event(log, "lock.released_late", lock=name)
                return
            except StoreError as exc:
                reraise_if_cancelling(exc)

    async def close(self) -> None:
        for task in list(self._releasing):
            task.cancel()
