"""gateway.stats_listen: Envoy's own statistics for Prometheus on a listener of their own,
while the admin interface stays on its owner-only Unix socket. Checked offline by Envoy
(`--mode validate`) and live under `torpor up`: GET /stats/prometheus answers Envoy's
statistics; every other path and method is refused (the admin's /quitquitquit too). And
what the no-leader and no-activator alerts look for, as `torpor up` exports it."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import free_port
from tests.support.up import Up, UpRuns
from torpor.config import load_config
from torpor.errors import ConfigError
from torpor.gateway import envoy_binary
from xds_server.bootstrap import bootstrap_json

pytestmark = pytest.mark.envoy


def with_stats_listen(path: Path, port: int) -> Path:
    text = re.sub(r"gateway: \{listen: ([0-9.:]+)",
                  rf"gateway: {{listen: \1, stats_listen: 127.0.0.1:{port}", path.read_text(),
                  count=1)
    path.write_text(text)
    return path


def test_the_bootstrap_with_a_stats_listener_is_valid(tmp_path: Path) -> None:
    port = free_port()
    config = load_config(with_stats_listen(write_config(tmp_path, model_service("echo", 1)),
                                           port))
    boot = json.loads(bootstrap_json(config))
    listeners = boot["static_resources"]["listeners"]
    assert [x["address"]["socket_address"] for x in listeners] == [
        {"address": "127.0.0.1", "port_value": port}]
    admin = [c for c in boot["static_resources"]["clusters"] if c["name"] == "torpor_envoy_admin"]
    address = admin[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["pipe"]["path"] == str(config.gateway.admin.unix)
    (tmp_path / "envoy.json").write_text(json.dumps(boot))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c",
                             str(tmp_path / "envoy.json"), "--disable-hot-restart",
                             "--log-level", "warning"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("value", "problem"), [
    ("9902", "expected an address host:port"),
    ("127.0.0.1:70000", "out of range"),
    ("SAME", "clashes with gateway.listen"),
])
def test_a_bad_stats_listen_is_a_config_error(tmp_path: Path, value: str, problem: str) -> None:
    path = write_config(tmp_path, model_service("echo", 1))
    listen = re.search(r"gateway: \{listen: ([0-9.:]+)", path.read_text())
    assert listen is not None
    value = listen[1] if value == "SAME" else value
    path.write_text(path.read_text().replace(
        listen[0], f"{listen[0]}, stats_listen: '{value}'"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "gateway.stats_listen" and problem in info.value.problem, info.value


def test_without_the_key_there_is_no_stats_listener(tmp_path: Path) -> None:
    boot = json.loads(bootstrap_json(load_config(write_config(tmp_path, model_service("e", 1)))))
    assert "listeners" not in boot["static_resources"]


@pytest.fixture
async def runs() -> AsyncIterator[UpRuns]:
    runs = UpRuns()
    try:
        yield runs
    finally:
        await runs.stop_all()


async def test_envoy_statistics_are_served_and_nothing_else(tmp_path: Path, runs: UpRuns) -> None:
    port = free_port()
    path = with_stats_listen(write_config(tmp_path, model_service("echo", 1)), port)
    up: Up = await runs.start(path)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/stats/prometheus") as response:
            body = await response.text()
            assert response.status == 200, body
        assert "envoy_server_live" in body
        assert "envoy_cluster_upstream_rq_total" in body or "envoy_http_downstream_rq_total" in body
        for method, where in (("GET", "/stats"), ("GET", "/config_dump"),
                              ("POST", "/quitquitquit"), ("POST", "/stats/prometheus"),
                              ("GET", "/")):
            async with session.request(method, base + where) as response:
                assert response.status == 404, (method, where, response.status)
    assert up.proc is not None and up.proc.poll() is None, "torpor up stopped"


async def test_one_machine_reports_a_leader_and_a_serving_activator(tmp_path: Path,
                                                                    runs: UpRuns) -> None:
    """What TorporNoLeader and TorporNoActivator look for, from `torpor up` (one process:
    the only reconciler, and its activator), with the service facts it owns."""
    path = write_config(tmp_path, model_service("echo", 1))
    await runs.start(path)
    config = load_config(path)
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://{config.control_plane.metrics}/metrics") as response:
        exported = set((await response.text()).splitlines())
    assert 'torpor_leader{election="reconciler"} 1.0' in exported
    assert "torpor_activator_serving 1.0" in exported
    assert 'torpor_service_replicas{service="echo"} 1.0' in exported
    assert not [line for line in exported if line.startswith("torpor_activators ")]
