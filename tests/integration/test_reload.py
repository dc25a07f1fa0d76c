"""Changing a running `torpor up`: its config file edited (polled), SIGHUP, and services
registered through the admin API (`torpor register` / `unregister`), checked the way a
user sees them: `torpor status --json`, requests through the real Envoy, and the pids of
the local replicas (the example model server answers with its pid)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import free_port, wait_until
from tests.support.split_stack import torpor_proc, wait_logged
from tests.support.up import UpRuns, processes_mentioning, status_json
from torpor import admin_client
from torpor.config import Config, load_config
from torpor.credentials import admin_target, created_token_path
from torpor.gateway import admin_session, admin_url

pytestmark = pytest.mark.envoy


@pytest.fixture
async def runs() -> AsyncIterator[UpRuns]:
    runs = UpRuns()
    yield runs
    await runs.stop_all()


async def call(session: aiohttp.ClientSession, config: Config, host: str
               ) -> tuple[int, dict[str, Any]]:
    """GET /predict through Envoy; (status, JSON body or {})."""
    async with session.get(f"http://{config.gateway.listen}/predict?text=good",
                           headers={"Host": host}) as r:
        body = await r.json(content_type=None) if r.status == 200 else {}
        return r.status, body


async def answers(session: aiohttp.ClientSession, config: Config, host: str
                  ) -> dict[str, Any]:
    """The body of the first 200 for `host` (waiting for it)."""
    seen: dict[str, Any] = {}

    async def ok() -> bool:
        status, body = await call(session, config, host)
        seen.update(body)
        return status == 200

    await wait_until(ok, 30, f"{host} answered through Envoy", interval=0.05)
    return seen


def replace_file(path: Path, text: str) -> None:
    """Write the whole file at once, as an editor saving it does."""
    scratch = path.with_suffix(".new")
    scratch.write_text(text)
    os.replace(scratch, path)


def names(config_path: Path) -> set[str]:
    """Service names `torpor status --json` shows."""
    return {str(s["name"]) for s in status_json(config_path)}


def names_at(config: Config) -> set[str]:
    """The same through the admin API (while the file on disk does not load)."""
    return {str(s["name"]) for s in admin_client.list_statuses(admin_target(config))}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_an_edited_file_adds_removes_and_edits_services_and_a_bad_one_is_refused(
        tmp_path: Path, runs: UpRuns) -> None:
    keep, edit, gone = (model_service(n, 1) for n in ("keep", "edit", "gone"))
    path = write_config(tmp_path, keep + edit + gone)
    up = await runs.start(path)
    config = load_config(path)
    async with aiohttp.ClientSession() as session:
        keep_pid = (await answers(session, config, "keep.localhost"))["pid"]
        edit_pid = (await answers(session, config, "edit.localhost"))["pid"]

        # gone removed, added added, edit's command changed, and a listener moved.
        original = path.read_text()
        edited = original.replace(gone, model_service("added", 1)).replace(
            edit, model_service("edit", 1, load_seconds=0.2))
        edited = re.sub(r"gateway: \{listen: 127\.0\.0\.1:\d+",
                        f"gateway: {{listen: 127.0.0.1:{free_port()}", edited)
        changed_at = time.monotonic()
        replace_file(path, edited)

        added = await answers(session, config, "added.localhost")
        print(f"added service answered {time.monotonic() - changed_at:.2f}s after the edit")
        assert added["model"] == "added"

        async def gone_is_gone() -> bool:
            return (await call(session, config, "gone.localhost"))[0] == 404

        await wait_until(gone_is_gone, 30, "gone.localhost answered 404")

        async def edit_replaced() -> bool:
            status, body = await call(session, config, "edit.localhost")
            return status == 200 and body["pid"] != edit_pid

        await wait_until(edit_replaced, 60, "edit served by a replica with the new command")
        assert not pid_alive(edit_pid) or await _stopped_soon(edit_pid)
        assert (await answers(session, config, "keep.localhost"))["pid"] == keep_pid
        assert pid_alive(keep_pid)
        assert names(path) == {"keep", "edit", "added"}
        await wait_until(lambda: not processes_mentioning("--name gone "), 15,
                         "gone's replica stopped")
        said = ("config reloaded (file changed): added: added; removed: gone; "
                "changed: edit (replicas replaced); needs a restart: gateway.listen (")
        await wait_until(lambda: said in up.text(), 30, "the reload said what it did")

        # A bad file: refused with the parser's words, the running config stays.
        replace_file(path, edited.replace(model_service("keep", 1),
                                          model_service("keep", 1).replace(
                                              "replicas: 1", "replicas: -2")))
        await wait_until(lambda: "config reload failed" in up.text(), 30,
                         "the bad file refused")
        refused = up.text()
        assert "config reload failed (file changed); the running config stays: " in refused
        assert "services[0].replicas: expected an integer from 0 to" in refused
        assert names_at(config) == {"keep", "edit", "added"}
        assert (await answers(session, config, "keep.localhost"))["pid"] == keep_pid
        assert (await answers(session, config, "added.localhost"))["model"] == "added"
        async with session.get(f"http://{config.control_plane.metrics}/metrics") as r:
            scraped = await r.text()
        assert 'torpor_config_reloads_total{result="failed"} 1.0' in scraped
        assert 'torpor_config_reloads_total{result="applied"} 1.0' in scraped

    # The bootstrap uses no deprecated Envoy feature (the overload manager's downstream
    # connections monitor, not the runtime key overload.global_downstream_max_connections).
    url = admin_url(config.gateway.admin, "/stats?filter=^runtime.deprecated_feature_use$")
    async with admin_session(config.gateway.admin, 10) as admin, admin.get(url) as r:
        assert (await r.text()).strip() == "runtime.deprecated_feature_use: 0"
    assert "deprecated" not in (tmp_path / "torpor-logs" / "envoy.log").read_text().lower()


async def _stopped_soon(pid: int) -> bool:
    await wait_until(lambda: not pid_alive(pid), 15, f"old replica {pid} stopped")
    return True


async def test_sighup_applies_the_file_when_polling_is_off(tmp_path: Path,
                                                          runs: UpRuns) -> None:
    stay, edit, gone = (model_service(n, 1) for n in ("stay", "edit", "gone"))
    path = write_config(tmp_path, stay + edit + gone)
    path.write_text(path.read_text().replace("control_plane: {",
                                             "control_plane: {reload_poll: 0s, "))
    up = await runs.start(path)
    config = load_config(path)
    async with aiohttp.ClientSession() as session:
        stay_pid = (await answers(session, config, "stay.localhost"))["pid"]
        edit_pid = (await answers(session, config, "edit.localhost"))["pid"]
        replace_file(path, path.read_text()
                     .replace(gone, model_service("added", 1))
                     .replace("host: edit.localhost", "host: edit2.localhost"))
        assert names(path) == {"stay", "edit", "gone"}  # polling is off: nothing yet
        assert up.proc is not None
        hup_at = time.monotonic()
        os.kill(up.proc.pid, signal.SIGHUP)

        async def applied() -> bool:
            return ((await call(session, config, "added.localhost"))[0] == 200
                    and (await call(session, config, "edit2.localhost"))[0] == 200
                    and (await call(session, config, "gone.localhost"))[0] == 404)

        await wait_until(applied, 30, "the SIGHUP's changes routed by Envoy", interval=0.02)
        print(f"SIGHUP to all three changes served through Envoy: "
              f"{time.monotonic() - hup_at:.2f}s")
        # A host change moves the route, not the replica.
        assert (await answers(session, config, "edit2.localhost"))["pid"] == edit_pid
        assert (await answers(session, config, "stay.localhost"))["pid"] == stay_pid
        assert (await call(session, config, "edit.localhost"))[0] == 404
        assert names(path) == {"stay", "edit", "added"}
        said = "config reloaded (SIGHUP): added: added; removed: gone; changed: edit"
        await wait_until(lambda: said in up.text(), 30, "the reload said what it did")


def cli(config_path: Path, *args: str, token: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TORPOR_ADMIN_TOKEN", None)
    if token is not None:
        env["TORPOR_ADMIN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "assembly.cli", *args, "--config",
                           str(config_path)], capture_output=True, text=True, timeout=90,
                          env=env)


async def test_registered_services_serve_survive_a_restart_and_need_the_operator(
        tmp_path: Path, runs: UpRuns) -> None:
    path = write_config(tmp_path, model_service("base", 1))
    (tmp_path / "reader-token").write_text("reader-secret\n")
    path.write_text(path.read_text().replace(
        "control_plane: {", "control_plane: {admin_tokens: {read_only: ./reader-token}, "))
    up = await runs.start(path)
    config = load_config(path)
    command = ("python -m torpor.examples.model_server --port {port} --name reg "
               "--load-seconds 0")
    register = ("register", "reg", "--host", "reg.localhost", "--command", command)
    # The config names a read-only token file, which the CLI would find first.
    operator = created_token_path(config).read_text().strip()

    refused = await asyncio.to_thread(cli, path, *register, token="reader-secret")
    assert refused.returncode == 1
    assert "permission denied" in refused.stderr and "operator" in refused.stderr
    clash = await asyncio.to_thread(cli, path, "register", "base", "--host", "x.localhost",
                                    "--command", command, token=operator)
    assert clash.returncode == 1
    assert "is in the config file" in clash.stderr and "config wins" in clash.stderr
    bad = await asyncio.to_thread(cli, path, "register", "bad", "--host", "bad.localhost",
                                  token=operator)
    assert bad.returncode == 1 and "local" in bad.stderr, bad.stderr

    done = await asyncio.to_thread(cli, path, *register, token=operator)
    assert done.returncode == 0, done.stderr
    assert "registered reg" in done.stdout
    sources = {s["name"]: s["source"] for s in status_json(path)}
    assert sources == {"base": "config", "reg": "registered"}
    async with aiohttp.ClientSession() as session:
        assert (await answers(session, config, "reg.localhost"))["model"] == "reg"

    # A restart: the registration is in the store, and serves again.
    assert await up.stop() == 0
    up = await runs.start(path)
    assert names(path) == {"base", "reg"}
    async with aiohttp.ClientSession() as session:
        assert (await answers(session, config, "reg.localhost"))["model"] == "reg"
        refused = await asyncio.to_thread(cli, path, "unregister", "reg",
                                          token="reader-secret")
        assert refused.returncode == 1 and "permission denied" in refused.stderr
        not_registered = await asyncio.to_thread(cli, path, "unregister", "base",
                                                 token=operator)
        assert not_registered.returncode == 1
        assert "was not registered" in not_registered.stderr

        gone = await asyncio.to_thread(cli, path, "unregister", "reg", token=operator)
        assert gone.returncode == 0, gone.stderr
        assert (await call(session, config, "reg.localhost"))[0] == 404
        assert names(path) == {"base"}
        await wait_until(lambda: not processes_mentioning("--name reg "), 15,
                         "reg's replica stopped")


async def test_xds_server_reloads_on_sighup_an_activator_survives_one(
        tmp_path: Path) -> None:
    keep = model_service("keep", 1)
    path = write_config(tmp_path, keep)
    path.write_text(path.read_text().replace("control_plane: {",
                                             "control_plane: {reload_poll: 0s, "))
    config = load_config(path)
    server = torpor_proc(tmp_path, "xds-server", path)
    server.start()
    try:
        def ready() -> bool:
            try:
                statuses = admin_client.list_statuses(admin_target(config), timeout=2)
            except admin_client.AdminError:
                return False
            return any(s["ready_endpoints"] for s in statuses)

        await wait_until(lambda: asyncio.to_thread(ready), 60, "xds-server serving keep")
        keep_pid = [p.split(":")[0] for p in processes_mentioning("--name keep ")]
        replace_file(path, path.read_text().replace(keep, keep + model_service("more", 1)))
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGHUP)

        async def added() -> bool:
            found = await asyncio.to_thread(names_at, config)
            return found == {"keep", "more"}

        await wait_until(added, 30, "the SIGHUP's service in the table")
        await wait_logged(server, '"config.reloaded"')
        assert [p.split(":")[0] for p in processes_mentioning("--name keep ")] == keep_pid

        # A standalone activator does not reload, and SIGHUP does not stop it either.
        activator = torpor_proc(tmp_path, "activator", path)
        activator.start()
        try:
            await wait_logged(activator, "activator.h2.listening")
            assert activator.proc is not None
            os.kill(activator.proc.pid, signal.SIGHUP)
            await wait_logged(activator, '"config.reload_not_supported"')
            assert activator.alive
            assert await activator.stop() == 0, activator.text()[-3000:]
        finally:
            activator.kill()
        assert await server.stop() == 0, server.text()[-3000:]
    finally:
        server.kill()
