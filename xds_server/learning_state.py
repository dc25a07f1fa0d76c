"""The learning policy's state, live: one `LearnedState` per service, fed from the calling
statistics at every policy pass, planned, and kept in the store.

Owns: turning what the collector saw since the previous pass into one observation per
service (`first`, `last` call), the plan of each service (re-planned when its own gaps or
the prior changed), the prior (every service's gaps pooled), and the stored form (store
documents of kind "learned", one per service: loaded before the first pass of a leader,
saved for the names that changed, periodically and at stop). Must not decide (the
policy does: policies/learning.py) nor act (the policy loop does).

Resolution. The collector keeps a service's last call and counts per 5-second bucket of
the last minute; a pass sees the calls since the previous pass. The earliest of them (the
end of the gap) is estimated as the previous pass's time, clamped into the first 5-second
bucket with calls after the previous last call and between the previous and the new last
call. A gap is therefore measured to within `policy.check_every` or 5 s, whichever is
finer, plus the ~1 s Envoy takes to send its access log; `min_keep` (the shortest
keep-alive) is `check_every`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from policies.learning import LearnedState, LearningSettings, Plan, plan, pooled
from torpor.call_stats import CallStats, Window
from torpor.logs import event
from torpor.store.base import Store

log = logging.getLogger("torpor.learning")

#: The kind of the store documents that hold learned states.
DOCUMENT_KIND = "learned"


def first_call_since(previous_last: float | None, stats: CallStats,
                     previous_pass: float | None) -> float:
    """The estimated earliest call among those after `previous_last` (the last call the
    previous pass saw), given the statistics now and when the previous pass ran (None:
    this service had no previous pass, e.g. right after a load). See the module docstring."""
    last = stats.last_call
    assert last is not None
    if previous_last is None or last <= previous_last:
        return last
    lower, upper = previous_last, last
    size = Window.MINUTE.bucket
    after = math.floor(previous_last) // size
    newer = [b for b, n in stats.buckets[Window.MINUTE.key].items() if n > 0 and b > after]
    if newer:
        first_bucket = min(newer)
        lower = max(lower, float(first_bucket * size))
        upper = min(upper, float((first_bucket + 1) * size))
    estimate = previous_pass if previous_pass is not None else (lower if newer else upper)
    return min(max(estimate, lower), upper)


class LearnedStates:
    """Every service's learned state and plan, for one policy loop (the leader's)."""

    def __init__(self, store: Store | None, prior_every: float = 60.0) -> None:
        """`store`: where states are kept (None: in memory only). `prior_every`: the
        prior (all gaps pooled) is refreshed at most this often when gaps were learned."""
        self._store = store
        self._prior_every = prior_every
        self._states: dict[str, LearnedState] = {}
        self._observed_at: dict[str, float] = {}  # pass time of the last observation
        self._unsaved: set[str] = set()
        self._plans: dict[str, tuple[LearningSettings, float, Plan]] = {}
        self._prior = LearnedState()
        self._prior_stale = True
        self._prior_at: float | None = None
        self.loaded = store is None

    # --- the store ----------------------------------------------------------------------

    async def load(self) -> int:
        """Replace what is held by the stored states; returns how many were read. A
        document this version cannot read is skipped with a log line."""
        states: dict[str, LearnedState] = {}
        if self._store is not None:
            for name, doc in (await self._store.load_documents(DOCUMENT_KIND)).items():
                try:
                    states[name] = LearnedState.from_dict(doc)
                except (ValueError, KeyError, TypeError) as exc:
                    event(log, "learning.state_unreadable", service=name, error=str(exc),
                          level=logging.WARNING)
        self._states = states
        self._observed_at.clear()
        self._unsaved.clear()
        self._plans.clear()
        self._prior_stale, self._prior_at = True, None
        self.loaded = True
        event(log, "learning.loaded", services=len(states))
        return len(states)

    def unload(self) -> None:
        """Forget everything (leadership lost: the next leader writes; a later leadership
        of this process loads again)."""
        self._states.clear()
        self._observed_at.clear()
        self._unsaved.clear()
        self._plans.clear()
        self._prior_stale, self._prior_at = True, None
        self.loaded = self._store is None

    async def save(self) -> int:
        """Write the states that changed since the last save; returns how many."""
        if self._store is None or not self._unsaved:
            return 0
        names = sorted(self._unsaved)
        docs = {name: self._states[name].to_dict() for name in names if name in self._states}
        self._unsaved.clear()
        try:
            await self._store.save_documents(DOCUMENT_KIND, docs)
        except BaseException:
            self._unsaved.update(names)  # kept for the next save
            raise
        return len(docs)

    # --- a pass ----------------------------------------------------------------------------

    def observe(self, name: str, stats: CallStats, now: float) -> bool:
        """Take in the calls of `name` since the previous pass; True when a gap was
        learned (its plan changes)."""
        state = self._states.setdefault(name, LearnedState())
        previous_pass = self._observed_at.get(name)
        self._observed_at[name] = now
        last = stats.last_call
        if last is None or (state.last_call is not None and last <= state.last_call):
            return False
        before = state.last_call
        first = first_call_since(before, stats, previous_pass)
        learned = state.observe(first, last)
        self._unsaved.add(name)
        if learned:
            self._plans.pop(name, None)
            self._prior_stale = True
            event(log, "learning.gap", service=name,
                  seconds=round(max(first - (before or first), 0.0), 3), level=logging.DEBUG)
        return learned

    def refresh_prior(self, now: float) -> None:
        """Pool every service's gaps again if some were learned and the last pooling is
        at least `prior_every` old (every plan is then made again)."""
        if not self._prior_stale:
            return
        if self._prior_at is not None and now - self._prior_at < self._prior_every:
            return
        self._prior = pooled(self._states.values())
        self._prior_stale, self._prior_at = False, now
        self._plans.clear()

    def plan_for(self, name: str, settings: LearningSettings, no_history_keep: float) -> Plan:
        """The plan of `name`; while no service has learned any gap, keep it
        `no_history_keep` (the policy's `idle_after`), within [min_keep, max_keep]."""
        state = self._states.get(name)
        if self._prior.gaps <= 0 and (state is None or state.gaps <= 0):
            return Plan(keep_alive=min(max(no_history_keep, settings.min_keep),
                                       settings.max_keep))
        cached = self._plans.get(name)
        if cached is not None and cached[0] == settings and cached[1] == no_history_keep:
            return cached[2]
        made = plan(state if state is not None else LearnedState(), self._prior, settings)
        self._plans[name] = (settings, no_history_keep, made)
        return made

    # --- reading ---------------------------------------------------------------------------

    def state(self, name: str) -> LearnedState | None:
        return self._states.get(name)

    def states(self) -> Mapping[str, LearnedState]:
        return self._states

    def unsaved(self) -> frozenset[str]:
        return frozenset(self._unsaved)
