"""What keeps a service awake beyond its own verdict: min_awake after a wake, and a group
with an active member (policies/awake.py)."""

from __future__ import annotations

import pytest

from policies import Activity, Decision
from policies.awake import group_decisions, keep_awake

A, L, D = Activity.ACTIVE, Activity.LOW, Activity.DORMANT


def verdict(activity: Activity, reason: str = "own") -> Decision:
    return Decision(activity, reason, keep_alive=60.0, next_call=5.0, prewake=True)


@pytest.mark.parametrize(("own", "woken_at", "min_awake", "now", "expected"), [
    (L, 100.0, 60.0, 130.0, A),   # woken 30 s ago, min_awake 60 s: stays
    (D, 100.0, 60.0, 130.0, A),
    (L, 100.0, 60.0, 160.0, L),   # min_awake over
    (L, 100.0, 60.0, 200.0, L),
    (L, None, 60.0, 130.0, L),    # never woken
    (L, 100.0, 0.0, 100.0, L),    # no min_awake
    (A, 100.0, 60.0, 130.0, A),
    (L, 200.0, 60.0, 130.0, A),   # clock skew: woken "in the future" counts as just now
])
def test_keep_awake(own: Activity, woken_at: float | None, min_awake: float, now: float,
                    expected: Activity) -> None:
    decided = keep_awake(verdict(own), woken_at, min_awake, now)
    assert decided.activity is expected
    if expected is not own:
        assert decided.reason.startswith("woken ") and "(min_awake 1m)" in decided.reason
        assert (decided.next_call, decided.prewake) == (5.0, True)  # the prediction stays
    else:
        assert decided.reason == "own"


GROUPS = {"a": "p", "b": "p", "c": "p", "x": "q", "y": "q"}


@pytest.mark.parametrize(("own", "expected"), [
    # Any active member keeps the whole group active.
    ({"a": L, "b": L, "c": A}, {"a": A, "b": A, "c": A}),
    ({"a": D, "b": L, "c": A}, {"a": A, "b": A, "c": A}),
    # All idle by their own policy: each keeps its own verdict, so all hibernate together.
    ({"a": L, "b": L, "c": L}, {"a": L, "b": L, "c": L}),
    ({"a": L, "b": D, "c": L}, {"a": L, "b": D, "c": L}),
    # Groups are independent, and services without a group keep their own verdict.
    ({"a": L, "b": L, "c": L, "x": A, "y": L, "z": L},
     {"a": L, "b": L, "c": L, "x": A, "y": A, "z": L}),
    # A member missing (not in the table) does not count.
    ({"a": L, "b": L}, {"a": L, "b": L}),
])
def test_group_decisions(own: dict[str, Activity], expected: dict[str, Activity]) -> None:
    decided = group_decisions({n: verdict(a, f"{n} own") for n, a in own.items()}, GROUPS)
    assert {n: d.activity for n, d in decided.items()} == expected
    for name, decision in decided.items():
        if decision.activity is not own[name]:
            assert decision.reason.startswith(f"group {GROUPS[name]}: ")
            assert "is active" in decision.reason
        else:
            assert decision.reason == f"{name} own"


def test_the_group_reason_names_the_active_member() -> None:
    decided = group_decisions({"a": verdict(L), "b": verdict(A, "called 5s ago")},
                              {"a": "p", "b": "p"})
    assert decided["a"].reason == "group p: b is active (called 5s ago)"
