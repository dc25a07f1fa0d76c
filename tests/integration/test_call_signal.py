"""Calling statistics from Envoy's request counters (xds_server/stats_sink.py), through a
real Envoy: what the control plane counts agrees with the requests the test sent, and the
access log is left to the catch-all (evicted services, unknown hosts).

Envoy flushes its counters every second here (the stated resolution of last_call is one
flush interval); every flush carries all counters at once, so once a marker request sent
after the others is counted, every earlier request's flush has arrived too, and the counts
can be compared exactly (an extra access-log entry per request would double them)."""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.backends import Backend, start_backends
from tests.support.envoy import Envoy, stop_envoy
from tests.support.net import free_port, wait_until
from tests.support.xds import XdsHarness, hibernated, svc
from torpor.call_stats import HOURS_PER_WEEK, Window, hour_of_week
from torpor.config import load_config
from torpor.errors import ConfigError
from xds_server import stats_sink
from xds_server.bootstrap import bootstrap
from xds_server.stats_sink import calls_from

FLUSH = 1.0
#: How late a flush may come after its interval ends on a loaded machine (Envoy's timer).
FLUSH_LAG = 1.0


@pytest.fixture
def code_stats() -> bool:
    """gateway.upstream_code_stats (GatewaySettings.upstream_code_stats): off by default."""
    return False


@pytest.fixture
async def harness(activator_backend: Backend, code_stats: bool) -> AsyncIterator[XdsHarness]:
    h = XdsHarness(activator_backend.endpoint, upstream_code_stats=code_stats)
    yield h
    await h.stop()


@pytest.fixture
async def envoy(tmp_path: Path, harness: XdsHarness) -> AsyncIterator[Envoy]:
    backend, = await start_backends("awake")
    await harness.start([svc("awake", backend.endpoint), svc("marker", backend.endpoint),
                         hibernated(harness, "sleepy")])
    started = Envoy(tmp_path, "signal", free_port(), harness.xds_port, stats_flush=FLUSH)
    started.start()
    try:
        await started.wait_ready()
        yield started
    finally:
        await stop_envoy(started)
        await backend.stop()


async def call(session: aiohttp.ClientSession, port: int, host: str, times: int) -> None:
    for _ in range(times):
        async with session.get(f"http://127.0.0.1:{port}/v1/predict",
                               headers={"Host": host}) as r:
            await r.read()
            assert r.status == 200, (host, r.status)


async def test_counts_from_envoys_counters_agree_with_the_requests_sent(
    harness: XdsHarness, envoy: Envoy, activator_backend: Backend
) -> None:
    collector = harness.collector
    created = time.time() - 3600
    for name in ("awake", "sleepy", "evicted", "marker"):
        collector.ensure(name, created_at=created)
    collector.set_hosts({f"{n}.test": n for n in ("awake", "sleepy", "evicted", "marker")})
    port = harness.listen_port
    started = time.time()
    async with aiohttp.ClientSession() as session:
        await call(session, port, "awake.test", 7)
        last_awake = time.time()
        await call(session, port, "sleepy.test", 3)      # held: its cluster → the activator
        await call(session, port, "evicted.test", 2)     # no route: the catch-all
        await call(session, port, "stranger.test", 2)    # nobody's host: the catch-all
        await call(session, port, "marker.test", 1)
    await wait_until(lambda: collector.last_call("marker") is not None, 20,
                     "the marker's flush")

    def total(name: str) -> int:
        stats = collector.stats(name)
        return 0 if stats is None else stats.total

    await wait_until(lambda: collector.unknown_hosts.get("stranger.test", 0) >= 2
                     and total("evicted") >= 2, 20, "the catch-all's access log")
    now = time.time()

    awake = collector.stats("awake")
    assert awake is not None
    assert awake.total == 7
    assert awake.calls_in(Window.MINUTE, now) == 7
    assert awake.calls_in(Window.HOUR, now) == 7
    assert awake.calls_in(Window.DAY, now) == 7
    # last call: at the flush that carried it, within one flush interval of the request
    assert awake.last_call is not None
    assert started <= awake.last_call <= last_awake + FLUSH + FLUSH_LAG
    hours = {hour_of_week(started), hour_of_week(now)}
    assert sum(awake.by_hour_of_week) == 7
    assert all(count == 0 or hour in hours for hour, count in enumerate(awake.by_hour_of_week))
    assert len(awake.by_hour_of_week) == HOURS_PER_WEEK

    sleepy = collector.stats("sleepy")  # held by the activator, counted by its own cluster
    assert sleepy is not None and sleepy.total == 3
    assert activator_backend.requests == 3 + 2 + 2
    evicted = collector.stats("evicted")  # counted from the catch-all's access log by Host
    assert evicted is not None and evicted.total == 2
    assert collector.unknown_hosts == {"stranger.test": 2}
    marker = collector.stats("marker")
    assert marker is not None and marker.total == 1


@pytest.mark.parametrize("code_stats", [False, True], ids=["code-stats-off", "code-stats-on"])
async def test_envoy_keeps_only_the_statistics_torpor_and_users_read(
    harness: XdsHarness, envoy: Envoy, code_stats: bool
) -> None:
    async with aiohttp.ClientSession() as session:
        await call(session, harness.listen_port, "awake.test", 1)
        async with session.get(f"http://127.0.0.1:{harness.listen_port}/v1/predict",
                               headers={"Host": "awake.test"}) as r:
            await r.read()
            # the router adds no x-envoy-* header of its own (suppress_envoy_headers)
            assert r.status == 200 and r.headers["x-backend"] == "awake"
            assert not [h for h in r.headers if h.lower().startswith("x-envoy-")], r.headers
    _, text = await envoy.admin_get("/stats")
    counters = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    names = set(counters)
    # what torpor counts calls by is there either way
    assert counters["cluster.awake.upstream_rq_total"] == "2"
    assert "cluster.awake.upstream_rq_retry" in names
    assert "cluster.awake.upstream_rq_pending_overflow" in names
    assert counters["http.torpor.downstream_rq_2xx"] == "2"
    # each service's answer classes only when gateway.upstream_code_stats asks for them
    assert ("cluster.awake.upstream_rq_2xx" in names) is code_stats
    if code_stats:
        assert counters["cluster.awake.upstream_rq_2xx"] == "2"
    assert not {n for n in names if n.startswith("cluster.awake.")
                and n.removeprefix("cluster.awake.") in ("upstream_cx_total", "upstream_rq_200",
                                                         "membership_total", "upstream_rq_time",
                                                         "lb_healthy_panic")}
    # torpor's own clusters and everything not per cluster are kept whole; a cluster's
    # traffic statistics are made on its first request (deferred_stat_options), and no
    # request went to the activator here
    assert "cluster.torpor_activator.membership_total" in names
    assert "http.torpor.downstream_rq_total" in names
    assert "cluster_manager.cds.update_success" in names
    assert "server.live" in names


# --- pure parts --------------------------------------------------------------------------


def family(name: str, value: float, at_ms: int = 1_700_000_000_000) -> Any:
    message = stats_sink.StreamMetricsMessage()
    f = message.envoy_metrics.add(name=name)
    m = f.metric.add(timestamp_ms=at_ms)
    m.counter.value = value
    return f


def test_a_flush_counts_attempts_minus_retries() -> None:
    owed: dict[str, int] = {}
    calls, at = calls_from([family("cluster.a.upstream_rq_total", 5),
                            family("cluster.a.upstream_rq_retry", 2),
                            family("cluster.b.upstream_rq_total", 0),
                            family("cluster.a.upstream_rq_2xx", 5),
                            family("cluster.c.upstream_cx_none_healthy", 2),
                            family("cluster.c.upstream_rq_pending_overflow", 1),
                            family("http.torpor.downstream_rq_total", 9)], owed)
    assert calls == {"a": 3, "c": 3} and at == 1_700_000_000.0 and owed == {}
    # a retry counted before its attempt: owed, then settled by the next flush
    calls, _ = calls_from([family("cluster.a.upstream_rq_retry", 1)], owed)
    assert calls == {} and owed == {"a": 1}
    calls, _ = calls_from([family("cluster.a.upstream_rq_total", 3)], owed)
    assert calls == {"a": 2} and owed == {}
    assert calls_from([], owed) == ({}, None)


def test_requests_refused_429_are_calls_and_counted_by_reason() -> None:
    """A rate-limited request never reaches its service's cluster: it is a call all the
    same (demand the policy must see), and counted as refused by its reason."""
    families = [family("torpor_rate_limit_a.http_local_rate_limit.rate_limited", 4),
                family("torpor_rate_limit_a.http_local_rate_limit.ok", 6),
                family("cluster.a.upstream_rq_total", 6),
                family("cluster.b.upstream_rq_pending_overflow", 2),
                family("torpor_rate_limit.http_local_rate_limit.rate_limited", 0)]
    calls, _ = calls_from(families, {})
    assert calls == {"a": 10, "b": 2}
    assert stats_sink.refusals_from(families) == {("a", "rate"): 4, ("b", "concurrency"): 2}


def test_the_matcher_keeps_everything_not_per_cluster() -> None:
    patterns = stats_sink.envoy_stats()["stats_config"]["stats_matcher"]["inclusion_list"][
        "patterns"]
    regexes = [re.compile(p["safe_regex"]["regex"]) for p in patterns if "safe_regex" in p]

    def kept(name: str) -> bool:
        return name.startswith("cluster.torpor_") or any(r.fullmatch(name) for r in regexes)

    for name in ("server.live", "http.torpor.downstream_rq_total", "clusterx",
                 "cluster_manager.active_clusters", "cluster.torpor_xds.upstream_cx_total",
                 "cluster.svc.upstream_rq_total", "cluster.svc.upstream_rq_retry",
                 "cluster.svc.upstream_rq_5xx"):
        assert kept(name), name
    for name in ("cluster.svc.upstream_cx_total", "cluster.svc.upstream_rq_503",
                 "cluster.svc.upstream_rq_total_x", "cluster.svc.lb_healthy_panic"):
        assert not kept(name), name


#: The smallest config with one service, for the tests of settings below.
ECHO_CONFIG = """
    services:
      - name: echo
        host: echo.localhost
        local: {command: [python, -m, torpor.examples.model_server, --port, "{port}"]}
    """

def test_the_flush_interval_is_configured_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "torpor.yaml"
    base = ECHO_CONFIG
    path.write_text(textwrap.dedent(base + "gateway: {stats_flush_interval: 2s}\n"))
    config = load_config(path)
    assert config.gateway.stats_flush_interval == 2.0
    boot = bootstrap("n", config.gateway.admin, config.control_plane.xds,
                     stats_flush=config.gateway.stats_flush_interval)
    assert boot["stats_flush_interval"] == "2s"
    for bad in ("0s", "0.5", "2m"):
        path.write_text(textwrap.dedent(base + f"gateway: {{stats_flush_interval: {bad}}}\n"))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert "gateway.stats_flush_interval" in str(info.value)
        assert "from 1s to 60s" in str(info.value)


def test_upstream_code_stats_is_a_gateway_setting_off_by_default(tmp_path: Path) -> None:
    """gateway.upstream_code_stats reaches the router's dynamic_stats; a non-boolean is a
    config error."""
    from torpor.model import Endpoint
    from xds_server.routing import gateway_settings

    path = tmp_path / "torpor.yaml"
    base = ECHO_CONFIG
    activator = (Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2))
    path.write_text(textwrap.dedent(base))
    assert gateway_settings(load_config(path), activator).upstream_code_stats is False
    path.write_text(textwrap.dedent(base + "gateway: {upstream_code_stats: true}\n"))
    assert gateway_settings(load_config(path), activator).upstream_code_stats is True
    path.write_text(textwrap.dedent(base + "gateway: {upstream_code_stats: sometimes}\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "gateway.upstream_code_stats" in str(info.value)
