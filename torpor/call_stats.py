"""Calling statistics of one service: when it was created and last called, how many calls
fell in the last minute / hour / day / long window, and how calls spread over the week.

Owns: the counters and their serialised form (what the collector flushes to the store and
reloads after a restart). Must not do I/O or read the clock: every method takes the time
it is about, so policies and tests drive it with any time they like.

Windows are sums of fixed-size buckets keyed by absolute bucket number (`floor(t / size)`),
so a window of W seconds covers between W - size and W seconds of the past: with
`first = floor((now - W) / size) + 1` and `last = floor(now / size)`, a call at `t` counts
iff `first <= floor(t / size) <= last`. A call exactly W seconds before `now` is never
counted, a call in the current bucket always is (even a little after `now`). Old buckets
(older than the window before the newest call) are dropped as calls are recorded, whatever
order they arrive in; the per-service size stays bounded (≤ 12 + 60 + 24 + 30 buckets plus
the 168 hours of the week).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

#: Bumped when the serialised form changes; from_dict refuses what it cannot read.
FORMAT_VERSION = 1

HOURS_PER_WEEK = 7 * 24
#: 1970-01-01 was a Thursday; hour-of-week 0 is Monday 00:00 UTC.
_EPOCH_WEEKDAY = 3


class Window(enum.Enum):
    """A time window (seconds) and the bucket size (seconds) that counts it."""

    MINUTE = (60, 5)
    HOUR = (3600, 60)
    DAY = (86400, 3600)
    LONG = (30 * 86400, 86400)  # "the long window": 30 days

    @property
    def seconds(self) -> int:
        return self.value[0]

    @property
    def bucket(self) -> int:
        return self.value[1]

    @property
    def key(self) -> str:
        return self.name.lower()


def _check_time(at: float) -> None:
    # A NaN last_call would stick forever (every comparison with it is False).
    if not math.isfinite(at):
        raise ValueError(f"call time {at!r} is not a finite number of seconds")


def _bucket_of(at: float, size: int) -> int:
    """floor(at / size), exactly: `at / size` in floating point can round up across a
    bucket boundary (a call a hair before the hour counted in the next hour)."""
    return math.floor(at) // size


def hour_of_week(at: float) -> int:
    """0 for Monday 00:00-01:00 UTC … 167 for Sunday 23:00-24:00 UTC."""
    hours = _bucket_of(at, 3600)
    day = (hours // 24 + _EPOCH_WEEKDAY) % 7
    return day * 24 + hours % 24


@dataclasses.dataclass
class CallStats:
    """Counters of one service's calls. Mutable: the collector updates it in place."""

    created_at: float
    last_call: float | None = None
    total: int = 0
    #: window key → {bucket number → calls}
    buckets: dict[str, dict[int, int]] = dataclasses.field(
        default_factory=lambda: {w.key: {} for w in Window}
    )
    #: calls per hour of the week since the statistics began (index: hour_of_week()).
    by_hour_of_week: list[int] = dataclasses.field(default_factory=lambda: [0] * HOURS_PER_WEEK)

    def record(self, at: float, count: int = 1) -> None:
        """`count` calls happened at `at` (an access-log entry, or a held request)."""
        _check_time(at)
        if count <= 0:
            return
        self.total += count
        self.by_hour_of_week[hour_of_week(at)] += count
        self.touch(at)
        newest = at if self.last_call is None else self.last_call
        for window in Window:
            counts = self.buckets[window.key]
            number = _bucket_of(at, window.bucket)
            counts[number] = counts.get(number, 0) + count
            # Prune against the newest call, not `at`: a late (out-of-order) entry must not
            # stop old buckets from being dropped.
            self._prune(window, newest)

    def touch(self, at: float) -> None:
        """The service was asked for at `at` without a countable call yet (a request the
        activator holds: its access-log entry only comes when it is answered)."""
        _check_time(at)
        if self.last_call is None or at > self.last_call:
            self.last_call = at

    def calls_in(self, window: Window, now: float) -> int:
        """Calls in the last `window` before `now` (bucket granularity)."""
        first = _bucket_of(now - window.seconds, window.bucket) + 1
        last = _bucket_of(now, window.bucket)
        return sum(n for b, n in self.buckets[window.key].items() if first <= b <= last)

    def windows(self, now: float) -> dict[str, int]:
        """Every window's count, keyed minute/hour/day/long (for status and metrics)."""
        return {w.key: self.calls_in(w, now) for w in Window}

    def _prune(self, window: Window, now: float) -> None:
        counts = self.buckets[window.key]
        # After pruning at most `limit` buckets remain (those of the window before `now`),
        # so pruning only once there are more keeps the size ≤ limit.
        limit = window.seconds // window.bucket
        if len(counts) > limit:
            first = _bucket_of(now - window.seconds, window.bucket) + 1
            for number in [b for b in counts if b < first]:
                del counts[number]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "created_at": self.created_at,
            "last_call": self.last_call,
            "total": self.total,
            "buckets": {k: {str(b): n for b, n in v.items()} for k, v in self.buckets.items()},
            "by_hour_of_week": list(self.by_hour_of_week),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallStats:
        """Raises ValueError for a form this version cannot read."""
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"call statistics format {data.get('format')!r} is not "
                             f"{FORMAT_VERSION}")
        hours = [int(n) for n in data.get("by_hour_of_week", [])]
        if len(hours) != HOURS_PER_WEEK:
            raise ValueError(f"by_hour_of_week has {len(hours)} entries, not {HOURS_PER_WEEK}")
        stored = data.get("buckets", {})
        return cls(
            created_at=float(data["created_at"]),
            last_call=None if data.get("last_call") is None else float(data["last_call"]),
            total=int(data.get("total", 0)),
            buckets={w.key: {int(b): int(n) for b, n in stored.get(w.key, {}).items()}
                     for w in Window},
            by_hour_of_week=hours,
        )
