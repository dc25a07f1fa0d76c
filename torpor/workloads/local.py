"""Local workloads: each replica of a service is a process group on this machine.

Owns: starting replicas on loopback ports picked outside the kernel's ephemeral range
(local_ports.py), probing their readiness over HTTP, killing replicas that stop answering
(liveness), restarting crashed or killed replicas with backoff, and stopping whole process
groups (SIGTERM, then SIGKILL after the grace). Must not know about service states, the
store or Envoy: it runs what `scale` asks for and tells listeners which endpoints are ready.

Replicas are started and watched through `supervision.spawn`: no thread per replica.

Liveness (`local.liveness`): once a replica has been ready, every `period` it is probed
like readiness but with the liveness `timeout`; a process in the stopped state (SIGSTOP,
a debugger) fails at once, so that a tcp probe, which a stopped process's kernel backlog
still accepts, notices it too. After `failures` failures in a row the replica is killed
with SIGKILL (a stopped process does not act on SIGTERM until continued) and replaced
like a crashed one. A replica that never became ready is not judged by liveness: a
model may load for minutes, and the wake's deadline bounds that wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from torpor import metrics, supervision
from torpor.clock import Clock, SystemClock
from torpor.config import LocalServiceConfig, ServiceConfig
from torpor.errors import UnknownServiceError, WorkloadError
from torpor.listeners import Listeners
from torpor.logs import event
from torpor.model import Endpoint
from torpor.workloads import replica_logs
from torpor.workloads.base import EndpointListener, Workloads, wait_for_ready
from torpor.workloads.local_ports import ReplicaPorts, ephemeral_range

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: A readiness probe that has not answered within this many seconds failed.
PROBE_TIMEOUT = 1.0
#: A replica that is not ready yet is probed this many times as often: a wake waits for it,
#: and the probe interval was most of a wake's overhead (bench/wake.py: p50 112 ms of 116).
LOADING_PROBE_SPEEDUP = 4
#: While nothing listens on a loading replica's port yet (connection refused), it is looked
#: at this often, for the first FAST_LISTEN_WINDOW seconds of its life: a refused connect
#: costs ~60 us of torpor's CPU and nothing of the loader's, and a server that starts
#: listening is then found within a few ms (the 50 ms probe left p50 29 ms of a wake's
#: 34 ms overhead waiting for it). A longer load goes back to the loading probe interval.
LISTEN_POLL = 0.005
FAST_LISTEN_WINDOW = 5.0


#: How often a replica's log file is looked at for its size cap (replica_logs.py).
LOG_CAP_EVERY = 5.0
#: Exits of a service's replicas within this many seconds that make it crash-looping: a
#: wake waiting for it fails with the exits' story instead of waiting out wake_timeout.
CRASH_LOOP_EXITS = 3
CRASH_LOOP_WINDOW = 120.0
#: Lines of a dead replica's log quoted in its service's problem.
PROBLEM_LOG_LINES = 5


@dataclasses.dataclass(frozen=True)
class ReplicaExit:
    """An unexpected exit of one replica, as its service's problem tells it."""

    at: float  # monotonic
    returncode: int
    last_lines: tuple[str, ...]


def exit_text(returncode: int) -> str:
    """'exit code 3', or 'signal SIGKILL' (negative return codes are signals)."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def crash_problem(exits: Sequence[ReplicaExit], now: float) -> str | None:
    """The problem a person reads in `torpor status` and in a failed wake's answer: the last
    exit, how many in the window, and the last log lines (pure)."""
    if not exits:
        return None
    last = exits[-1]
    recent = sum(1 for e in exits if now - e.at <= CRASH_LOOP_WINDOW)
    times = f", {recent} times in the last {CRASH_LOOP_WINDOW:g} s" if recent > 1 else ""
    text = f"a replica exited ({exit_text(last.returncode)}{times})"
    if last.last_lines:
        text += "; its last log lines: " + " | ".join(last.last_lines)
    return text


def crash_looping(exits: Sequence[ReplicaExit], since: float) -> bool:
    """Whether the replicas exited CRASH_LOOP_EXITS times since `since` (pure)."""
    return sum(1 for e in exits if e.at >= since) >= CRASH_LOOP_EXITS


class Probe(enum.Enum):
    """What one readiness probe found."""

    REFUSED = "refused"  # nothing listens on the port (yet)
    NOT_READY = "not_ready"  # it listens, but did not answer 2xx in time
    READY = "ready"


def probe_delay(found: Probe, ready: bool, age: float, interval: float) -> float:
    """Seconds until the next readiness probe of a replica `age` seconds old (pure)."""
    if ready:
        return interval
    if found is Probe.REFUSED and age < FAST_LISTEN_WINDOW:
        return LISTEN_POLL
    return interval / LOADING_PROBE_SPEEDUP
#: How often a stop looks whether a process group is gone: members other than the leader
#: are not our children, so there is nothing to wait on.
GROUP_POLL_INTERVAL = 0.05
#: After SIGKILL, how long a stop waits for the rest of the group before warning.
KILL_WAIT = 2.0


@dataclasses.dataclass(eq=False)
class _Replica:
    """One process group started for a service. Compared by identity."""

    port: int
    process: supervision.ChildProcess
    log_path: Path
    started: float = 0.0  # monotonic
    ready: bool = False
    ready_since: float | None = None
    stopping: bool = False
    probe_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    liveness_task: asyncio.Task[None] | None = None
    # Why torpor killed it itself ("liveness"), None while that has not happened.
    killed_for: str | None = None

    @property
    def pid(self) -> int:
        """Also the process group id: replicas start in a session of their own."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(LOOPBACK, self.port)


@dataclasses.dataclass(eq=False)
class _Service:
    """What is known about one managed service; changed only on the event loop."""

    name: str
    config: LocalServiceConfig
    next_restart_delay: float
    desired: int = 0
    # Wanted replicas, oldest first (scaling down stops from the end).
    replicas: list[_Replica] = dataclasses.field(default_factory=list)
    # Replicas being stopped: still running, no longer wanted.
    stopping: set[_Replica] = dataclasses.field(default_factory=set)
    # Crashed replicas whose restart waits for the backoff.
    restarts_due: int = 0
    restart_task: asyncio.Task[None] | None = None
    published: tuple[Endpoint, ...] = ()
    # Unexpected exits of its replicas, newest last; cleared once a replica is ready.
    exits: collections.deque[ReplicaExit] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=CRASH_LOOP_EXITS * 2))
    # Set (and replaced) whenever `published` changes, a replica exits or the workloads close.
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # Serialises scale, restart and close, so that two of them never count the same replicas.
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # Removed at run time (drop_service): nothing starts a replica of it again.
    dropped: bool = False


class LocalWorkloads(Workloads):
    """Replicas of the services that have a `local` block, run as local processes."""

    def __init__(
        self,
        services: Iterable[ServiceConfig],
        log_dir: str,
        *,
        probe_interval: float = 0.2,
        restart_backoff: tuple[float, float] = (0.5, 30.0),
        clock: Clock | None = None,
        backoff_reset_after: float = 10.0,
        ports: tuple[int, int] | None = None,
        replace_timeout: float = 120.0,
    ) -> None:
        """`ports`: where replicas listen (workloads.ports; default: just below the
        kernel's ephemeral range). `replace_timeout`: how long replicas with a changed
        command may take to get ready before the old ones stop anyway."""
        self._services = {
            s.name: _Service(s.name, s.local, next_restart_delay=restart_backoff[0])
            for s in services
            if s.local is not None
        }
        self._log_dir = Path(log_dir)
        self._probe_interval = probe_interval
        self._restart_backoff = restart_backoff
        self._backoff_reset_after = backoff_reset_after
        self._clock: Clock = clock or SystemClock()
        self._listeners: Listeners[[str, tuple[Endpoint, ...]]] = Listeners(
            "workloads.listener_failed"
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._ports = ReplicaPorts(ports)
        self._replace_timeout = replace_timeout

    # -- the Workloads contract ------------------------------------------------------------

    async def start(self) -> None:
        self._check_open()
        if self._ports.overlaps(ephemeral_range()):
            low, high = self._ports.range
            event(logger, "workloads.ports_overlap_ephemeral", level=logging.WARNING,
                  ports=f"{low}-{high}", hint="a replica may lose its port to an outgoing "
                  "connection before it binds it (it is then restarted on another port)")

    async def close(self) -> None:
        """Idempotent; a second caller waits for the first close, and cancelling a caller
        does not interrupt the stopping."""
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        await asyncio.gather(*(self._close_service(svc) for svc in self._services.values()))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for svc in self._services.values():
            _wake_waiters(svc)

    def running_replicas(self, name: str) -> int:
        svc = self._service(name)
        return sum(1 for r in (*svc.replicas, *svc.stopping) if r.alive)

    def desired_replicas(self, name: str) -> int:
        return self._service(name).desired

    async def scale(self, name: str, replicas: int) -> None:
        svc = self._service(name)
        if replicas < 0:
            raise WorkloadError(f"service {name!r}: cannot scale to {replicas} replicas")
        self._check_open()
        async with svc.lock:
            self._check_open()
            if svc.dropped:
                raise UnknownServiceError(f"service {name!r} was removed")
            svc.desired = replicas
            await self._reconcile(svc)

    def ready_endpoints(self, name: str) -> tuple[Endpoint, ...]:
        return self._service(name).published

    async def wait_ready(self, name: str, min_ready: int, timeout: float) -> tuple[Endpoint, ...]:
        """Raises WorkloadError with the exits' story when the replicas crash-loop while
        this waits (a wake then fails at once, not after wake_timeout)."""
        svc = self._service(name)
        since = self._clock.monotonic()

        def check() -> None:
            self._check_open()
            if crash_looping(svc.exits, since):
                raise WorkloadError(f"service {name!r} is crash-looping: "
                                    f"{crash_problem(svc.exits, self._clock.monotonic())}")

        return await wait_for_ready(lambda: svc.published, lambda: svc.changed, check,
                                    min_ready, timeout, f"service {name!r}: replicas")

    def problem(self, name: str) -> str | None:
        """Why the service's replicas are not running as they should: the last unexpected
        exit (code or signal, how often lately, its last log lines), until a replica is
        ready again."""
        svc = self._service(name)
        return crash_problem(svc.exits, self._clock.monotonic())

    def add_listener(self, listener: EndpointListener) -> Callable[[], None]:
        return self._listeners.add(listener)

    # -- extras ----------------------------------------------------------------------------

    def pids(self, name: str) -> list[int]:
        """Process ids of the wanted replicas that run now, oldest first (for tests and
        `torpor status`; a pid is also its replica's process group id)."""
        return [r.pid for r in self._service(name).replicas if r.alive]

    # -- services coming, changing and going at run time -----------------------------------

    async def put_service(self, service: ServiceConfig) -> None:
        """A new service (no replica until `scale`), or a changed `local:` block: when the
        command, cwd or env changed, running replicas are replaced make-before-break;
        other keys apply to replicas started later."""
        if service.local is None:
            raise WorkloadError(f"service {service.name!r} has no local: block, and "
                                "workloads.kind is local")
        self._check_open()
        svc = self._services.get(service.name)
        if svc is None:
            self._services[service.name] = _Service(
                service.name, service.local, next_restart_delay=self._restart_backoff[0])
            return
        async with svc.lock:
            self._check_open()
            old, svc.config = svc.config, service.local
            if (old.command, old.cwd, old.env) != (svc.config.command, svc.config.cwd,
                                                   svc.config.env):
                await self._replace(svc)

    async def drop_service(self, name: str) -> None:
        """Stop every replica of a removed service and forget it; a scale or restart
        waiting for it finds it gone."""
        svc = self._services.get(name)
        if svc is None:
            return
        svc.dropped = True
        await self._close_service(svc)
        if self._services.get(name) is svc:
            del self._services[name]
        _wake_waiters(svc)
        event(logger, "service.replicas_removed", service=name)

    async def _replace(self, svc: _Service) -> None:
        """Under the service's lock: start as many replicas with the new command as run
        now, wait until they are ready (at most `replace_timeout`, or until one exits),
        then stop the old ones. A new command that does not start leaves the restart
        backoff to retry it, as for a crash."""
        old = list(svc.replicas)
        if not old:
            return
        fresh: list[_Replica] = []
        try:
            for _ in old:
                await self._start_replica(svc)
                fresh.append(svc.replicas[-1])
            await wait_for_ready(lambda: tuple(r.endpoint for r in fresh if r.ready),
                                 lambda: svc.changed, lambda: self._check_fresh(svc, fresh),
                                 len(fresh), self._replace_timeout,
                                 f"service {svc.name!r}: replicas with the new command")
        except (TimeoutError, WorkloadError) as exc:
            event(logger, "replicas.replace_incomplete", level=logging.WARNING,
                  service=svc.name, error=str(exc))
        await self._stop_all(svc, [r for r in old if r in svc.replicas])
        missing = max(0, svc.desired - len(svc.replicas))
        if missing and not self._closed:
            svc.restarts_due = missing
            self._schedule_restart(svc)
        event(logger, "replicas.replaced", service=svc.name, stopped=[r.pid for r in old],
              started=[r.pid for r in fresh])

    def _check_fresh(self, svc: _Service, fresh: list[_Replica]) -> None:
        self._check_open()
        for replica in fresh:
            if not replica.alive:
                raise WorkloadError(f"service {svc.name!r}: a replica with the new command "
                                    f"exited ({exit_text(replica.process.returncode or 0)})")

    # -- scaling ---------------------------------------------------------------------------

    async def _reconcile(self, svc: _Service) -> None:
        """Start or stop replicas until `desired` are wanted; crashed replicas waiting for
        their backoff count as wanted, so that scaling does not skip the backoff."""
        svc.restarts_due = min(svc.restarts_due, max(0, svc.desired - len(svc.replicas)))
        for _ in range(svc.desired - len(svc.replicas) - svc.restarts_due):
            await self._start_replica(svc)
        await self._stop_all(svc, reversed(svc.replicas[svc.desired :]))

    async def _close_service(self, svc: _Service) -> None:
        """Stop every replica of `svc`, including those a cancelled scale was stopping;
        under the lock, so no scale or restart is half done."""
        async with svc.lock:
            if svc.restart_task is not None:
                svc.restart_task.cancel()
            svc.restarts_due = 0
            await self._stop_all(svc, [*svc.replicas, *svc.stopping])

    async def _stop_all(self, svc: _Service, replicas: Iterable[_Replica]) -> None:
        """Stop `replicas` concurrently and wait for them. The stops are tasks of their own
        (asyncio.wait does not cancel them), so a cancelled caller cannot leave a process
        signalled but unreaped and untracked."""
        stops = [self._stop(svc, r) for r in replicas]
        if not stops:
            return
        await asyncio.wait(stops)
        for stop in stops:
            stop.result()

    def _schedule_restart(self, svc: _Service) -> float | None:
        """Restart crashed replicas after the backoff; returns the delay, or None when a
        restart is already scheduled (it restarts every replica due by then)."""
        if svc.restart_task is not None and not svc.restart_task.done():
            return None
        delay = svc.next_restart_delay
        svc.next_restart_delay = min(delay * 2, self._restart_backoff[1])
        svc.restart_task = self._spawn(self._restart_after(svc, delay))
        return delay

    async def _restart_after(self, svc: _Service, delay: float) -> None:
        await asyncio.sleep(delay)
        async with svc.lock:
            if self._closed or svc.dropped:
                return
            svc.restart_task = None
            svc.restarts_due = 0
            try:
                await self._reconcile(svc)
            except WorkloadError as exc:
                svc.restarts_due = max(0, svc.desired - len(svc.replicas))
                retry_in = self._schedule_restart(svc)
                event(
                    logger,
                    "replica.restart_failed",
                    level=logging.ERROR,
                    service=svc.name,
                    error=str(exc),
                    retry_in=retry_in,
                )

    # -- one replica -----------------------------------------------------------------------

    async def _start_replica(self, svc: _Service) -> None:
        port = self._ports.pick(self._ports_in_use())
        argv = _argv(svc.name, svc.config.command, port)
        log_path = replica_logs.log_path(self._log_dir, svc.name, port)
        replica_logs.prune(self._log_dir, svc.name,
                           {r.log_path for r in (*svc.replicas, *svc.stopping)} | {log_path})
        process = await self._spawn_process(svc, argv, log_path)
        replica = _Replica(port=port, process=process, log_path=log_path,
                           started=self._clock.monotonic())
        svc.replicas.append(replica)
        replica.probe_task = self._spawn(self._probe_loop(svc, replica))
        self._spawn(self._watch(svc, replica))
        event(
            logger,
            "replica.started",
            service=svc.name,
            port=port,
            pid=process.pid,
            log=str(log_path),
        )

    def _ports_in_use(self) -> set[int]:
        """Ports of this process's replicas, running or stopping."""
        return {r.port for svc in self._services.values()
                for r in (*svc.replicas, *svc.stopping)}

    async def _spawn_process(
        self, svc: _Service, argv: list[str], log_path: Path
    ) -> supervision.ChildProcess:
        """Start `argv` in a new session, so that the replica and its children form one
        process group that a stop can signal as a whole; on Linux the replica also dies
        with torpor, even when torpor is SIGKILLed, and its exit is watched without a
        thread (supervision.spawn). Called on the event loop's thread."""
        cwd = svc.config.cwd
        with _open_log(svc.name, log_path) as log:
            try:
                env = {**os.environ, **dict(svc.config.env)}
                return supervision.spawn(argv, kind="replica", name=svc.name, stdout=log,
                                         env=env, cwd=cwd)
            except OSError as exc:
                where = f" in {cwd}" if cwd is not None else ""
                raise WorkloadError(
                    f"service {svc.name!r}: cannot run command {argv!r}{where}: {exc}"
                ) from exc

    async def _watch(self, svc: _Service, replica: _Replica) -> None:
        """Notice a replica's exit: a stop expects it; anything else is a crash to restart."""
        returncode = await replica.process.wait()
        supervision.untrack(replica.pid)
        for task in (replica.probe_task, replica.liveness_task):
            if task is not None:
                task.cancel()
        if replica.stopping:
            return
        # Whatever the crashed leader left in its group is nobody's to manage any more.
        _signal_group(replica.pid, signal.SIGKILL)
        if replica in svc.replicas:
            svc.replicas.remove(replica)
        self._publish(svc)
        restart_in = None
        reason = replica.killed_for or "exited"
        tail = supervision.log_tail(replica.log_path, PROBLEM_LOG_LINES)
        svc.exits.append(ReplicaExit(self._clock.monotonic(), returncode, tuple(tail)))
        _wake_waiters(svc)  # a wake waiting for it looks at the exits
        if not self._closed:
            svc.restarts_due += 1
            restart_in = self._schedule_restart(svc)
            metrics.REPLICA_RESTARTS.labels(service=svc.name, reason=reason).inc()
        event(
            logger,
            "replica.exited",
            level=logging.WARNING,
            service=svc.name,
            port=replica.port,
            pid=replica.pid,
            returncode=returncode,
            reason=reason,
            restart_in=restart_in,
        )

    def _stop(self, svc: _Service, replica: _Replica) -> asyncio.Task[None]:
        """The one stop of `replica`. It leaves the ready set at once, before any signal,
        so that traffic leaves before the process does."""
        if replica.stop_task is None:
            replica.stopping = True
            svc.stopping.add(replica)
            if replica in svc.replicas:
                svc.replicas.remove(replica)
            replica.ready = False
            self._publish(svc)
            for task in (replica.probe_task, replica.liveness_task):
                if task is not None:
                    task.cancel()
            replica.stop_task = self._spawn(self._terminate(svc, replica))
        return replica.stop_task

    async def _terminate(self, svc: _Service, replica: _Replica) -> None:
        """SIGTERM the replica's group, SIGKILL it after the grace, and always reap."""
        loop = asyncio.get_running_loop()
        try:
            _signal_group(replica.pid, signal.SIGTERM)
            deadline = loop.time() + svc.config.stop_grace
            killed = not await _wait_group_gone(replica, deadline)
            if killed:
                _signal_group(replica.pid, signal.SIGKILL)
                await replica.process.wait()
                if not await _wait_group_gone(replica, loop.time() + KILL_WAIT):
                    event(
                        logger,
                        "replica.group_left_behind",
                        level=logging.ERROR,
                        service=svc.name,
                        port=replica.port,
                        pgid=replica.pid,
                    )
        finally:
            svc.stopping.discard(replica)
            if not replica.alive:
                supervision.untrack(replica.pid)
        event(
            logger,
            "replica.stopped",
            service=svc.name,
            port=replica.port,
            pid=replica.pid,
            returncode=replica.process.returncode,
            killed=killed,
        )

    # -- readiness -------------------------------------------------------------------------

    async def _probe_loop(self, svc: _Service, replica: _Replica) -> None:
        path = "/" + svc.config.ready_path.lstrip("/")
        tcp_only = svc.config.ready_probe == "tcp"
        capped_at = self._clock.monotonic()
        while True:
            found = await (_accepts(replica.port) if tcp_only else _probe(replica.port, path))
            self._observe(svc, replica, found is Probe.READY)
            now = self._clock.monotonic()
            if now - capped_at >= LOG_CAP_EVERY:
                capped_at = now
                if replica_logs.cap(replica.log_path):
                    event(logger, "replica.log_capped", service=svc.name, port=replica.port,
                          log=str(replica.log_path))
            await asyncio.sleep(probe_delay(found, replica.ready, now - replica.started,
                                            self._probe_interval))

    def _observe(self, svc: _Service, replica: _Replica, ok: bool) -> None:
        """Record one probe result; a replica ready long enough resets the restart backoff."""
        if replica.stopping or replica not in svc.replicas:
            return
        now = self._clock.monotonic()
        if ok and not replica.ready:
            replica.ready, replica.ready_since = True, now
            svc.exits.clear()  # a ready replica ends the service's problem
            event(logger, "replica.ready", service=svc.name, port=replica.port, pid=replica.pid)
            self._publish(svc)
            if replica.liveness_task is None and svc.config.liveness.enabled:
                replica.liveness_task = self._spawn(self._liveness_loop(svc, replica))
        elif ok and replica.ready_since is not None:
            if now - replica.ready_since >= self._backoff_reset_after:
                svc.next_restart_delay = self._restart_backoff[0]
        elif not ok and replica.ready:
            replica.ready, replica.ready_since = False, None
            event(logger, "replica.unready", service=svc.name, port=replica.port, pid=replica.pid)
            self._publish(svc)

    async def _liveness_loop(self, svc: _Service, replica: _Replica) -> None:
        """Probe a replica that has been ready every `liveness.period`; kill it after
        `liveness.failures` failures in a row (the watch then replaces it)."""
        live = svc.config.liveness
        failures = 0
        while True:
            await asyncio.sleep(live.period)
            if await self._alive(svc, replica, live.timeout):
                failures = 0
                continue
            failures += 1
            event(logger, "replica.liveness_failed", level=logging.WARNING, service=svc.name,
                  port=replica.port, pid=replica.pid, failures=failures, of=live.failures)
            if failures >= live.failures:
                self._kill_hung(svc, replica, failures)
                return

    async def _alive(self, svc: _Service, replica: _Replica, timeout: float) -> bool:
        """One liveness probe: not stopped, and the readiness probe passes in `timeout`."""
        if _stopped(replica.pid):
            return False
        path = "/" + svc.config.ready_path.lstrip("/")
        if svc.config.ready_probe == "tcp":
            return await _accepts(replica.port, timeout) is Probe.READY
        return await _probe(replica.port, path, timeout) is Probe.READY

    def _kill_hung(self, svc: _Service, replica: _Replica, failures: int) -> None:
        """SIGKILL the replica's whole group: a stopped process ignores SIGTERM until it is
        continued. It leaves the ready set now; its exit is a crash to the watch, which
        schedules the replacement (with the restart backoff)."""
        if replica.stopping or not replica.alive:
            return
        replica.killed_for = "liveness"
        if replica.ready:
            replica.ready, replica.ready_since = False, None
            self._publish(svc)
        event(logger, "replica.killed", level=logging.ERROR, service=svc.name,
              port=replica.port, pid=replica.pid, reason="liveness", failures=failures)
        _signal_group(replica.pid, signal.SIGKILL)

    def _publish(self, svc: _Service) -> None:
        """Tell waiters and listeners about the ready set, only when it changed."""
        endpoints = tuple(sorted(r.endpoint for r in svc.replicas if r.ready))
        if endpoints == svc.published:
            return
        svc.published = endpoints
        _wake_waiters(svc)
        self._listeners.notify(svc.name, endpoints)

    # -- helpers ---------------------------------------------------------------------------

    def _service(self, name: str) -> _Service:
        svc = self._services.get(name)
        if svc is None:
            raise UnknownServiceError(f"service {name!r} has no local workload")
        return svc

    def _check_open(self) -> None:
        if self._closed:
            raise WorkloadError("local workloads are closed")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A background task that close() cancels; its unexpected failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            event(
                logger,
                "workloads.task_failed",
                level=logging.ERROR,
                task=task.get_name(),
                error=repr(task.exception()),
            )


def _wake_waiters(svc: _Service) -> None:
    changed, svc.changed = svc.changed, asyncio.Event()
    changed.set()


def _argv(name: str, command: tuple[str, ...], port: int) -> list[str]:
    """The command with its port filled in; a bare `python` runs torpor's own interpreter,
    so that example services find the packages installed next to torpor."""
    if not command:
        raise WorkloadError(f"service {name!r}: local.command is empty")
    argv = [arg.replace("{port}", str(port)) for arg in command]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


@contextlib.contextmanager
def _open_log(name: str, path: Path) -> Iterator[IO[bytes]]:
    """The replica's log file, appended to; closed here once the child holds its own copy."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log: IO[bytes] = path.open("ab")
    except OSError as exc:
        raise WorkloadError(f"service {name!r}: cannot open log file {path}: {exc}") from exc
    with log:
        yield log


async def _accepts(port: int, timeout: float = PROBE_TIMEOUT) -> Probe:
    """The tcp probe: the replica's port accepts a connection (a gRPC server has no
    HTTP/1 path to GET)."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(LOOPBACK, port)
    except ConnectionRefusedError:
        return Probe.REFUSED
    except (OSError, TimeoutError):
        return Probe.NOT_READY
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return Probe.READY


async def _probe(port: int, path: str, timeout: float = PROBE_TIMEOUT) -> Probe:
    """One HTTP/1.0 GET on loopback; READY for a 2xx status."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                request = f"GET {path} HTTP/1.0\r\nHost: {LOOPBACK}:{port}\r\n\r\n"
                writer.write(request.encode("latin-1"))
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except ConnectionRefusedError:
        return Probe.REFUSED
    except (OSError, TimeoutError, ValueError):
        return Probe.NOT_READY
    parts = status_line.split()
    ok = len(parts) >= 2 and len(parts[1]) == 3 and parts[1].startswith(b"2")
    return Probe.READY if ok else Probe.NOT_READY


def _stopped(pid: int) -> bool:
    """Whether the process is in the stopped state (SIGSTOP, or traced): it cannot serve
    until continued. False where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2 :].split()
    return bool(fields) and fields[0] in ("T", "t")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def _wait_group_gone(replica: _Replica, deadline: float) -> bool:
    """Wait until the replica's leader is reaped and no member of its group can run;
    False if that did not happen by `deadline` (loop time)."""
    try:
        async with asyncio.timeout_at(deadline):
            await replica.process.wait()
            while True:
                if not _group_alive(replica.pid):
                    return True
                await asyncio.sleep(GROUP_POLL_INTERVAL)
    except TimeoutError:
        return False


def _group_alive(pgid: int) -> bool:
    """True while some process of group `pgid` can still run. Zombies do not count: an
    orphan is reaped by PID 1, which in some containers never happens."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _live_member_in_proc(pgid)


def _live_member_in_proc(pgid: int) -> bool:
    """Whether /proc lists a non-zombie member of `pgid` (True where there is no /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after it do not.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False
