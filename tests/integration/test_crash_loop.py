"""A replica that crash-loops on a wake (exit code 3, "CUDA out of memory" in its log) is a
problem on its service, through `torpor up`: the wake fails at once instead of after
wake_timeout, the held request's 503 says why (exit code and log lines), and `torpor status`
shows it until a replica is ready again. `torpor wake` says how far a wake is while it runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.up import UpRuns, status_json
from torpor import admin_client
from torpor.config import load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy

WAKE_TIMEOUT = 60.0
#: The model server, unless the marker file exists: then it fails as a GPU job does.
CRASHY = """\
import os, runpy, sys
if os.path.exists(sys.argv[2]):
    print("loading weights", flush=True)
    print("RuntimeError: CUDA out of memory", flush=True)
    sys.exit(3)
sys.argv = ["model_server", "--port", sys.argv[1], "--name", "crashy"]
runpy.run_module("torpor.examples.model_server", run_name="__main__")
"""


async def test_a_crash_looping_wake_fails_fast_and_says_why(tmp_path: Path) -> None:
    script, marker = tmp_path / "crashy.py", tmp_path / "out-of-memory"
    script.write_text(CRASHY)
    service = f"""  - name: crashy
    host: crashy.localhost
    local:
      command: [python, {script}, "{{port}}", {marker}]
      ready_path: /healthz
"""
    path = write_config(tmp_path, service, activator=f"wake_timeout: {WAKE_TIMEOUT:g}s")
    config = load_config(path)
    runs = UpRuns()
    try:
        await runs.start(path)
        await asyncio.to_thread(admin_client.hibernate, admin_target(config), "crashy")
        marker.touch()
        started = time.monotonic()
        async with aiohttp.ClientSession() as session, session.post(
                f"http://{config.gateway.listen}/predict", data=b"hi",
                headers={"Host": "crashy.localhost"}) as r:
            status, body = r.status, await r.json()
        took = time.monotonic() - started
        print(f"\nheld request answered {status} after {took:.1f}s: {body['message']}")
        assert (status, body["error"]) == (503, "wake_failed")
        assert "exit code 3" in body["message"]
        assert "CUDA out of memory" in body["message"]
        assert took < WAKE_TIMEOUT / 2  # not the wake_timeout's 504

        (crashy,) = status_json(path)
        assert "exit code 3" in str(crashy["replica_problem"])
        assert "CUDA out of memory" in str(crashy["replica_problem"])

        marker.unlink()  # fixed: the next replica starts, is ready, the problem is gone
        async with aiohttp.ClientSession() as session, session.post(
                f"http://{config.gateway.listen}/predict", data=b"hi",
                headers={"Host": "crashy.localhost"}) as r:
            assert r.status == 200, await r.text()
        (crashy,) = status_json(path)
        assert crashy["replica_problem"] is None
    finally:
        await runs.stop_all()


async def test_torpor_wake_says_how_far_the_wake_is(tmp_path: Path) -> None:
    path = write_config(tmp_path, model_service("slow", 1, load_seconds=3.0))
    config = load_config(path)
    runs = UpRuns()
    try:
        await runs.start(path)
        await asyncio.to_thread(admin_client.hibernate, admin_target(config), "slow")
        woke = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "assembly.cli", "wake", "slow",
                             "--config", str(path)],
            capture_output=True, text=True, timeout=60)
        print(f"\n{woke.stderr}{woke.stdout}")
        assert woke.returncode == 0, woke.stderr
        progress = woke.stderr.splitlines()
        assert progress and progress[0].startswith("waking slow: 0 of 1 replicas ready, ")
        assert woke.stdout.splitlines()[1].split()[:2] == ["slow", "ACTIVE"]
    finally:
        await runs.stop_all()
