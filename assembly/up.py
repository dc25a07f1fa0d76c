"""`torpor up`: the whole gateway on one machine, in the foreground.

Owns what `up` adds to the assembly (components.py, Role.UP): ports checked before
anything starts, start-up progress for a person, and running until SIGINT/SIGTERM or until
Envoy died too often to be restarted (envoy_process.py restarts it otherwise); SIGHUP and
a changed config file reload the config (reload.py). The
assembly starts the control plane (which loads state, starts replicas and only then serves
xDS), the activator and an Envoy bootstrapped to the control plane. On a
signal it drains first (Envoy's listeners closed, held requests finish within
`activator.drain_grace`, the rest answered 503), then stops them in reverse: Envoy (no more
traffic), then the activator, then the control plane, the store and every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path
from typing import TextIO

from assembly.components import Assembly, Role
from assembly.reload import ConfigReloader
from torpor import supervision
from torpor.config import Config
from torpor.errors import TorporError
from xds_server.bootstrap import envoy_xds_tls
from xds_server.control_plane import ControlPlane

#: How long `up` shows start-up progress before it stops waiting for slow services.
PROGRESS_TIMEOUT = 300.0


def check_ports_free(config: Config) -> None:
    """Fail before starting anything if an address torpor must bind is taken (a socket
    file is taken when something answers on it; a dead one is replaced at start)."""
    for key, address in config.listeners().items():
        if address.unix is not None:
            _check_socket_free(config, key, address.unix)
            continue
        if address.port == 0 or key == "activator.metrics":
            continue
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address.host, address.port))
            except OSError as exc:
                raise TorporError(
                    f"{config.path}: {key}: cannot listen on {address} ({exc.strerror}); "
                    "is another torpor or Envoy running?"
                ) from exc


def _check_socket_free(config: Config, key: str, path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # no file, or nobody listening: free
    raise TorporError(f"{config.path}: {key}: {path} is in use; is another torpor or Envoy "
                      "running?")


async def run_up(config: Config, out: TextIO = sys.stdout) -> int:
    """Run until a signal arrives; returns the exit code. Raises AlreadyRunningError when
    another `torpor up` runs with the same log folder; stops what a killed previous run
    left running (supervision.py) before checking ports."""
    logs = config.log_dir()
    run_file = supervision.RunFile(logs)
    leftovers = run_file.acquire()
    try:
        supervision.stop_leftovers(leftovers, lambda text: say(out, text))
        envoy_xds_tls(config)  # mTLS without Envoy's certificate: a config error, now
        check_ports_free(config)
        supervision.set_current(run_file)
        return await _run(config, logs, out)
    finally:
        supervision.set_current(None)
        run_file.release()


async def _run(config: Config, logs: Path, out: TextIO) -> int:
    stop = asyncio.Event()
    gateway = Assembly(config, Role.UP, logs=logs)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop_on, stop, sig, out, gateway)
    reloader = ConfigReloader(config, gateway.apply_reload, lambda text: say(out, text))
    loop.add_signal_handler(signal.SIGHUP, reloader.request)  # a reload once started
    reloading: asyncio.Task[None] | None = None

    try:
        await gateway.start(lambda text: say(out, text))
        assert gateway.envoy is not None and gateway.control_plane is not None
        reloading = asyncio.create_task(reloader.run())
        envoy_failed = asyncio.create_task(gateway.envoy.wait_failed())
        progress = asyncio.create_task(show_progress(gateway.control_plane, config, out))
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({envoy_failed, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        progress.cancel()
        if envoy_failed.done():
            say(out, f"{envoy_failed.result()}; stopping")
            return 1
        stop_wait.cancel()
        envoy_failed.cancel()
        await gateway.drain(lambda text: say(out, text))
        say(out, "stopping...")
        return 0
    finally:
        if reloading is not None:
            reloading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloading
        with contextlib.suppress(Exception):
            await gateway.close()
        say(out, "stopped; no process left running")


async def show_progress(control_plane: ControlPlane, config: Config, out: TextIO) -> None:
    """Print each service's ready count as it changes, then where to send requests."""
    shown: dict[str, str] = {}
    deadline = asyncio.get_running_loop().time() + PROGRESS_TIMEOUT
    while asyncio.get_running_loop().time() < deadline:
        statuses = await control_plane.statuses()
        pending = False
        for status in statuses:
            line = (f"{status.name}: {status.state.value}, "
                    f"{len(status.ready_endpoints)}/{status.desired_replicas} ready")
            if status.state.value == "ACTIVE" and len(status.ready_endpoints) < \
                    status.desired_replicas:
                pending = True
            if shown.get(status.name) != line:
                shown[status.name] = line
                say(out, "  " + line)
        if not pending:
            break
        await asyncio.sleep(0.25)
    reasons = await control_plane.wait_settled(config.control_plane.ack_timeout)
    for note in control_plane.quarantine_notes():
        say(out, "  " + note + " (torpor status shows it; the other services are routed)")
    if reasons:
        for reason in reasons:
            say(out, f"not ready: {reason}")
        say(out, "Envoy keeps its last accepted config; fix the config (see the error above) "
                 "and restart torpor; torpor status and /ready show it")
        return
    say(out, "ready. Send requests through the gateway, e.g.:")
    for service in config.services:
        say(out, f"  curl -H 'Host: {service.host}' http://{config.gateway.listen}/predict "
                 "-d 'what a great day'")
    say(out, "Ctrl-C stops torpor and every process it started.")


def _stop_on(stop: asyncio.Event, sig: signal.Signals, out: TextIO,
             gateway: Assembly) -> None:
    """The first signal stops (after the drain); a second one ends the drain's grace."""
    if stop.is_set():
        say(out, f"received {sig.name} again: answering held requests now")
        gateway.end_grace()
        return
    say(out, f"received {sig.name}")
    stop.set()


def say(out: TextIO, text: str) -> None:
    print(f"torpor: {text}", file=out, flush=True)
