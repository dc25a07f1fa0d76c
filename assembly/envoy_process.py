"""The Envoy of `torpor up`, supervised: started on the generated bootstrap, restarted
when it dies, stopped with torpor.

Owns the Envoy child (started through `supervision.spawn`: no thread, dies with torpor,
listed in the run file), its readiness (admin `/ready` answers LIVE), closing its
listeners for a drain, and the restarts. When Envoy exits without being asked to, the
exit (code or signal) and the last lines of its log are logged, and the same bootstrap
is started again after the backoff of `supervision.next_restart` (0.5 s, doubling, at most
30 s); the 5th exit within 2 minutes is not restarted: `wait_failed` returns why, and
`torpor up` stops with exit code 1. A restarted Envoy opens a new ADS stream; the control
plane serves it the current snapshot (the dead stream left the connected set when its
connection closed), so it routes as before, including to the activator for sleeping
services.

A plain restart, not Envoy's hot restart (`--restart-epoch`): hot restart hands listen
sockets and stats from a *running* parent to its successor, for planned config or binary
changes; after a crash there is no parent left to hand anything over, and its shared
memory would stop several Envoys from running on one host (`--disable-hot-restart`).
Connections the dead Envoy held are lost either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import aiohttp

from torpor import metrics, supervision
from torpor.config import Address
from torpor.errors import TorporError
from torpor.gateway import admin_session, admin_url, envoy_binary
from torpor.logs import event

log = logging.getLogger("torpor.envoy")

#: How long a (re)started Envoy may take to become LIVE before it counts as failed.
READY_TIMEOUT = 60.0

#: How often a drain asks Envoy's admin whether requests are still in flight.
IN_FLIGHT_POLL_SECONDS = 0.05

#: Envoy's admin `/stats` filter (a regex) for the requests its listeners are answering.
_ACTIVE_REQUESTS = r"^http\..*\.downstream_rq_active$"


class SupervisedEnvoy:
    """One Envoy, restarted when it dies; a process group of its own, so that nothing of
    it outlives torpor."""

    def __init__(self, bootstrap_path: Path, log_path: Path, admin: Address, *,
                 concurrency: int = 2, policy: supervision.RestartPolicy | None = None,
                 argv: list[str] | None = None,
                 say: Callable[[str], None] = lambda text: None) -> None:
        """`argv`: the command (default: envoy on the bootstrap; tests pass their own).
        `say(text)`: exits and restarts told to a person (`torpor up` prints them)."""
        self.bootstrap_path = bootstrap_path
        self.log_path = log_path
        self.admin = admin
        self.policy = policy or supervision.RestartPolicy()
        self._say = say
        self.restarts = 0
        self.child: supervision.ChildProcess | None = None
        self._argv = argv or [
            envoy_binary(), "-c", str(bootstrap_path), "--disable-hot-restart",
            "--concurrency", str(concurrency), "--log-level", "warning",
        ]
        self._closing = False  # stopping or draining: an exit is expected, no restart
        self._supervisor: asyncio.Task[None] | None = None
        self._failed: asyncio.Future[str] | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    async def start(self) -> None:
        """Start Envoy and wait until it is LIVE (TorporError if it exits or is not ready
        within READY_TIMEOUT: a first start that fails is a configuration problem, not
        retried); from then on it is restarted when it dies."""
        self._failed = asyncio.get_running_loop().create_future()
        self._spawn()
        await self.wait_ready(READY_TIMEOUT)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_failed(self) -> str:
        """Return (a message for a person) once Envoy died too often to be restarted."""
        assert self._failed is not None, "start() first"
        return await asyncio.shield(self._failed)

    async def wait_ready(self, timeout: float) -> None:
        """Until the current Envoy's admin /ready says LIVE; raises TorporError if it exits
        first or is not ready in `timeout` seconds."""
        child = self.child
        url = admin_url(self.admin, "/ready")
        deadline = asyncio.get_running_loop().time() + timeout
        async with admin_session(self.admin, timeout=1) as session:
            while asyncio.get_running_loop().time() < deadline:
                if child is None or child.returncode is not None:
                    raise TorporError(f"envoy exited at start-up; see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise TorporError(f"envoy not ready after {timeout:.0f}s; see {self.log_path}")

    async def stop_listening(self) -> None:
        """Close Envoy's listeners to new connections (admin POST /drain_listeners, not
        graceful: at once); connections already open, and the requests on them, go on.
        From now on a dying Envoy is not restarted (the gateway is stopping). Best effort:
        an Envoy that does not answer is stopped anyway a moment later."""
        self._closing = True
        if self.child is None or self.child.returncode is not None:
            return
        url = admin_url(self.admin, "/drain_listeners")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with admin_session(self.admin, timeout=5) as session, \
                    session.post(url) as response:
                await response.read()

    async def requests_in_flight(self) -> int | None:
        """How many requests Envoy's listeners are still answering (the sum of every
        `http.<prefix>.downstream_rq_active` but the admin's own), or None when Envoy is
        gone or its admin does not answer."""
        async with admin_session(self.admin, timeout=2) as session:
            return await self._in_flight(session)

    async def wait_requests_done(self, seconds: float, cut: asyncio.Event) -> int:
        """Wait until Envoy answers no request any more (after `stop_listening`: the ones
        on open connections, to active services or relayed from the activator), for at
        most `seconds` or until `cut` is set. Returns how many were still in flight (0
        also when Envoy or its admin is gone: nothing more to wait for)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        async with admin_session(self.admin, timeout=2) as session:
            while True:
                left = await self._in_flight(session)
                if not left or cut.is_set() or loop.time() >= deadline:
                    return left or 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cut.wait(), min(IN_FLIGHT_POLL_SECONDS,
                                                           deadline - loop.time()))

    async def _in_flight(self, session: aiohttp.ClientSession) -> int | None:
        if self.child is None or self.child.returncode is not None:
            return None
        url = admin_url(self.admin, f"/stats?format=json&filter={quote(_ACTIVE_REQUESTS)}")
        try:
            async with session.get(url) as response:
                stats = (await response.json(content_type=None)).get("stats", [])
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return active_requests(stats)

    async def stop(self, grace: float = 10.0) -> None:
        """No more restarts; SIGTERM to Envoy's group, SIGKILL after `grace`. Idempotent."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        child = self.child
        if child is None or child.returncode is not None:
            return
        child.signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), grace)
        except TimeoutError:
            child.signal_group(signal.SIGKILL)
            await child.wait()

    # -- supervision -----------------------------------------------------------------------

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.admin.unix is not None:  # the dead Envoy's socket file: a new one cannot bind
            self.admin.unix.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.admin.unix.unlink()
        with self.log_path.open("ab") as out:
            self.child = supervision.spawn(self._argv, kind="envoy", name="envoy", stdout=out)

    async def _supervise(self) -> None:
        """Wait for the current Envoy's exit; restart it after the backoff, or give up."""
        loop = asyncio.get_running_loop()
        exits: list[float] = []
        while True:
            child = self.child
            # 127: the restart could not even start it (as a shell reports it).
            code = await child.wait() if child is not None else 127
            if self._closing:
                return
            now = loop.time()
            exits = [at for at in exits if now - at <= self.policy.window] + [now]
            delay = supervision.next_restart(self.policy, exits, now)
            self._log_exit(child.pid if child is not None else None, code, delay)
            if delay is None:
                self._give_up(len(exits), code)
                return
            await asyncio.sleep(delay)
            if self._closing:
                return
            await self._restart()

    async def _restart(self) -> None:
        """Start the same bootstrap again; one that cannot start, or is not LIVE in time,
        is killed and counts as one more exit."""
        started = asyncio.get_running_loop().time()
        self.child = None
        try:
            self._spawn()
        except OSError as exc:
            event(log, "envoy.restart_failed", level=logging.ERROR, error=str(exc))
            return
        assert self.child is not None
        self.restarts += 1
        metrics.ENVOY_RESTARTS.inc()
        event(log, "envoy.restarted", pid=self.child.pid, restarts=self.restarts)
        try:
            await self.wait_ready(READY_TIMEOUT)
        except TorporError as exc:
            event(log, "envoy.restart_not_ready", level=logging.ERROR, error=str(exc))
            self.child.signal_group(signal.SIGKILL)
            return
        ready_after = asyncio.get_running_loop().time() - started
        event(log, "envoy.ready", pid=self.child.pid, restarts=self.restarts,
              ready_after=round(ready_after, 3))
        self._say(f"envoy restarted (pid {self.child.pid}), ready after {ready_after:.1f}s")

    def _log_exit(self, pid: int | None, code: int, delay: float | None) -> None:
        how = supervision.describe_exit(code)
        event(log, "envoy.exited", level=logging.ERROR, pid=pid, exit=how, restart_in=delay,
              log_tail=supervision.log_tail(self.log_path))
        if delay is not None:
            self._say(f"envoy (pid {pid}) exited unexpectedly ({how}); restarting it in "
                      f"{delay:g}s (see {self.log_path})")

    def _give_up(self, exits: int, code: int) -> None:
        policy = self.policy
        message = (f"envoy died {exits} times within {policy.window:g}s (last: "
                   f"{supervision.describe_exit(code)}); not restarting it again "
                   f"(see {self.log_path})")
        event(log, "envoy.given_up", level=logging.ERROR, exits=exits, window=policy.window)
        assert self._failed is not None
        if not self._failed.done():
            self._failed.set_result(message)


def active_requests(stats: list[dict[str, object]]) -> int:
    """The requests in flight on Envoy's listeners, from admin `/stats?format=json`
    entries: every HTTP connection manager's `downstream_rq_active` except the admin's
    own (which counts the very request asking)."""
    return sum(int(str(entry.get("value", 0))) for entry in stats
               if str(entry.get("name", "")).endswith(".downstream_rq_active")
               and not str(entry.get("name", "")).startswith("http.admin."))
