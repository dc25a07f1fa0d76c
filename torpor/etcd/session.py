"""One etcd lease per process, kept alive for the life of the process.

Owns the lease every key of this process hangs on (wake locks, the leader key, the
activator registration): granted once, refreshed every third of its TTL by a keep-alive
task, re-granted when etcd says it expired (listeners are told, so that keys on the old
lease are put again), and revoked on a clean stop so that nothing this process held
outlives it. A process killed with SIGKILL loses its keys when the TTL runs out.
Measured: aetcd's own lock grants a lease per attempt, never refreshes it and never
revokes it; this is the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc
from aetcd import rpc

from torpor.errors import StoreError
from torpor.etcd.connection import EtcdConnection, reraise_if_cancelling
from torpor.listeners import Listeners
from torpor.logs import event

log = logging.getLogger("torpor.etcd.session")


class EtcdSession:
    """The process's lease: `await session.lease_id()` for a live lease id."""

    def __init__(self, conn: EtcdConnection, ttl: float, member: str) -> None:
        self.conn = conn
        self.ttl = max(2, round(ttl))
        self.member = member
        self._lease = 0
        self._granted = asyncio.Lock()
        self._last_ok = 0.0  # monotonic time of the last grant or keep-alive answer
        self._task: asyncio.Task[None] | None = None
        self._renewed: Listeners[[int]] = Listeners("etcd.session_listener_failed")

    def on_new_lease(self, listener: Callable[[int], None]) -> Callable[[], None]:
        """Call `listener(lease_id)` after the lease was re-granted (the old one expired)."""
        return self._renewed.add(listener)

    @property
    def valid(self) -> bool:
        """Whether the lease is surely alive: etcd confirmed it less than a TTL ago. A
        leader that cannot say so must stop acting as one."""
        return self._lease != 0 and time.monotonic() - self._last_ok < self.ttl

    async def lease_id(self) -> int:
        """The live lease, granting one if there is none. Raises StoreError."""
        if self._lease:
            return self._lease
        async with self._granted:
            if not self._lease:
                await self._grant()
            if self._task is None:
                self._task = asyncio.create_task(self._keep_alive())
        return self._lease

    async def renew_if_unknown(self, exc: StoreError, lease: int) -> bool:
        """After a write on `lease` failed with `exc`: if etcd no longer knows the lease
        (it expired during an outage), grant a new one now and return True (retry the
        write) instead of failing until the keep-alive notices."""
        if "lease not found" not in str(exc):
            return False
        await self.replace_lease(lease)
        return True

    async def replace_lease(self, expired: int) -> None:
        """etcd refused `expired` (lease not found): grant a new one now, unless that
        happened already, and tell listeners (their keys went with the old lease)."""
        async with self._granted:
            if self._lease != expired:
                return
            event(log, "etcd.lease_expired", member=self.member, lease=expired,
                  level=logging.WARNING)
            self._lease = 0
            await self._grant()
        self._renewed.notify(self._lease)

    async def close(self) -> None:
        """Stop refreshing and revoke the lease: every key on it goes at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        lease, self._lease = self._lease, 0
        if lease:
            try:
                await self.conn.call("revoke lease", self.conn.lease.LeaseRevoke,
                                     rpc.LeaseRevokeRequest(ID=lease), timeout=2.0)
                event(log, "etcd.lease_revoked", member=self.member, lease=lease)
            except StoreError as exc:
                event(log, "etcd.lease_revoke_failed", member=self.member, lease=lease,
                      error=str(exc), level=logging.WARNING)

    async def _grant(self) -> None:
        response = await self.conn.call("grant lease", self.conn.lease.LeaseGrant,
                                        rpc.LeaseGrantRequest(TTL=self.ttl))
        if response.error:
            raise StoreError(f"etcd {self.conn.where}: grant lease: {response.error}")
        self._lease = int(response.ID)
        self._last_ok = time.monotonic()
        event(log, "etcd.lease_granted", member=self.member, lease=self._lease, ttl=self.ttl)

    async def _keep_alive(self) -> None:
        """Refresh every TTL/3; on a failure retry sooner; when etcd says the lease is gone
        (TTL 0 after an outage longer than the TTL), grant a new one and tell listeners."""
        while True:
            wait = self.ttl / 3
            try:
                if not await self._refresh():
                    await self.replace_lease(self._lease)
            except StoreError as exc:
                reraise_if_cancelling(exc)
                event(log, "etcd.keepalive_failed", member=self.member, error=str(exc),
                      level=logging.WARNING)
                wait = min(wait, 0.5)
            await asyncio.sleep(wait)

    async def _refresh(self) -> bool:
        """One keep-alive round trip; False when etcd no longer knows the lease."""
        lease = self._lease
        call = self.conn.lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
                                              timeout=self.conn.timeout)
        try:
            async for reply in call:
                if reply.TTL <= 0:
                    return False
                self._last_ok = time.monotonic()
                return True
        except grpc.aio.AioRpcError as exc:
            raise self.conn.error("keep lease alive", exc) from exc
        finally:
            call.cancel()
        return False
