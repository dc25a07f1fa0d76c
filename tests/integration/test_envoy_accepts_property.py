"""Property: whatever torpor's config loader, annotation parser and validator accept, a
real Envoy accepts (ACK, never NACK).

One Envoy for the whole property, fed by the test ADS harness (tests/support/xds.py).
Hypothesis generates config files (services with hosts, replicas, protocol and policy
values; gateway and activator values that reach Envoy: gateway.routing (both ways),
wake_timeout → route timeout, max_held_per_service → circuit breakers, retry buffer,
header limits), Deployment
annotations, and the endpoints the workloads report. What the loader or parser refuses is
counted and dropped; the rest goes through the QuarantineBuilder (the validator leaves out
what it refuses) and is pushed; Envoy must apply it. Reproducible: derandomized, no
example database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.envoy import Envoy
from tests.support.xds import XdsHarness
from torpor.catalog import CatalogConflictError, ServiceCatalog
from torpor.config import ServiceConfig, load_config
from torpor.errors import ConfigError
from torpor.model import Endpoint
from torpor.workloads.annotations import AnnotationError, service_from_deployment
from xds_server.quarantine import QuarantineBuilder
from xds_server.resources import RoutedService
from xds_server.routing import gateway_settings

pytestmark = pytest.mark.envoy

EXAMPLES = 200

# --- strategies: plausible values, and in some examples one odd value a rule must catch --

#: The values a config may get wrong; an example makes at most one of them odd (one odd
#: value is enough for the loader to refuse the whole file, so more would waste examples).
SLOTS = ("name", "host", "protocol", "replicas", "duration", "retry_buffer", "headers_kb",
         "max_held", "rate", "concurrent", "paths", "extra_host", "rewrite")
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_ODD_HOSTS = st.sampled_from([
    "*", "*.x.test", "x.*", "*.*.x", "A.Test", "a..test", "-a.test", "a.test:8080", "a test",
    "é.test", "", "x" * 64 + ".test", ".".join(["abc"] * 70), "a/b", "a\tb"])
HOSTS = st.builds(lambda labels, dot: ".".join(labels) + dot,
                  st.lists(_LABEL, min_size=1, max_size=4), st.sampled_from(["", "", "", "."]))
DURATIONS = st.one_of(
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(1, 10**4),
              st.sampled_from(["ms", "s", "m", ""])),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(1, 366), st.sampled_from(["h", "d"])))
VALID: dict[str, st.SearchStrategy[Any]] = {
    "name": _LABEL,
    "host": HOSTS,
    "protocol": st.sampled_from(["http1", "http2"]),
    "replicas": st.integers(0, 64),
    "duration": DURATIONS,
    "retry_buffer": st.integers(0, 64 * 1024 * 1024),
    "headers_kb": st.integers(1, 8192),
    "max_held": st.integers(1, 1_000_000),
    "rate": st.integers(1, 1_000_000),
    "paths": st.lists(st.sampled_from(["/v1", "/v1/models", "/a-b/c_d", "/x.y", "/%20"]),
                      min_size=1, max_size=3, unique=True),
    "extra_host": st.one_of(HOSTS, st.builds(lambda h: "*." + h, HOSTS)),
    "rewrite": st.sampled_from(["/", "/api", "/a/b/"]),
    "concurrent": st.integers(1, 1_000_000),
}
ODD: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["Echo", "a_b", "-x", "x" * 64, "torpor_activator"]),
    "host": _ODD_HOSTS,
    "protocol": st.sampled_from(["h3", "HTTP2"]),
    "replicas": st.sampled_from([-1, 65, 10**6]),
    "duration": st.sampled_from(["0", "-1s", "1e300", "1.5s", ".5s", "366d", "367d", "10 m",
                                 "1h30m", "31622400", "0.001ms"]),
    "retry_buffer": st.sampled_from([-1, 64 * 1024 * 1024 + 1]),
    "headers_kb": st.sampled_from([0, 8193]),
    "max_held": st.sampled_from([0, 1_000_001]),
    "rate": st.sampled_from([0, -5, 1_000_001, "ten"]),
    "paths": st.sampled_from([["v1"], ["/v1/"], ["/a?b"], ["/a b"], [], ["/v1", "/v1"]]),
    "extra_host": st.sampled_from(["*", "a.*.b", "*x.test", "-a.test"]),
    "rewrite": st.sampled_from(["", "x", "/a?b"]),
    "concurrent": st.sampled_from([0, 1_000_001]),
}
PROTOCOLS = st.one_of(VALID["protocol"], ODD["protocol"])
ENDPOINTS = st.lists(st.builds(
    Endpoint,
    st.sampled_from(["127.0.0.1", "10.1.2.3", "::1", "192.0.2.200", "pod-a.models.svc"]),
    st.integers(0, 65535)), max_size=3)


@st.composite
def config_text(draw: st.DrawFn) -> str:
    odd = draw(st.sampled_from([*SLOTS, *[None] * len(SLOTS)]))

    def value(slot: str) -> Any:
        return draw(ODD[slot] if slot == odd and draw(st.booleans()) else VALID[slot])

    def unique(slot: str, index: int) -> str:
        """Mostly distinct across services (a duplicate is refused; sometimes allowed)."""
        text = str(value(slot))
        if slot != odd and draw(st.integers(0, 9)) != 0:
            text = f"s{index}-{text}" if slot == "name" else f"s{index}.{text}"
        return text

    def service(index: int) -> str:
        lines = [f"  - name: {unique('name', index)!r}",
                 f"    host: {unique('host', index)!r}",
                 f"    replicas: {value('replicas')}", f"    protocol: {value('protocol')!r}"]
        if draw(st.booleans()):
            lines.append(f"    policy: {{idle_after: {value('duration')!r}}}")
        if draw(st.booleans()):
            lines.append(f"    rate_limit: {{requests_per_second: {value('rate')!r}, "
                         f"burst: {value('rate')!r}}}")
        if draw(st.booleans()):
            lines.append(f"    max_concurrent: {value('concurrent')!r}")
        if draw(st.booleans()):
            lines.append(f"    hosts: [{value('extra_host')!r}]")
        if draw(st.booleans()):
            lines.append(f"    paths: {value('paths')!r}")
            if draw(st.booleans()):
                lines.append(f"    rewrite: {value('rewrite')!r}")
        lines += ["    local:", "      command: [python, -m, torpor.examples.model_server,"
                  " --port, '{port}']", "      ready_path: /healthz"]
        return "\n".join(lines) + "\n"

    services = [service(i) for i in range(draw(st.integers(1, 4)))]
    routing = draw(st.sampled_from(["", "routing: host_header, "]))
    return f"""
gateway: {{{routing}listen: 127.0.0.1:1, admin: 127.0.0.1:2,
          retry_buffer_bytes: {value('retry_buffer')},
          max_request_headers_kb: {value('headers_kb')}}}
control_plane: {{xds: 127.0.0.1:3, admin_api: 127.0.0.1:4, metrics: 127.0.0.1:5}}
activator: {{listen: 127.0.0.1:6, metrics: 127.0.0.1:7, listen_h2: 127.0.0.1:8,
            wake_timeout: {value('duration')!r}, max_held_per_service: {value('max_held')}}}
store: {{kind: sqlite, path: ./state.db}}
workloads: {{kind: local}}
policy: {{idle_after: {value('duration')!r}, evict_after: {value('duration')!r}}}
services:
{"".join(services)}"""


ANNOTATIONS = st.dictionaries(
    st.sampled_from(["torpor.io/host", "torpor.io/name", "torpor.io/protocol",
                     "torpor.io/idle-after", "torpor.io/evict-after", "torpor.io/port",
                     "torpor.io/never-sleep", "torpor.io/policy"]),
    st.one_of(HOSTS, _ODD_HOSTS, DURATIONS, ODD["duration"], PROTOCOLS,
              st.sampled_from(["8080", "0", "true", "fixed"])),
    max_size=4)


def deployment(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "models",
                         "labels": {"torpor.io/enabled": "true"}, "annotations": annotations},
            "spec": {"template": {"spec": {"containers": [
                {"name": "model", "ports": [{"name": "http", "containerPort": 8080}]}]}}}}


# --- the property --------------------------------------------------------------------


async def test_what_torpor_accepts_envoy_accepts(
    envoys: Callable[[int, str], Envoy],
) -> None:
    activator = Endpoint("127.0.0.1", 9)
    harness = XdsHarness(activator)
    await harness.start([])
    envoy = envoys(harness.xds_port, "property")
    loop = asyncio.get_running_loop()
    seen: Counter[str] = Counter()
    try:
        await envoy.wait_ready()

        async def push(services: list[RoutedService], settings_of: Any) -> list[str]:
            """Build as the control plane does, push, and return what Envoy refused."""
            builder = QuarantineBuilder(dataclasses.replace(
                settings_of, listen=harness.settings.listen))
            snapshot = harness.cache.set_resources(builder.build(services))
            await harness.ads.wait_synced(snapshot.version, 10.0)
            seen["quarantined"] += len(builder.quarantined())
            refused = [f"{r.type_url}: {r.error}" for r in harness.ads.rejections()
                       if r.version == snapshot.version]
            assert not harness.ads.lagging(snapshot.version) or refused, "Envoy never answered"
            return refused

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(text=config_text(),
               discovered=st.lists(ANNOTATIONS, max_size=2),
               endpoints=st.lists(ENDPOINTS, min_size=6, max_size=6))
        def check(text: str, discovered: list[dict[str, str]],
                  endpoints: list[list[Endpoint]]) -> None:
            seen["examples"] += 1
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "torpor.yaml"
                path.write_text(text)
                try:
                    config = load_config(path)
                except ConfigError:
                    seen["config refused"] += 1
                    return
            catalog = ServiceCatalog(config.services)
            for index, annotations in enumerate(discovered):
                try:
                    found: ServiceConfig = service_from_deployment(
                        deployment(f"found{index}", annotations))
                    catalog.put(found, f"deployment/models/found{index}")
                except (AnnotationError, CatalogConflictError):
                    seen["annotations refused"] += 1
            routed = [RoutedService(
                s.name, s.host, tuple(endpoints[i % len(endpoints)]),
                http2=s.protocol == "http2", max_concurrent=s.max_concurrent,
                hosts=s.hosts, paths=s.paths, rewrite=s.rewrite,
                rate_limit=(None if s.rate_limit is None else
                            (s.rate_limit.requests_per_second, s.rate_limit.bucket)))
                for i, s in enumerate(catalog.services())]
            settings_of = gateway_settings(config, (activator, Endpoint("127.0.0.1", 10)))
            refused = asyncio.run_coroutine_threadsafe(push(routed, settings_of),
                                                       loop).result(60)
            seen["pushed"] += 1
            assert not refused, f"Envoy refused what torpor accepted: {refused}\n{text}"

        await asyncio.to_thread(check)
    finally:
        await harness.stop()
    print(f"property examples: {dict(seen)}")
    assert seen["examples"] >= EXAMPLES
    assert seen["pushed"] >= EXAMPLES // 4, dict(seen)  # enough reach Envoy to mean much
