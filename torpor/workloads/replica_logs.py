"""Local replicas' log files, size-capped: a replica that logs without end, or a service that
crash-loops (a new file per replica, each on a new port), must not fill the disk.

Owns: where a replica logs (`<log dir>/<service>-<port>.log`, appended to by the replica
itself, so torpor is not on its output's path), capping a file that grew past
`MAX_BYTES` (copied to `<file>.1`, replacing the previous one, then truncated in place:
the replica keeps its descriptor, opened with O_APPEND, and goes on writing at the new end;
what it writes between the copy and the truncation is lost), and pruning the files of a
service's dead replicas down to the newest `KEPT`. At most (KEPT + live replicas) * 2 *
MAX_BYTES per service.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path

#: A replica's log file is capped at this size (and one previous part of the same size).
MAX_BYTES = 10 * 1024 * 1024
#: Log files of a service's replicas that are gone, newest first, kept for people to read.
KEPT = 5


def log_path(log_dir: Path, service: str, port: int) -> Path:
    return log_dir / f"{service}-{port}.log"


def cap(path: Path, max_bytes: int | None = None) -> bool:
    """Copy-truncate `path` when it is larger than `max_bytes` (default MAX_BYTES); True
    when it did."""
    limit = MAX_BYTES if max_bytes is None else max_bytes
    try:
        if path.stat().st_size <= limit:
            return False
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        os.truncate(path, 0)
    except OSError:
        return False
    return True


def prune(log_dir: Path, service: str, live: Collection[Path],
          kept: int | None = None) -> list[Path]:
    """Remove the log files (and their `.1` parts) of `service`'s replicas that are not in
    `live`, but the newest `kept`; returns what was removed."""
    pattern = re.compile(rf"{re.escape(service)}-\d+\.log")
    try:
        found = [p for p in log_dir.iterdir() if pattern.fullmatch(p.name) and p not in live]
    except OSError:
        return []
    found.sort(key=_mtime, reverse=True)
    removed = []
    for path in found[KEPT if kept is None else kept:]:
        for part in (path, path.with_name(path.name + ".1")):
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
                removed.append(part)
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
