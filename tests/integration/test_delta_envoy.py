"""Delta ADS with a real Envoy: what the control plane sends is what changed.

Counted on the server side (`AdsServer.streams()`: resources its responses carried, with
removals): an endpoint flip is one ClusterLoadAssignment, an added service its cluster,
its ClusterLoadAssignment and the RouteConfiguration, a removed service leaves as
removed_resources, and an Envoy that reconnects to a restarted control plane (its
initial_resource_versions) is sent only the one resource that changed meanwhile. Traffic
through Envoy follows each change."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest

from tests.support.backends import Backend, start_backends
from tests.support.envoy import Envoy
from tests.support.net import wait_until
from tests.support.xds import XdsHarness, svc
from xds_server.resources import RoutedService
from xds_server.server import StreamInfo

pytestmark = pytest.mark.envoy

SERVICES = 30


def table(blue: Backend, green: Backend, on_green: str = "", skip: str = "",
          extra: str = "") -> list[RoutedService]:
    out = [svc(f"m{i}", (green if f"m{i}" == on_green else blue).endpoint)
           for i in range(SERVICES) if f"m{i}" != skip]
    if extra:
        out.append(svc(extra, green.endpoint))
    return out


def stream(harness: XdsHarness) -> StreamInfo:
    (found,) = harness.ads.streams()
    assert found.protocol == "delta"
    return found


async def synced(harness: XdsHarness) -> StreamInfo:
    """Until the one Envoy's stream applied the current snapshot in every type."""

    def done() -> bool:
        snapshot = harness.cache.snapshot()
        found = harness.ads.streams()
        return snapshot is not None and len(found) == 1 and \
            len(found[0].synced_versions) == 4 and \
            all(v == snapshot.version for v in found[0].synced_versions.values())

    await wait_until(done, 15, "Envoy synced")
    return stream(harness)


async def test_delta_envoy_is_sent_only_what_changed(
    harness: XdsHarness, envoys: Callable[[int, str], Envoy]
) -> None:
    blue, green = await start_backends("blue", "green")
    url = f"http://127.0.0.1:{harness.listen_port}/"
    try:
        await harness.start(table(blue, green))
        envoy = envoys(harness.xds_port, "delta-envoy")
        await envoy.wait_ready()
        async with aiohttp.ClientSession() as session:

            async def answers(host: str) -> str:
                async with session.get(url, headers={"Host": f"{host}.test"}) as r:
                    return f"{r.status} {await r.text()}"

            first = await synced(harness)
            assert first.resources_sent >= 2 * SERVICES  # everything, once

            # A flip: one ClusterLoadAssignment, in one response.
            assert await harness.publish(table(blue, green, on_green="m7"))
            after = await synced(harness)
            assert after.resources_sent - first.resources_sent == 1
            assert after.responses_sent - first.responses_sent == 1
            assert await answers("m7") == "200 green"

            # An added service: its cluster, its endpoints, the route table.
            before = after
            assert await harness.publish(table(blue, green, on_green="m7", extra="fresh"))
            after = await synced(harness)
            assert after.resources_sent - before.resources_sent == 3
            assert await answers("fresh") == "200 green"

            # A removed service: the route table again, the cluster (and its endpoints,
            # unless Envoy unsubscribed first) as removed_resources; nothing else.
            before = after
            assert await harness.publish(table(blue, green, on_green="m7", extra="fresh",
                                               skip="m3"))
            after = await synced(harness)
            assert after.resources_sent - before.resources_sent in (2, 3)
            assert after.bytes_sent - before.bytes_sent < \
                (before.bytes_sent - first.bytes_sent) * 2  # the route table, not more
            assert not (await answers("m3")).endswith("blue")

            # The control plane restarts with one service changed meanwhile: Envoy
            # reconnects with what it holds and is sent that one resource.
            await harness.stop()
            await wait_until(lambda: not harness.ads.streams(), 5, "the stream closed")
            await harness.start(table(blue, green, on_green="m9", extra="fresh", skip="m3"))
            again = await synced(harness)
            assert again.resources_sent == 2  # m9's endpoints moved; m7's moved back
            assert await answers("m9") == "200 green"
            assert await answers("m7") == "200 blue"
            assert await answers("m1") == "200 blue"
    finally:
        await blue.stop()
        await green.stop()
