"""How torpor says numbers to people: one rounding of durations for the CLI, the waking page
and the answers held requests get ("2 min 5 s", not "after 119.99975936099997s")."""

from __future__ import annotations


def for_people(seconds: float) -> str:
    """A duration rounded for people: "less than a second", "7 s", "2 min 5 s", "1 h 3 min"."""
    if seconds < 1:
        return "less than a second"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"
