"""The waking page: what a person's browser gets at once from a sleeping service.

Owns (pure): whether a request comes from a browser navigating to a page (a GET that
accepts text/html, not a script's fetch, not an upgrade), and the page itself: the service's
name, how far its wake is (replicas ready of those wanted, when known), how long it has been
waking and how long a wake of it usually takes, all rounded for people; it reloads itself
every `refresh` seconds, so once the service is awake the next load is the service's own
answer, without a click. The page is a 503 with Retry-After and no-store, so that neither a
cache nor a crawler keeps it for the service's content.

Must not wake or decide anything about the service (handler.py does, through holding.py).
"""

from __future__ import annotations

import dataclasses
import html
import string
from collections.abc import Mapping
from pathlib import Path

from torpor.wording import for_people

#: Seconds between the page's reloads: short enough that the answer follows the wake
#: closely, long enough not to load the gateway (each reload is one request).
REFRESH_SECONDS = 2

#: Response header that marks the waking page (for clients and tests).
WAKING_HEADER = "x-torpor-waking"

#: Placeholders a custom template may use ($name, string.Template syntax).
PLACEHOLDERS = ("service", "progress", "elapsed", "typical", "refresh")

DEFAULT_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="$refresh">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>$service is waking up</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; min-height: 100vh; display: grid;
         place-items: center; background: #f4f5f7; color: #1d2433; }
  main { max-width: 34rem; padding: 2rem 2.5rem; background: #fff; border-radius: 12px;
         box-shadow: 0 2px 12px rgba(0, 0, 0, .08); }
  h1 { font-size: 1.4rem; margin: 0 0 .75rem; }
  p { margin: .4rem 0; line-height: 1.5; }
  .muted { color: #5b6475; font-size: .9rem; }
</style>
</head>
<body>
<main>
<h1><code>$service</code> is waking up</h1>
<p>It was asleep to save resources and is starting now: $progress.</p>
<p>Waking for $elapsed; a wake of it usually takes $typical.</p>
<p class="muted">This page reloads itself every $refresh s and turns into the service's
answer as soon as it is ready. Nothing is lost by waiting here.</p>
</main>
</body>
</html>
"""


@dataclasses.dataclass(frozen=True)
class WakeView:
    """What the page shows of one wake."""

    service: str
    elapsed: float  # seconds since the wake started (as this activator saw it)
    ready: int | None = None  # replicas ready now, when known
    replicas: int | None = None  # replicas the wake starts, when known
    typical: float | None = None  # seconds a wake of this service usually took
    refresh: int = REFRESH_SECONDS


def wants_waking_page(method: str, headers: Mapping[str, str]) -> bool:
    """A browser navigating to a page: GET, `Accept` names text/html, no upgrade, and not
    a script (fetch/XHR announce themselves with Sec-Fetch-Mode other than navigate, or
    X-Requested-With). API clients (`Accept: application/json`, `*/*`) are held as usual."""
    if method != "GET" or "upgrade" in (k.lower() for k in headers):
        return False
    lowered = {k.lower(): v for k, v in headers.items()}
    if "x-requested-with" in lowered:
        return False
    mode = lowered.get("sec-fetch-mode")
    if mode is not None and mode != "navigate":
        return False
    accept = lowered.get("accept", "")
    return any(part.split(";")[0].strip().lower() == "text/html" for part in accept.split(","))


def progress_text(view: WakeView) -> str:
    if view.ready is None or view.replicas is None:
        return "starting its replicas"
    return f"{view.ready} of {view.replicas} replica{'s' if view.replicas != 1 else ''} ready"


def render(view: WakeView, template: string.Template | None = None) -> str:
    """The page for `view`; every value is HTML-escaped."""
    values = {
        "service": view.service,
        "progress": progress_text(view),
        "elapsed": for_people(view.elapsed),
        "typical": for_people(view.typical) if view.typical is not None else "a few seconds",
        "refresh": str(view.refresh),
    }
    chosen = template or string.Template(DEFAULT_TEMPLATE)
    return chosen.safe_substitute({k: html.escape(v) for k, v in values.items()})


def load_template(path: Path | None) -> string.Template:
    """The configured template (activator.waking_page_template), else torpor's own. Raises
    ValueError saying why when the file cannot be read or names an unknown placeholder."""
    if path is None:
        return string.Template(DEFAULT_TEMPLATE)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    template = string.Template(text)
    unknown = sorted(set(template.get_identifiers()) - set(PLACEHOLDERS))
    if unknown or not template.is_valid():
        why = (f"unknown placeholder(s) {', '.join('$' + u for u in unknown)}" if unknown
               else "a '$' that is not a placeholder (write $$ for a dollar sign)")
        raise ValueError(f"{path}: {why}; known: {', '.join('$' + p for p in PLACEHOLDERS)}")
    return template
