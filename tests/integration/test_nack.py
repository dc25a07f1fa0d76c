"""Envoy rejects a config (NACK): the NACK is counted and logged with Envoy's error, the
rejected version is not resent (no loop), and Envoy keeps serving its last good config.
A later good snapshot is accepted again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import duration_pb2

from tests.support.backends import start_backends
from tests.support.envoy import Envoy
from tests.support.net import wait_until
from tests.support.xds import XdsHarness, svc
from torpor import metrics
from torpor.config import XDS_PROTOCOLS
from xds_server import types
from xds_server.cache import Resource


@pytest.fixture(params=XDS_PROTOCOLS)
def xds_protocol(request: pytest.FixtureRequest) -> str:
    """Every test here runs with Envoys speaking delta and state-of-the-world ADS."""
    return str(request.param)


def nacks() -> float:
    return metrics.XDS_NACKS.labels(type="cds")._value.get()  # type: ignore[no-any-return]


async def test_nack_is_counted_logged_not_resent(
    harness: XdsHarness, envoys: Callable[[int, str], Envoy], caplog: pytest.LogCaptureFixture,
    xds_protocol: str,
) -> None:
    caplog.set_level(logging.INFO)
    (good,) = await start_backends("good")
    table = [svc("model", good.endpoint)]
    await harness.start(table)
    envoy = envoys(harness.xds_port, "nack")
    url = f"http://127.0.0.1:{harness.listen_port}/"
    try:
        await envoy.wait_ready()
        async with aiohttp.ClientSession() as session:

            async def served() -> bool:
                async with session.get(url, headers={"Host": "model.test"}) as r:
                    return r.status == 200 and await r.text() == "good"

            await wait_until(served, 10, "first config served")
            before = nacks()
            broken = dict(harness.builder.build(table))
            bad = cluster_pb2.Cluster(name="broken", type=cluster_pb2.Cluster.STATIC,
                                      connect_timeout=duration_pb2.Duration(seconds=-1))
            broken[types.CLUSTER] = {**broken[types.CLUSTER],
                                     "broken": Resource.pack("broken", bad)}
            snapshot = harness.cache.set_resources(broken)

            await wait_until(lambda: nacks() > before, 10, "the NACK")
            (stream,) = harness.ads.streams()
            assert stream.protocol == xds_protocol
            assert stream.nacks.get("cds"), stream
            sent_after_nack = stream.responses_sent
            await asyncio.sleep(1.5)  # a resend loop would answer many times in 1.5 s
            (stream,) = harness.ads.streams()
            assert stream.responses_sent == sent_after_nack, "rejected config was resent"
            assert nacks() == before + 1
            assert harness.ads.lagging(snapshot.version), "a NACKed version counts as applied"

            for _ in range(20):  # Envoy keeps serving the last good config
                assert await served()
            nack_logs = [r for r in caplog.records if r.getMessage() == "xds.nack"]
            assert len(nack_logs) == 1
            logged_error = str(nack_logs[0].__dict__.get("error"))
            assert "Expected positive duration" in logged_error, logged_error  # Envoy's words

            fixed = [svc("model", good.endpoint), svc("other", good.endpoint)]
            await harness.publish(fixed)  # its first stage still carries the bad cluster
            current = harness.cache.snapshot()
            assert current is not None
            assert not harness.ads.lagging(current.version), "a newer good snapshot applies"
            (stream,) = harness.ads.streams()
            assert not stream.nacks
    finally:
        await good.stop()
