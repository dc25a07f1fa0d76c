"""The registry of activator replicas: who can hold requests, at which addresses.

Owns two sides of `<prefix>activators/<member>`: an activator puts its addresses there on
its session lease (so a dead replica drops out when its lease expires, a stopped one at
once), and a control plane watches the range and hands every change to a callback, which
puts the set into Envoy's activator cluster. An activator also looks one replica up by
name (`http_address`: where a call another replica took is kept). Must not know about
Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aetcd import rpc

from torpor import metrics
from torpor.errors import StoreError
from torpor.etcd.connection import EtcdConnection, range_end, reraise_if_cancelling
from torpor.etcd.session import EtcdSession
from torpor.etcd.watch import WatchCompactedError, is_delete, watch
from torpor.logs import event
from torpor.model import Endpoint

log = logging.getLogger("torpor.activators")

#: (HTTP/1 address, HTTP/2 address) of one activator replica.
Activator = tuple[Endpoint, Endpoint]
ActivatorsListener = Callable[[dict[str, Activator]], None]


class ActivatorRegistry:
    def __init__(self, session: EtcdSession) -> None:
        self._session = session
        self._conn: EtcdConnection = session.conn
        self._prefix = self._conn.key("activators") + b"/"
        self._task: asyncio.Task[None] | None = None
        self._own: bytes | None = None
        self._remove_renew: Callable[[], None] | None = None

    # --- an activator registers itself ----------------------------------------------------

    async def register(self, http1: Endpoint, h2: Endpoint) -> None:
        """Put this replica's addresses on the lease, and again whenever the lease is
        re-granted (it expired: etcd deleted the key). Subscribes before the first put, so
        a re-grant during it is not missed; retries until etcd takes it (an activator that
        is not registered gets no traffic). Raises StoreError only if etcd refuses for
        longer than the lease TTL."""
        self._own = json.dumps({"host": http1.host, "port": http1.port,
                                "h2_host": h2.host, "h2_port": h2.port}).encode()
        if self._remove_renew is None:
            self._remove_renew = self._session.on_new_lease(lambda _: _spawn(self._put()))
        deadline = asyncio.get_running_loop().time() + self._session.ttl
        while True:
            try:
                await self._put_once()
                break
            except StoreError:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.2)
        event(log, "activator.registered", member=self._session.member, http=str(http1),
              h2=str(h2))

    async def _put_once(self) -> None:
        """Put our key on the current lease; a lease etcd no longer knows is re-granted."""
        if self._own is None:
            return
        lease = await self._session.lease_id()
        try:
            await self._conn.call("register activator", self._conn.kv.Put, rpc.PutRequest(
                key=self._prefix + self._session.member.encode(), value=self._own,
                lease=lease))
        except StoreError as exc:
            if "lease not found" in str(exc):
                await self._session.replace_lease(lease)
            raise

    async def _put(self) -> None:
        """Re-registration after a new lease, retried until it succeeds or we stop."""
        while self._own is not None:
            try:
                await self._put_once()
                return
            except StoreError as exc:
                reraise_if_cancelling(exc)
                event(log, "activator.register_failed", member=self._session.member,
                      error=str(exc), level=logging.WARNING)
                await asyncio.sleep(0.5)

    async def deregister(self) -> None:
        if self._remove_renew is not None:
            self._remove_renew()
            self._remove_renew = None
        if self._own is not None:
            with contextlib.suppress(StoreError):
                await self._conn.call("deregister activator", self._conn.kv.DeleteRange,
                                      rpc.DeleteRangeRequest(
                                          key=self._prefix + self._session.member.encode()))
            self._own = None

    # --- an activator finds another --------------------------------------------------------

    async def http_address(self, member: str) -> Endpoint | None:
        """The HTTP/1 address the replica `member` registered, or None when it is not
        registered (stopped, or its lease expired). One get of its key, within the store's
        call timeout; raises StoreError when etcd does not answer."""
        kv = await self._conn.get(self._prefix + member.encode())
        parsed = None if kv is None else self._parse(kv.key, kv.value)
        return None if parsed is None else parsed[1][0]

    # --- a control plane follows the set ------------------------------------------------

    async def follow(self, listener: ActivatorsListener) -> None:
        """List the registered activators, tell `listener`, then keep it current from a
        watch (resumed after an outage, listed again after a compaction)."""
        members = await self._list()
        listener(dict(members[0]))
        self._task = asyncio.create_task(self._follow(listener, *members))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.deregister()

    async def _list(self) -> tuple[dict[str, Activator], int]:
        response = await self._conn.call("list activators", self._conn.kv.Range,
                                         rpc.RangeRequest(key=self._prefix,
                                                          range_end=range_end(self._prefix)))
        found: dict[str, Activator] = {}
        for kv in response.kvs:
            parsed = self._parse(kv.key, kv.value)
            if parsed is not None:
                found[parsed[0]] = parsed[1]
        return found, int(response.header.revision)

    async def _follow(self, listener: ActivatorsListener, members: dict[str, Activator],
                      revision: int) -> None:
        while True:
            try:
                async for seen, events in watch(self._conn, self._prefix,
                                                range_end(self._prefix), revision + 1):
                    revision = seen
                    for e in events:
                        member = e.kv.key[len(self._prefix):].decode()
                        if is_delete(e):
                            members.pop(member, None)
                            continue
                        parsed = self._parse(e.kv.key, e.kv.value)
                        if parsed is not None:
                            members[member] = parsed[1]
                    listener(dict(members))
            except WatchCompactedError:
                members, revision = await self._relist(listener)
            except StoreError as exc:
                reraise_if_cancelling(exc)
                metrics.ETCD_WATCH_RESTARTS.labels(watch="activators").inc()
                event(log, "activators.watch_lost", error=str(exc), level=logging.WARNING)
                await asyncio.sleep(0.5)

    async def _relist(self, listener: ActivatorsListener) -> tuple[dict[str, Activator], int]:
        while True:
            try:
                members, revision = await self._list()
                listener(dict(members))
                return members, revision
            except StoreError as exc:
                reraise_if_cancelling(exc)
                await asyncio.sleep(0.5)

    def _parse(self, key: bytes, value: bytes) -> tuple[str, Activator] | None:
        member = key[len(self._prefix):].decode()
        try:
            data = json.loads(value)
            return member, (Endpoint(str(data["host"]), int(data["port"])),
                            Endpoint(str(data["h2_host"]), int(data["h2_port"])))
        except (ValueError, KeyError, TypeError) as exc:
            event(log, "activators.unreadable", member=member, error=repr(exc),
                  level=logging.WARNING)
            return None


_background: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    """Run a re-registration from a sync listener; keep a reference until it is done."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
