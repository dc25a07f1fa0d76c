"""Leader election among control planes: who runs the reconciler.

Owns one campaign: the key `<prefix>leader/<name>` created on the process's lease says
who leads. A candidate that finds it taken watches it and tries again when it goes
(released on a clean stop, or expired with a killed leader's lease, so a new leader takes
over within the lease TTL). A leader is only a leader while its lease is surely alive
(`EtcdSession.valid`): one that lost etcd stops reconciling before its key can expire and
another take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from torpor import metrics
from torpor.errors import StoreError
from torpor.etcd.connection import reraise_if_cancelling
from torpor.etcd.session import EtcdSession
from torpor.etcd.watch import is_delete, watch
from torpor.logs import event

log = logging.getLogger("torpor.election")


class LeaderElection:
    """`election.is_leader` is true while this process holds the leader key."""

    def __init__(self, session: EtcdSession, name: str = "reconciler") -> None:
        self._session = session
        self._conn = session.conn
        self._name = name
        self._key = self._conn.key("leader", name)
        self._created = 0  # create revision of our leader key, 0 when not leading
        self._task: asyncio.Task[None] | None = None
        self.elected = asyncio.Event()
        self.since = 0.0

    @property
    def is_leader(self) -> bool:
        return self._created != 0 and self._session.valid

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._campaign())

    async def stop(self) -> None:
        """Resign: stop campaigning and delete our key so another takes over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._created:
            with contextlib.suppress(StoreError):
                await self._conn.delete_if_created_at(self._key, self._created)
            self._lost("resigned")

    async def _campaign(self) -> None:
        while True:
            try:
                await self._round()
            except StoreError as exc:
                reraise_if_cancelling(exc)
                if self._created:
                    self._lost(f"etcd error: {exc}")
                event(log, "leader.campaign_failed", election=self._name, error=str(exc),
                      level=logging.WARNING)
                await asyncio.sleep(0.5)

    async def _round(self) -> None:
        """Take the key, or wait until it goes; as leader, watch our key until it goes."""
        lease = await self._session.lease_id()
        try:
            created, response = await self._conn.create(
                self._key, self._session.member.encode(), lease)
        except StoreError as exc:
            if await self._session.renew_if_unknown(exc, lease):
                return  # campaign again at once, on the new lease
            raise
        if created:
            self._created = int(response.header.revision)
            self.since = time.monotonic()
            self.elected.set()
            metrics.LEADER.labels(election=self._name).set(1)
            event(log, "leader.elected", election=self._name, member=self._session.member)
        else:
            held = response.responses[0].response_range.kvs
            if held and held[0].value.decode() == self._session.member and \
                    held[0].lease == lease:
                self._created = int(held[0].create_revision)  # ours, from before a blip
                self.elected.set()
                metrics.LEADER.labels(election=self._name).set(1)
        await self._until_deleted(response.header.revision + 1)
        if self._created:
            self._lost("leader key deleted (lease expired or revoked)")

    async def _until_deleted(self, from_revision: int) -> None:
        async for _revision, events in watch(self._conn, self._key,
                                             start_revision=from_revision, deletes_only=True):
            if any(is_delete(e) for e in events):
                return

    def _lost(self, why: str) -> None:
        self._created = 0
        self.elected.clear()
        metrics.LEADER.labels(election=self._name).set(0)
        event(log, "leader.lost", election=self._name, member=self._session.member, why=why,
              level=logging.WARNING)
