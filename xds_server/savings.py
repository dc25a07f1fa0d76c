"""The savings ledger, live: the control plane's part that keeps torpor/ledger.py counting.

Owns when the ledger counts and where it is kept: only while this control plane leads (one
process: always) does its ledger count — every record write (store listener), a tick every
`policy.check_every`, saved as store documents of kind "ledger" every
`control_plane.stats_flush_every` and at stop; a control plane that starts leading loads
the stored documents first and continues where they end, one that stops leading drops its
ledger (and its metric series) without saving. Answers `torpor report` in any control
plane: the leader from its ledger, a follower from the stored documents brought up to now
with the records' history. Must not change any service nor decide what counts (the ledger
does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from torpor import metrics
from torpor.clock import Clock
from torpor.errors import StoreError
from torpor.ledger import DOCUMENT_KIND, Ledger, Savings
from torpor.logs import event
from torpor.model import ServiceRecord
from torpor.store.base import Store

log = logging.getLogger("torpor.savings")

#: A tick longer than this many check periods counts loaded-idle time only for its last
#: part (the control plane was down or not leading: replicas may not have run).
IDLE_WINDOW_TICKS = 3


class SavingsKeeper:
    """The leader's ledger: loaded, fed, ticked, saved; and the report of any process."""

    def __init__(self, store: Store, records: Callable[[], Mapping[str, ServiceRecord]],
                 last_call: Callable[[str], float | None], clock: Clock,
                 counts: Callable[[], bool], *, tick_every: float, save_every: float) -> None:
        """`counts()`: whether this process's ledger counts (it leads the fleet)."""
        self._store = store
        self._records = records
        self._last_call = last_call
        self._clock = clock
        self._counts = counts
        self._tick_every = tick_every
        self._save_every = save_every
        self._ledger: Ledger | None = None
        self._save_lock = asyncio.Lock()

    @property
    def counting(self) -> bool:
        return self._ledger is not None

    def on_record(self, record: ServiceRecord) -> None:
        """Store listener: a completed wake counts at once (metrics included)."""
        if self._ledger is not None:
            self._ledger.observe(record)

    async def tick(self) -> None:
        """Start or stop counting as leadership says; then count up to now."""
        if not self._counts():
            self._stop_counting()
            return
        if self._ledger is None:
            self._ledger = await self._load(export_metrics=True)
            event(log, "savings.counting", services=len(self._ledger.names()))
        self._ledger.tick(self._clock.now(), list(self._records().values()), self._last_call)

    async def save(self) -> None:
        """Save the accounts that changed; on a store error keep them for the next save."""
        async with self._save_lock:
            ledger = self._ledger
            if ledger is None:
                return
            docs = ledger.take_dirty()
            try:
                await self._store.save_documents(DOCUMENT_KIND, docs)
            except StoreError as exc:
                ledger.mark_dirty(docs)
                event(log, "savings.save_failed", error=str(exc), services=len(docs),
                      level=logging.WARNING)
                return
            event(log, "savings.saved", services=len(docs), level=logging.DEBUG)

    async def run(self) -> None:
        """Tick every `tick_every`, save every `save_every`, until cancelled."""
        saved_at = self._clock.monotonic()
        while True:
            try:
                await self.tick()
                if self._clock.monotonic() - saved_at >= self._save_every:
                    saved_at = self._clock.monotonic()
                    await self.save()
            except StoreError as exc:  # loading failed: try again at the next tick
                event(log, "savings.load_failed", error=str(exc), level=logging.WARNING)
            except Exception:  # a bug must not stop the counting for good
                log.exception("savings.tick_failed")
            await asyncio.sleep(self._tick_every)

    async def close(self) -> None:
        """Count up to now and save (the leader at stop)."""
        if self._ledger is not None and self._counts():
            try:
                self._ledger.tick(self._clock.now(), list(self._records().values()),
                                  self._last_call)
            except Exception:
                log.exception("savings.tick_failed")
            await self.save()

    async def report(self, since: float | None) -> list[tuple[str, Savings]]:
        """Per service, sorted by name: lifetime totals, or the buckets of the last `since`
        seconds. Raises StoreError when a follower cannot read the stored ledger."""
        now = self._clock.now()
        records = list(self._records().values())
        ledger = self._ledger
        if ledger is None or not self._counts():
            # Not counting here: what the leader saved, brought up to now; never saved
            # and no metrics (a follower exports none).
            ledger = await self._load(export_metrics=False)
        ledger.tick(now, records, self._last_call)
        return ledger.report(now, since)

    async def _load(self, export_metrics: bool) -> Ledger:
        docs = await self._store.load_documents(DOCUMENT_KIND)
        return Ledger.from_documents(docs, self._clock.now(),
                                     idle_window_limit=IDLE_WINDOW_TICKS * self._tick_every,
                                     export_metrics=export_metrics)

    def _stop_counting(self) -> None:
        ledger, self._ledger = self._ledger, None
        if ledger is None:
            return
        for name in ledger.names():
            metrics.forget_savings(name)
        event(log, "savings.stopped_counting", services=len(ledger.names()))
