"""What keeps a service awake beyond its own verdict: a recent wake (`min_awake`) and a
group whose other members are active. Pure, like the rest of policies/: the caller passes
the verdicts, the times and the group membership.

- `min_awake`: a service woken at `woken_at` is ACTIVE until `woken_at + min_awake`,
  whatever its own verdict (a wake costs a cold start; sleeping again at once wastes it).
- Groups: services that work together (a pipeline) sleep together. While any member's
  own verdict is ACTIVE, every member is ACTIVE; once none is, each member keeps its own
  verdict (LOW or DORMANT), so all of them are hibernated in the same pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from policies.tiered import Activity, Decision, format_duration

__all__ = ["group_decisions", "keep_awake"]


def keep_awake(decision: Decision, woken_at: float | None, min_awake: float,
               now: float) -> Decision:
    """`decision`, unless the service was woken less than `min_awake` ago: then ACTIVE."""
    if decision.activity is Activity.ACTIVE or woken_at is None or min_awake <= 0:
        return decision
    since = max(now - woken_at, 0.0)
    if since >= min_awake:
        return decision
    return dataclasses.replace(decision, activity=Activity.ACTIVE,
                               reason=f"woken {format_duration(since)} ago "
                                      f"(min_awake {format_duration(min_awake)})")


def group_decisions(own: Mapping[str, Decision],
                    groups: Mapping[str, str]) -> dict[str, Decision]:
    """Every service's decision once groups are applied. `own`: each service's own
    decision; `groups`: service → its group (services without one left out). A member
    of a group with an ACTIVE member is ACTIVE ("group G: M is active"); otherwise it
    keeps its own decision. A group member missing from `own` does not count."""
    active: dict[str, str] = {}
    for name in sorted(own):
        group = groups.get(name)
        if group is not None and own[name].activity is Activity.ACTIVE:
            active.setdefault(group, name)
    decided: dict[str, Decision] = {}
    for name, decision in own.items():
        group = groups.get(name)
        keeper = active.get(group) if group is not None else None
        if keeper is None or decision.activity is Activity.ACTIVE:
            decided[name] = decision
        else:
            decided[name] = dataclasses.replace(
                decision, activity=Activity.ACTIVE,
                reason=f"group {group}: {keeper} is active ({own[keeper].reason})")
    return decided
