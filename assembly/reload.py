"""Reloading the config of a running `torpor up` or `torpor xds-server`: on SIGHUP, and
when the file's content changes.

Owns noticing (SIGHUP; the file's SHA-256 read every `control_plane.reload_poll`), loading the
file with the parser and errors of a start, saying what happened (one log event, the
metric `torpor_config_reloads_total{result}`, a line for `torpor up`'s person) and handing
the plan to the control plane. A file that does not load keeps the running config. Must
not decide what changes (torpor.reload.plan_reload) nor carry it out (the control plane).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from torpor import metrics
from torpor.config import Config, load_config
from torpor.errors import ConfigError
from torpor.logs import event
from torpor.reload import ReloadPlan, applied, plan_reload, without_refused

log = logging.getLogger("torpor.reload")

#: Carries a plan out; returns the services it could not apply, name → why
#: (ControlPlane.apply_reload).
Apply = Callable[[ReloadPlan, Config], Awaitable[dict[str, str]]]


def file_digest(path: Path) -> str | None:
    """The SHA-256 of the file's bytes; None when it cannot be read (a reload then says
    why, with the parser's words)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigReloader:
    """The running config of one process, reloaded on request or when its file changes."""

    def __init__(self, config: Config, apply: Apply,
                 say: Callable[[str], None] = lambda text: None) -> None:
        """`say(text)`: a line for a person (`torpor up` prints it). The file is read
        every `control_plane.reload_poll` (as at start: a reload does not change it)."""
        self.config = config
        self._apply = apply
        self._say = say
        self._poll_every = config.control_plane.reload_poll or None  # 0: SIGHUP only
        self._digest = file_digest(config.path)
        self._wanted = asyncio.Event()

    def request(self) -> None:
        """SIGHUP: reload now, whether or not the file changed."""
        self._wanted.set()

    async def run(self) -> None:
        """Until cancelled: reload on each request and on each change of the file."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), self._poll_every)
            asked = self._wanted.is_set()
            self._wanted.clear()
            digest = file_digest(self.config.path)
            if not asked and digest == self._digest:
                continue
            self._digest = digest
            try:
                await self.reload("SIGHUP" if asked else "file changed")
            except Exception:
                log.exception("config.reload_crashed")

    async def reload(self, trigger: str) -> str:
        """Load, plan, apply; returns the result ("applied", "unchanged" or "failed")."""
        try:
            new = await asyncio.to_thread(load_config, self.config.path)
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels(result="failed").inc()
            event(log, "config.reload_failed", level=logging.ERROR, trigger=trigger,
                  error=str(exc))
            self._say(f"config reload failed ({trigger}); the running config stays: {exc}")
            return "failed"
        plan = plan_reload(self.config, new)
        before, self.config = self.config, applied(self.config, new, plan)
        refused = await self._apply(plan, self.config) if plan.applies_anything else {}
        # Not applied: as before in the running config, so the next reload tries again.
        self.config = without_refused(before, self.config, refused)
        problems = [f"service {name!r} not applied: {why}" for name, why in refused.items()]
        result = "applied" if plan.applies_anything else "unchanged"
        metrics.CONFIG_RELOADS.labels(result=result).inc()
        event(log, "config.reloaded", level=logging.WARNING if problems or
              plan.needs_restart else logging.INFO, trigger=trigger, result=result,
              added=[s.name for s in plan.added], removed=list(plan.removed),
              changed=[s.name for s in plan.changed], replaced=list(plan.replaced),
              live=list(plan.live), needs_restart=list(plan.needs_restart),
              problems=problems)
        self._say(f"config reloaded ({trigger}): {plan.summary()}")
        for problem in problems:
            self._say(f"  {problem}")
        return result
