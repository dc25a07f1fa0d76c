"""`torpor report`: the savings report as JSON for machines and as a table for people.

Owns reading the Report answer of the admin API (admin_pb2.ReportResponse) into the
`report --json` object, and the table: replica-time and waits as readable durations. Must
not compute anything the ledger counts (torpor/ledger.py) nor call the admin API
(torpor/admin_client.py does) nor print (the CLI does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The per-service keys of `report --json`, in order (the contract).
FIELDS = ("replica_seconds_saved", "replica_seconds_idle", "cold_starts",
          "cold_start_seconds", "prewakes", "prewakes_wasted")
_COUNTS = frozenset({"cold_starts", "prewakes", "prewakes_wasted"})


def savings_from_message(message: Any) -> dict[str, Any]:
    """admin_pb2.ServiceSavings → {"name", FIELDS...} (counts as ints, the rest floats)."""
    row: dict[str, Any] = {"name": str(message.name)}
    for field in FIELDS:
        value = getattr(message, field)
        row[field] = int(value) if field in _COUNTS else float(value)
    return row


def report_json(response: Any, since: float | None) -> dict[str, Any]:
    """The `torpor report --json` object: `services` (one object per service, sorted by
    name), `total` (their sum, name "total"), `since` (seconds, or null for everything the
    ledger holds) and `generated_at` (unix seconds)."""
    return {
        "services": [savings_from_message(m) for m in response.services],
        "total": savings_from_message(response.total),
        "since": since,
        "generated_at": float(response.generated_at),
    }


def format_duration(seconds: float) -> str:
    """Readable time: "0s", "2.5s", "45s", "12m30s", "3h05m", "2d04h" (two units at most)."""
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    for big, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                         ("m", 60, "s", 1)):
        if whole >= size:
            high, rest = divmod(whole, size)
            return f"{high}{big}{rest // small_size:02d}{small}"
    return f"{whole}s"  # pragma: no cover - whole >= 60 always matched above


def format_report_table(report: Mapping[str, Any]) -> str:
    """One row per service and a TOTAL row. Replica-time is replica-seconds as a duration
    (2 replicas asleep for 1h = 2h00m); WAIT is the cold starts' mean wait."""
    rows = [*report["services"], {**report["total"], "name": "TOTAL"}]
    if not report["services"]:
        return "no savings counted yet"
    headers = ("NAME", "SAVED", "IDLE", "COLD STARTS", "MEAN WAIT", "PRE-WAKES", "WASTED")
    lines = [headers, *(_row(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    window = report.get("since")
    text.append("")
    text.append("SAVED and IDLE are replica-time (replicas x time); "
                + ("since the ledger began" if window is None
                   else f"the last {format_duration(float(window))} (whole hours)"))
    return "\n".join(text)


def _row(row: Mapping[str, Any]) -> tuple[str, ...]:
    cold = int(row["cold_starts"])
    wait = float(row["cold_start_seconds"]) / cold if cold else None
    return (
        str(row["name"]),
        format_duration(float(row["replica_seconds_saved"])),
        format_duration(float(row["replica_seconds_idle"])),
        str(cold),
        "-" if wait is None else format_duration(wait),
        str(int(row["prewakes"])),
        str(int(row["prewakes_wasted"])),
    )
