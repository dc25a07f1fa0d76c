"""The tiered idle policy: a service's calling statistics and the time → how active it is
(ACTIVE, LOW or DORMANT), with a short human reason.

Owns: the rule that maps "how long since anything happened to this service" onto the three
activity tiers, and the wording of the reason that logs and the service history show.

Must not: do I/O, read the clock, or change the statistics. The caller passes `now` (and the
time of the last wake, if it knows one) and acts on the Decision; this module never scales,
routes or stores anything, so it can be tested with any times at all.

The rule, in order:

1. `never_sleep` → ACTIVE.
2. Younger than `creation_grace` (`now - created_at < creation_grace`) → ACTIVE: a new
   service gets time to receive its first calls.
3. `idle = now - max(last_call, woken_at, created_at)` over the times that are known (a wake
   counts as activity, so a service that was just woken is not put back to sleep before
   its first call arrives). If `now` is before that time (clock skew between machines),
   idle is 0.
   `idle < idle_after` → ACTIVE; otherwise `idle >= evict_after` → DORMANT; otherwise LOW.
   So if `evict_after <= idle_after` there is no LOW tier: the service goes from ACTIVE
   straight to DORMANT once idle reaches `idle_after` (= the larger of the two).

Only `created_at` and `last_call` of the statistics are read: call counts do not change the
tier (they are for predictions and for people).
"""

from __future__ import annotations

import dataclasses
import enum
import math

from torpor.call_stats import CallStats

__all__ = ["Activity", "Decision", "PolicySettings", "decide", "format_duration"]


class Activity(enum.Enum):
    """How active a service is, from most to least. Ordered: `Activity.ACTIVE >
    Activity.LOW > Activity.DORMANT` (compare with the operators or with `rank`)."""

    #: Keep it running.
    ACTIVE = "active"
    #: Hibernate: scale to zero, keep its route (pointed at the activator).
    LOW = "low"
    #: Hibernate and drop its route from Envoy (the catch-all still finds it).
    DORMANT = "dormant"

    @property
    def rank(self) -> int:
        """Larger is more active: ACTIVE 2, LOW 1, DORMANT 0."""
        return _RANK[self]

    @property
    def hibernates(self) -> bool:
        """The service should be scaled to zero."""
        return self is not Activity.ACTIVE

    @property
    def keeps_route(self) -> bool:
        """The service keeps its virtual host and cluster in Envoy."""
        return self is not Activity.DORMANT

    def more_active_than(self, other: Activity) -> bool:
        return self.rank > other.rank

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Activity):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Activity):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Activity):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Activity):
            return NotImplemented
        return self.rank >= other.rank


_RANK: dict[Activity, int] = {Activity.ACTIVE: 2, Activity.LOW: 1, Activity.DORMANT: 0}


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """Thresholds in seconds. `idle_after`/`evict_after` may be `math.inf` (never);
    all must be ≥ 0 and not NaN (ValueError otherwise)."""

    idle_after: float
    evict_after: float
    creation_grace: float
    never_sleep: bool = False

    def __post_init__(self) -> None:
        for name in ("idle_after", "evict_after", "creation_grace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number of seconds, not {value!r}")
            if math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be ≥ 0 seconds, not {value!r}")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the policy says about one service, and why (for logs and service history).

    `keep_alive`: the idle time (seconds) the service is kept loaded after a call, when the
    policy has one (the fixed policy: idle_after). `next_call`: when the policy expects the
    next call, if it predicts one. `prewake`: the service should be loaded now ahead of a
    predicted call (it matters only for a service that sleeps).
    """

    activity: Activity
    reason: str
    keep_alive: float | None = None
    next_call: float | None = None
    prewake: bool = False


def decide(
    stats: CallStats, settings: PolicySettings, now: float, woken_at: float | None = None
) -> Decision:
    """The activity tier of a service with statistics `stats` at time `now`; `woken_at` is
    when it was last woken, if known. See the module docstring for the rule."""
    if settings.never_sleep:
        return Decision(Activity.ACTIVE, "never_sleep")

    age = now - stats.created_at
    if age < settings.creation_grace:
        return Decision(
            Activity.ACTIVE,
            f"created {format_duration(max(age, 0.0))} ago "
            f"(creation_grace {format_duration(settings.creation_grace)})",
        )

    # The latest sign of life, and what it was (ties go to the more telling word).
    since, what = stats.created_at, "created"
    if woken_at is not None and woken_at >= since:
        since, what = woken_at, "woken"
    if stats.last_call is not None and stats.last_call >= since:
        since, what = stats.last_call, "called"
    idle = max(now - since, 0.0)

    if idle < settings.idle_after:
        never = ", never called" if stats.last_call is None and what == "created" else ""
        return Decision(
            Activity.ACTIVE,
            f"{what} {format_duration(idle)} ago{never} "
            f"(idle_after {format_duration(settings.idle_after)})",
        )
    if idle >= settings.evict_after:
        return Decision(
            Activity.DORMANT,
            f"idle for {format_duration(idle)} "
            f"(evict_after {format_duration(settings.evict_after)})",
        )
    return Decision(
        Activity.LOW,
        f"idle for {format_duration(idle)} (idle_after {format_duration(settings.idle_after)})",
    )


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_duration(seconds: float) -> str:
    """A readable duration: "0s", "45s", "12m", "12m30s", "2h5m", "3d", "1d2h".

    At most the two largest non-zero units, rounded down (so a time just under a threshold
    never reads as the threshold itself). Infinity is "never"; negatives get a "-".
    """
    if math.isnan(seconds):
        return "?"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if math.isinf(seconds):
        return "never"
    rest = math.floor(seconds)
    parts: list[str] = []
    for unit, size in _UNITS:
        amount, rest = divmod(rest, size)
        if amount or parts:
            parts.append(f"{amount}{unit}" if amount else "")
        if len(parts) == 2:
            break
    text = "".join(parts)
    return text or "0s"
