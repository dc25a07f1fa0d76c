"""Trace readers for `torpor policy replay`: recorded calling traces → `policies.replay.Trace`.

Owns: the file formats (policies/ is pure and reads nothing) and their errors. Every
problem is a `TraceError` whose message is one line naming the file (and the line, for a
bad row), which the command line prints with exit code 2.

Formats (one PATH is one trace):

- `servegen` (Alibaba ServeGen): a folder of `chunk-<id>-trace.csv` files, or one such file.
  No header; columns `window_start_s, rate_req_per_s, ...`. One file is one service; a
  window with rate > 0 has calls. The window length is the step of `window_start_s` (10
  minutes in the published data) and must be the same in every file; files are aligned on
  `window_start_s`, and a service has no calls in windows its file does not cover.
- `azure-functions` (Azure Functions 2019, e.g. invitro's `1350_inv.csv`): a `*_inv.csv`
  file, or a folder holding exactly one. Header `HashFunction,HashOwner,HashApp,minute_1,
  ..., minute_N`; one row per function with its calls per minute (windows of 60 s). Rows
  with the same HashFunction (one function with several triggers) are one service.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from pathlib import Path

from policies.replay import Trace
from torpor.errors import TorporError

__all__ = ["FORMATS", "LoadedTrace", "TraceError", "read_azure_functions", "read_servegen",
           "read_trace"]


class TraceError(TorporError):
    """A trace cannot be read: the message is one line naming the file (and line)."""


@dataclasses.dataclass(frozen=True)
class LoadedTrace:  # not slots: windows_with_calls is a cached_property
    """A trace and where it came from."""

    trace: Trace
    path: str
    format: str

    @functools.cached_property
    def windows_with_calls(self) -> int:
        return sum(sum(1 for busy in series if busy) for series in self.trace.services.values())

    def summary(self) -> dict[str, object]:
        """The `"trace"` object of `policy replay --json`."""
        return {"name": self.trace.name, "path": self.path, "format": self.format,
                "services": len(self.trace.services), "windows": self.trace.windows,
                "window_seconds": self.trace.window,
                "windows_with_calls": self.windows_with_calls}


_CHUNK = re.compile(r"chunk-(?P<id>.+)-trace\.csv")


def _natural(path: Path) -> tuple[int, str]:
    """chunk-2 before chunk-10."""
    match = _CHUNK.fullmatch(path.name)
    ident = match["id"] if match else path.name
    return (int(ident), "") if ident.isdigit() else (1 << 62, ident)


def read_servegen(path: str | Path) -> Trace:
    """A ServeGen folder of `chunk-*-trace.csv` (or one such file) as a trace."""
    root = Path(path)
    if root.is_dir():
        files = sorted((p for p in root.glob("chunk-*-trace.csv") if p.is_file()), key=_natural)
        if not files:
            below = sorted({p.parent.name for p in root.glob("*/chunk-*-trace.csv")})
            hint = (f" (its subfolders {', '.join(below)} hold traces: pass each as a PATH)"
                    if below else "")
            raise TraceError(f"{root}: no chunk-*-trace.csv files in this folder{hint}")
    elif root.is_file():
        files = [root]
    else:
        raise TraceError(f"{root}: no such file or folder")

    parsed: dict[str, tuple[list[float], list[bool]]] = {}
    window: float | None = None
    window_from: Path | None = None
    for file in files:
        starts, busy, step = _read_servegen_file(file)
        if step is not None:
            if window is None:
                window, window_from = step, file
            elif step != window:
                raise TraceError(f"{file}: windows of {step:g} s, but {window_from} has "
                                 f"windows of {window:g} s: mixed window lengths")
        name = file.name.removesuffix(".csv").removesuffix("-trace")
        parsed[name] = (starts, busy)
    if window is None:
        raise TraceError(f"{root}: every file has a single row: cannot tell the window length")

    origin = min(starts[0] for starts, _ in parsed.values())
    offsets: dict[str, int] = {}
    for file, (name, (starts, _)) in zip(files, parsed.items(), strict=True):
        offset = (starts[0] - origin) / window
        if offset != math.floor(offset):
            raise TraceError(f"{file}: starts at {starts[0]:g} s, off the {window:g} s grid "
                             f"of the other files (which start at {origin:g} s)")
        offsets[name] = int(offset)
    length = max(offsets[name] + len(busy) for name, (_, busy) in parsed.items())
    services = {name: [False] * offsets[name] + busy + [False] * (length - offsets[name]
                                                                   - len(busy))
                for name, (_, busy) in parsed.items()}
    return Trace(name=root.name.removesuffix(".csv"), window=window, services=services)


def _read_servegen_file(file: Path) -> tuple[list[float], list[bool], float | None]:
    """(window starts, window has calls, the step between starts or None for one row)."""
    starts: list[float] = []
    busy: list[bool] = []
    step: float | None = None
    for number, line in enumerate(_lines(file), start=1):
        if not line.strip():
            continue
        fields = line.split(",", 2)
        if len(fields) < 2:
            raise TraceError(f"{file}:{number}: expected window_start_s,rate_req_per_s,"
                             f"... got {_show(line)}")
        start = _number(fields[0], file, number, "window_start_s")
        rate = _number(fields[1], file, number, "rate_req_per_s")
        if starts:
            gap = start - starts[-1]
            if step is None:
                if gap <= 0:
                    raise TraceError(f"{file}:{number}: window_start_s {start:g} does not "
                                     f"come after {starts[-1]:g}")
                step = gap
            elif gap != step:
                raise TraceError(f"{file}:{number}: window_start_s {start:g} is {gap:g} s "
                                 f"after the previous window, the others are {step:g} s "
                                 "apart: mixed window lengths")
        starts.append(start)
        busy.append(rate > 0)
    if not starts:
        raise TraceError(f"{file}: empty file")
    return starts, busy, step


def _number(text: str, file: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{file}:{line}: {column} {_show(text)} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise TraceError(f"{file}:{line}: {column} {_show(text)} is not a finite number ≥ 0")
    return value


_AZURE_KEYS = ("HashFunction", "HashOwner", "HashApp")
AZURE_WINDOW = 60.0


def read_azure_functions(path: str | Path) -> Trace:
    """An Azure Functions `*_inv.csv` (or a folder holding exactly one) as a trace."""
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.glob("*_inv.csv") if p.is_file())
        if len(files) != 1:
            found = (f"{len(files)} ({', '.join(p.name for p in files)}): pass one of them as "
                     "PATH" if files else "none")
            raise TraceError(f"{root}: expected one *_inv.csv file in this folder, found "
                             f"{found}")
        file = files[0]
    elif root.is_file():
        file = root
    else:
        raise TraceError(f"{root}: no such file or folder")

    services: dict[str, list[bool]] = {}
    lines = iter(_lines(file))
    header = next(lines, "").split(",")
    minutes = len(header) - len(_AZURE_KEYS)
    expected = [*_AZURE_KEYS, *(f"minute_{i}" for i in range(1, minutes + 1))]
    if minutes < 1 or header != expected:
        bad = next((i for i, (a, b) in enumerate(zip(header, expected, strict=False))
                    if a != b),
                   min(len(header), len(expected)))
        got = _show(header[bad]) if bad < len(header) else "nothing"
        want = expected[bad] if bad < len(expected) else "minute_1"
        raise TraceError(f"{file}:1: expected the header HashFunction,HashOwner,HashApp,"
                         f"minute_1,...: column {bad + 1} is {got}, not {want}")
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != len(header):
            raise TraceError(f"{file}:{number}: {len(fields)} columns, the header has "
                             f"{len(header)}")
        try:
            counts = list(map(int, fields[3:]))
        except ValueError:
            counts = []
        if len(counts) != minutes or min(counts) < 0:
            column = next(i for i, text in enumerate(fields[3:])
                          if not text.strip().isdigit())
            raise TraceError(f"{file}:{number}: {header[column + 3]} "
                             f"{_show(fields[column + 3])} is not a count of calls")
        series = [count > 0 for count in counts]
        known = services.get(fields[0])
        services[fields[0]] = (series if known is None
                               else [a or b for a, b in zip(known, series, strict=True)])
    if not services:
        raise TraceError(f"{file}: no functions (only a header)")
    name = root.name.removesuffix(".csv")
    return Trace(name=name, window=AZURE_WINDOW, services=services)


def _is_count(text: str) -> bool:
    try:
        return int(text) >= 0
    except ValueError:
        return False


def _lines(file: Path) -> list[str]:
    """A text file's lines; unreadable or not UTF-8 is a TraceError."""
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TraceError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{file}: not a text file (byte {exc.start}: {exc.reason})") from None


def _show(text: str, limit: int = 40) -> str:
    """A field or line for an error message: quoted, and cut when long."""
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


#: --format → reader.
FORMATS: dict[str, Callable[[str | Path], Trace]] = {
    "servegen": read_servegen,
    "azure-functions": read_azure_functions,
}


def read_trace(path: str | Path, format: str) -> LoadedTrace:
    """The trace at `path` in `format` (a key of FORMATS)."""
    try:
        reader = FORMATS[format]
    except KeyError:
        raise TraceError(f"unknown trace format {format!r}; known: "
                         f"{', '.join(FORMATS)}") from None
    return LoadedTrace(trace=reader(path), path=str(path), format=format)
