"""Calls that outlive a client's timeout: `Prefer: respond-async` (RFC 7240).

Owns what the gateway and the activator must agree on: which requests ask to be answered
later (`wants_async`), and the path under every service's host where a call's status and
result are fetched (`STATUS_PATH`). Envoy routes both to the activator (xds_server); the
activator accepts, runs and keeps the calls (activator/async_calls.py). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Where a call's status and result live, under the host the call was made to:
#: GET STATUS_PATH + id answers 202 while the call runs, then the call's own answer.
STATUS_PATH = "/.torpor/async/"
#: The request header a client asks with, and the preference it names.
PREFER_HEADER = "prefer"
RESPOND_ASYNC = "respond-async"


def wants_async(headers: Mapping[str, str]) -> bool:
    """True when a `Prefer` header names `respond-async` (case-insensitive, among other
    preferences and their parameters: `Prefer: respond-async, wait=10`)."""
    for key, value in headers.items():
        if key.lower() != PREFER_HEADER:
            continue
        for preference in value.split(","):
            if preference.split(";", 1)[0].split("=", 1)[0].strip().lower() == RESPOND_ASYNC:
                return True
    return False


def call_id_of(path: str) -> str | None:
    """The call id in a status path (`/.torpor/async/ID`), or None for other paths."""
    if not path.startswith(STATUS_PATH):
        return None
    rest = path[len(STATUS_PATH):]
    return rest if rest and "/" not in rest else None
