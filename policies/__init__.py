"""Policies: pure functions from calling statistics and a time to what should happen to a
service. No I/O, no clock reads; callers pass the time.

`tiered` is the fixed timer (`policy: {kind: fixed}`); `learning` learns each service's own
keep-alive and pre-wake from its history (the default)."""

from policies.learning import LearnedState, LearningSettings, Plan, plan, pooled
from policies.tiered import Activity, Decision, PolicySettings, decide, format_duration

__all__ = ["Activity", "Decision", "LearnedState", "LearningSettings", "Plan", "PolicySettings",
           "decide", "format_duration", "plan", "pooled"]
