"""Policies: pure functions from calling statistics and a time to what should happen to a
service. No I/O, no clock reads; callers pass the time."""

from policies.tiered import Activity, Decision, PolicySettings, decide, format_duration

__all__ = ["Activity", "Decision", "PolicySettings", "decide", "format_duration"]
