"""Endpoint flips under load: a service's endpoints switch between two backends 20 times
while requests flow. No request may fail, and each switch must show in responses within
100 ms of the push (hibernate and wake are exactly such flips, EDS only)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import aiohttp
import pytest

from tests.support.backends import start_backends
from tests.support.envoy import Envoy
from tests.support.xds import XdsHarness, svc
from torpor.config import XDS_PROTOCOLS


@pytest.fixture(params=XDS_PROTOCOLS)
def xds_protocol(request: pytest.FixtureRequest) -> str:
    """Every test here runs with Envoys speaking delta and state-of-the-world ADS."""
    return str(request.param)


FLIPS = 20
VISIBLE_WITHIN = 0.100


async def test_twenty_endpoint_flips_under_load(
    harness: XdsHarness, envoys: Callable[[int, str], Envoy]
) -> None:
    blue, green = await start_backends("blue", "green")
    await harness.start([svc("model", blue.endpoint)])
    envoy = envoys(harness.xds_port, "flips")
    url = f"http://127.0.0.1:{harness.listen_port}/predict"
    failures: list[str] = []
    served = {"blue": 0, "green": 0}
    latest: dict[str, float] = {}  # backend -> monotonic time it last answered
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.post(url, data=b"x" * 64,
                                        headers={"Host": "model.test"}) as r:
                    body = await r.text()
                    if r.status != 200:
                        failures.append(f"{r.status} {body[:80]}")
                    else:
                        served[body] += 1
                        latest[body] = time.monotonic()
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    delays: list[float] = []
    try:
        await envoy.wait_ready()
        async with aiohttp.ClientSession() as session:
            clients = [asyncio.create_task(client(session)) for _ in range(4)]
            await asyncio.sleep(0.2)  # traffic established before the first flip
            for flip in range(FLIPS):
                target = green if flip % 2 == 0 else blue
                pushed = time.monotonic()
                push = asyncio.create_task(harness.publish([svc("model", target.endpoint)]))
                while latest.get(target.name, 0.0) < pushed:
                    if time.monotonic() - pushed > 5:
                        raise AssertionError(f"flip {flip} to {target.name} never showed")
                    await asyncio.sleep(0.001)
                delays.append(latest[target.name] - pushed)
                assert await push, f"flip {flip} not ACKed"
                await asyncio.sleep(0.05)  # let the old target drain between flips
            stop.set()
            await asyncio.gather(*clients)
    finally:
        stop.set()
        await blue.stop()
        await green.stop()
    print(f"flip visible after: median {statistics.median(delays) * 1000:.1f} ms, "
          f"max {max(delays) * 1000:.1f} ms; served {served}")
    assert not failures, failures[:10]
    assert len(delays) == FLIPS
    assert max(delays) < VISIBLE_WITHIN, [round(d * 1000, 1) for d in delays]
    assert served["blue"] > FLIPS and served["green"] > FLIPS
