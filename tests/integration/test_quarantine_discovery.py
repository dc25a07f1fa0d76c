"""Discovered Deployments cannot break each other's routes (`torpor up`, real Envoy, the
fake Kubernetes API through the official client).

- `torpor.io/host: good.localhost.` next to a service on `good.localhost`: the annotation
  rules accept it and the catalog sees two hosts, but Envoy would route the two apart
  while the activator wakes one for both. The validator quarantines the newcomer: it is
  not published, its problem shows in `torpor status` (table and --json), the gauge is
  1, and the first service keeps serving. Fixing the annotation releases it.
- `torpor.io/host: "*"`: refused by the annotation rules already (a wildcard would make
  Envoy refuse every service's routes): reported as a problem, nothing is published.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration import test_kubernetes_loop as loop
from tests.integration.test_hibernate_wake import send
from tests.support.configs import write_config
from tests.support.fake_kube import FakeKube
from tests.support.kube_objects import model_deployment, model_service
from tests.support.net import wait_until
from tests.support.up import Up, UpRuns
from tests.support.xds import with_xds_protocol
from torpor.config import XDS_PROTOCOLS, Config, load_config

pytestmark = pytest.mark.envoy

NS = loop.NS
_get = loop._get
kube = loop.kube  # fixtures: the fake API server, and `torpor up` on it


@pytest.fixture(params=XDS_PROTOCOLS)
def xds_protocol(request: pytest.FixtureRequest) -> str:
    """Every test here runs with `torpor up`'s Envoy speaking delta and state-of-the-world
    ADS (control_plane.xds_protocol)."""
    return str(request.param)


@pytest.fixture
async def start_up(tmp_path: Path, kube: FakeKube, xds_protocol: str) -> AsyncIterator[Any]:
    """The Kubernetes loop's `start_up` (`torpor up` on the fake, always stopped), its
    config with `control_plane.xds_protocol`."""
    runs = UpRuns()
    kube.write_kubeconfig(tmp_path / "kubeconfig")

    async def start(services: str, extra: str = "", discover: bool = False
                    ) -> tuple[Up, Config]:
        workloads = ("{kind: kubernetes, kubeconfig: ./kubeconfig, poll_every: 1s, "
                     f"discover: {str(discover).lower()}, namespaces: [{NS}]}}")
        path = with_xds_protocol(write_config(tmp_path, services, extra, workloads=workloads),
                                 xds_protocol)
        return await runs.start(path), load_config(path)

    yield start
    await runs.stop_all()


def enabled(host: str) -> dict[str, Any]:
    return {"labels": {"torpor.io/enabled": "true"}, "annotations": {"torpor.io/host": host}}


async def cli_status(config: Config, *flags: str) -> str:
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "assembly.cli", "status", "--config",
                         str(config.path), *flags], capture_output=True, timeout=30, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def status_json(config: Config) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in json.loads(await cli_status(config, "--json"))}


async def test_a_clashing_discovered_host_is_quarantined(kube: FakeKube, start_up: Any
                                                         ) -> None:
    for name in ("good", "copycat", "star"):
        kube.create(model_deployment(name, NS, replicas=1))
        kube.create(model_service(name, NS))
    kube.patch_object("apps/v1", "Deployment", NS, "good", {"metadata": enabled(
        "good.localhost")})
    up, config = await start_up("  []", discover=True)

    async with aiohttp.ClientSession() as session:
        async def good_serves() -> bool:
            return (await send(session, config, "good.localhost", "/predict"))[0] == 200

        await wait_until(good_serves, 30, "good served through Envoy")

        kube.patch_object("apps/v1", "Deployment", NS, "copycat", {"metadata": enabled(
            "good.localhost.")})
        kube.patch_object("apps/v1", "Deployment", NS, "star", {"metadata": enabled("*")})

        async def copycat_quarantined() -> bool:
            found = (await status_json(config)).get("copycat")
            return found is not None and found["problem"] is not None

        await wait_until(copycat_quarantined, 30, "copycat quarantined")
        statuses = await status_json(config)
        problem = statuses["copycat"]["problem"]
        assert "'good.localhost' is already served by 'good'" in problem, problem
        assert statuses["good"]["problem"] is None
        assert "star" not in statuses  # refused by the annotation rules, not a service
        table = await cli_status(config)
        assert "PROBLEM (quarantined): " in table and "already served by 'good'" in table
        assert "problem: deployment models/star: torpor.io/host" in table, table
        metrics_text = await _get(f"http://{config.control_plane.metrics}/metrics")
        assert 'torpor_service_quarantined{service="copycat"} 1.0' in metrics_text
        ready = await _get(f"http://{config.control_plane.metrics}/ready")
        assert ready.startswith("ready\n") and "quarantined: copycat:" in ready, ready

        for _ in range(10):  # good is untouched
            assert (await send(session, config, "good.localhost", "/predict"))[0] == 200

        kube.patch_object("apps/v1", "Deployment", NS, "copycat", {"metadata": enabled(
            "copycat.localhost")})

        async def copycat_serves() -> bool:
            return (await send(session, config, "copycat.localhost", "/predict"))[0] == 200

        await wait_until(copycat_serves, 30, "copycat released and served")
        assert (await status_json(config))["copycat"]["problem"] is None
        metrics_text = await _get(f"http://{config.control_plane.metrics}/metrics")
        assert 'torpor_service_quarantined{service="copycat"} 0.0' in metrics_text
    assert await up.stop() == 0
