"""A real Prometheus scrapes a fleet (2 control planes on a real etcd, 2 activators, one
Envoy) and evaluates every query of the Grafana dashboard and the alert rules of deploy/.

The test drives one sleeping and one active service and one wake, then checks each panel's
value against that, not doubled by the second control plane or activator; then kills both
activators (TorporNoActivator fires on the live server) and both control planes, the
follower first so that the leader has no successor (TorporNoLeader fires). The live server
runs deploy/'s rules with each `for` cut to 2 s (the expressions as they are), so that
they fire within the test; the real `for` durations are covered by promtool's unit tests
(tests/deploy).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.fleet.test_fleet import hibernate
from tests.support.etcd import EtcdServer
from tests.support.fake_kube import FakeKube
from tests.support.fleet import NS, Fleet, send
from tests.support.kube_objects import kube_service_yaml, model_deployment, model_service
from tests.support.net import wait_until
from tests.support.prometheus import Prometheus, Sample, finite
from torpor.metrics import PER_SERVICE_BUCKETS

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "torpor-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"

#: What the test drives: SLEEPY is put to sleep and stays asleep (2 replicas recorded);
#: WOKE is put to sleep and woken by one request (1 replica).
SLEEPY, WOKE = "sleepy", "woke"
#: Grafana's $__rate_interval for the panels that count events: longer than the test, so
#: every counter's whole value is in the window and a count must come out exact.
COUNT_WINDOW = "10m"
#: ... and for the panels that show a rate now: a few scrapes.
RATE_WINDOW = "5s"
RATE_PANELS = {8, 14, 21, 25}


@pytest.fixture
async def fleet(tmp_path: Path, etcd: EtcdServer, kube: FakeKube) -> AsyncIterator[Fleet]:
    kube.create(model_deployment(SLEEPY, NS, replicas=2))
    kube.create(model_service(SLEEPY, NS))
    kube.create(model_deployment(WOKE, NS, replicas=1, load_seconds=1.5))
    kube.create(model_service(WOKE, NS))
    await asyncio.to_thread(kube.wait_for, lambda: len(kube.pod_processes(NS)) == 3)
    fleet = Fleet(tmp_path, etcd, kube, kube_service_yaml(SLEEPY, NS, replicas=2)
                  + kube_service_yaml(WOKE, NS), control_planes=2, activators=2)
    try:
        await fleet.start()
        yield fleet
    finally:
        problems = await fleet.stop()
    assert not problems, problems


def short_for(rules: Path, out: Path) -> Path:
    """deploy/'s rules with every `for:` 2 s: they fire within a test's time."""
    out.write_text(re.sub(r"^(\s*)for: \S+$", r"\1for: 2s", rules.read_text(), flags=re.M))
    return out


@pytest.fixture
async def prometheus(tmp_path: Path, fleet: Fleet) -> AsyncIterator[Prometheus]:
    server = Prometheus(tmp_path, {
        "torpor-control-plane": ("/metrics", [f"127.0.0.1:{fleet.ports(c)['metrics']}"
                                              for c in fleet.cp_configs]),
        "torpor-activator": ("/metrics", [f"127.0.0.1:{fleet.ports(c)['actm']}"
                                          for c in fleet.act_configs]),
        "envoy": ("/stats/prometheus", [f"127.0.0.1:{fleet.envoy_admin}"]),
    }, rules=[short_for(RULES, tmp_path / "rules-short-for.yaml")])
    try:
        server.start()
        await server.wait_ready()
        # Scraping starts some seconds after ready: the drive must come after a first scrape.
        await wait_until(lambda: all_up(server, 5), 30, "every target scraped", 0.25)
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def all_up(server: Prometheus, count: int) -> bool:
    health = await server.targets_up()
    return len(health) == count and all(health.values())


def panel_queries() -> list[tuple[int, str, str, str]]:
    """(panel id, refId, title, expr) of every target of the dashboard."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(p["id"], t["refId"], p["title"], t["expr"])
            for p in board["panels"] for t in p.get("targets", [])]


def grafana(expr: str, window: str) -> str:
    """The expression as Grafana sends it with every service selected."""
    return expr.replace("$__rate_interval", window).replace("$service", ".*")


def by(samples: list[Sample], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.get(label, "") for label in labels): v for s, v in samples}


def upper_bound(seconds: float) -> float:
    """The upper bound of the per-service histogram bucket that holds `seconds`."""
    return next((b for b in PER_SERVICE_BUCKETS if seconds <= b), float("inf"))


Check = Callable[[list[Sample]], str | None]


def exactly(expected: dict[tuple[str, ...], float], *labels: str) -> Check:
    """These series with these values (series at 0 may be left out as absent)."""
    def check(samples: list[Sample]) -> str | None:
        got = {k: v for k, v in by(samples, *labels).items() if v != 0 or k in expected}
        want = {k: v for k, v in expected.items() if v != 0 or k in got}
        return None if got == want else f"want {want}, got {got}"
    return check


def nothing(samples: list[Sample]) -> str | None:
    """No series, or only zeros (nothing of this kind happened)."""
    return None if all(v == 0 for _, v in samples) else f"want nothing, got {samples}"


def expectations(wake_seconds: float, slept: Callable[[], dict[str, float]],
                 ) -> dict[tuple[int, str], Check]:
    """What each panel target must show after the test's drive: (panel id, refId) -> check.
    `wake_seconds`: the woken request's wait as its client saw it; `slept()`: how long each
    service has slept by now."""
    one_wake_within = upper_bound(wake_seconds)

    def quantiles(samples: list[Sample]) -> str | None:
        got = by(samples, "service")
        if set(got) != {(WOKE,)}:
            return f"want {WOKE} only, got {got}"
        value = got[(WOKE,)]
        ok = finite(value) and 0 < value <= one_wake_within
        return None if ok else f"want 0 < {value} <= {one_wake_within} (client: {wake_seconds})"

    def ledger_rate(samples: list[Sample]) -> str | None:
        got = by(samples, "service")  # 2 replicas of SLEEPY not running: 2 replica-s per s
        value = got.get((SLEEPY,), 0.0)
        return None if 1.5 <= value <= 2.5 and got.get((WOKE,), 0.0) <= 1 else \
            f"want {SLEEPY} ~2 replica-s/s (asleep the whole window), {WOKE} <= 1: {got}"

    def hours_saved(samples: list[Sample]) -> str | None:
        got = by(samples, "service")
        asleep = slept()  # x its recorded replicas (+1 s: a ledger tick's rounding)
        limits = {SLEEPY: 2 * (asleep[SLEEPY] + 1) / 3600, WOKE: 1 * (asleep[WOKE] + 1) / 3600}
        for name, limit in limits.items():
            value = got.get((name,), 0.0)
            if not 0 < value <= limit:
                return f"{name}: want 0 < {value} <= {limit} (asleep {asleep[name]:.1f}s)"
        return None

    def calls(samples: list[Sample]) -> str | None:
        got = by(samples, "service")
        return None if got.get((WOKE,), 0) > 0 and got.get((SLEEPY,), 0) == 0 else \
            f"want calls of {WOKE} only: {got}"

    def endpoints_only(samples: list[Sample]) -> str | None:
        """Hibernating and waking change endpoints only (EDS), never clusters or routes."""
        got = by(samples, "type")
        others = {k: v for k, v in got.items() if k != ("eds",) and v != 0}
        return None if got.get(("eds",), 0) > 0 and not others else \
            f"want EDS updates only: {got}"

    def finite_quantile(samples: list[Sample]) -> str | None:
        return None if len(samples) == 1 and finite(samples[0][1]) and samples[0][1] > 0 \
            else f"want one finite quantile: {samples}"

    def no_forbidden(samples: list[Sample]) -> str | None:
        return None if ("403",) not in by(samples, "status") else f"RBAC refused: {samples}"

    def envoy_2xx(samples: list[Sample]) -> str | None:
        return None if by(samples, "envoy_response_code_class").get(("2",), 0) > 0 else \
            f"want Envoy's 2xx responses: {samples}"

    states: dict[tuple[str, ...], float] = {
        ("ACTIVE",): 1.0, ("HIBERNATED",): 1.0, ("WAKING",): 0.0, ("HIBERNATING",): 0.0,
        ("EVICTED",): 0.0}
    return {
        (2, "A"): exactly(states, "state"),
        (3, "A"): exactly({(): 2.0}),
        (4, "A"): nothing,
        (5, "A"): exactly({(): 1.0}),
        (7, "A"): exactly({(SLEEPY,): 4.0, (WOKE,): 1.0}, "service"),  # HIBERNATED, ACTIVE
        (8, "A"): calls,
        (9, "A"): exactly({(SLEEPY,): 0.0, (WOKE,): 1.0}, "service"),
        (9, "B"): exactly({(): 2.0}),
        (11, "A"): exactly({(WOKE, "woken"): 1.0}, "service", "outcome"),
        (12, "A"): quantiles, (12, "B"): quantiles, (12, "C"): quantiles,
        (13, "A"): nothing,
        (14, "A"): nothing, (14, "B"): nothing,
        (21, "A"): ledger_rate,
        (22, "A"): exactly({(WOKE,): 1.0}, "service"),
        (22, "B"): nothing,
        (23, "A"): quantiles, (23, "B"): quantiles,
        (24, "A"): hours_saved,
        (16, "A"): endpoints_only, (16, "B"): endpoints_only, (16, "C"): nothing,
        (17, "A"): finite_quantile, (17, "B"): finite_quantile,
        (18, "A"): exactly({(SLEEPY,): 1.0, (WOKE,): 1.0}, "service"),
        (18, "B"): nothing, (18, "C"): nothing,
        (19, "A"): no_forbidden,
        (25, "A"): envoy_2xx,
    }


async def raw_series(prometheus: Prometheus, expr: str) -> str:
    """The scraped series behind `expr`, per process (why a panel shows what it shows)."""
    names = sorted(set(re.findall(r"\b((?:torpor|envoy)_[a-z_]+?)(?:_bucket)?\b", expr)))
    found = []
    for name in names:
        for labels, value in await prometheus.query(f'{{__name__=~"{name}(_count)?"}}'):
            found.append(f"{labels.get('instance')} {name} {dict(sorted(labels.items()))} {value}")
    return "\n      ".join(found) or "nothing"


async def keep_calling(fleet: Fleet, host: str, stop: asyncio.Event) -> None:
    """A request every 0.2 s, so that the calls panels have a rate now."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            code, _, _ = await send(session, fleet, host, timeout=30)
            assert code == 200, code
            await asyncio.sleep(0.2)


async def test_dashboard_and_alerts_on_a_fleet_of_two(fleet: Fleet,
                                                     prometheus: Prometheus) -> None:
    asleep_since = {}
    for name in (SLEEPY, WOKE):
        asleep_since[name] = time.monotonic()  # it sleeps from after this
        await hibernate(fleet, name)
    async with aiohttp.ClientSession() as session:  # the one wake
        code, _, wake_seconds = await send(session, fleet, f"{WOKE}.localhost")
    assert code == 200
    await fleet.wait_state(WOKE, "ACTIVE", 10)
    woken_at = time.monotonic()

    def slept() -> dict[str, float]:
        """Seconds each service has slept by now (an upper bound: from before the
        hibernate call returned to after the wake)."""
        return {SLEEPY: time.monotonic() - asleep_since[SLEEPY],
                WOKE: woken_at - asleep_since[WOKE]}

    assert set(await prometheus.rule_groups()) >= {"torpor.fleet", "torpor.wakes"}
    checks = expectations(wake_seconds, slept)
    queries = panel_queries()
    assert {(panel, ref) for panel, ref, _, _ in queries} == set(checks), \
        "every dashboard query needs its expected value here"

    failures: dict[str, str] = {}

    async def all_as_driven() -> bool:
        failures.clear()
        for panel, ref, title, expr in queries:
            window = RATE_WINDOW if panel in RATE_PANELS else COUNT_WINDOW
            problem = checks[(panel, ref)](await prometheus.query(grafana(expr, window)))
            if problem:
                failures[f"{title} [{ref}]: {grafana(expr, window)}"] = \
                    problem + "\n    scraped: " + await raw_series(prometheus, expr)
        return not failures

    stop = asyncio.Event()
    calling = asyncio.create_task(keep_calling(fleet, f"{WOKE}.localhost", stop))
    started = time.monotonic()
    try:
        await wait_until(all_as_driven, 45, "every panel shows what the test drove", 0.5)
    except AssertionError:
        raise AssertionError("panels that do not show what the test drove:\n" + "\n".join(
            f"- {where}\n    {problem}" for where, problem in failures.items())) from None
    finally:
        stop.set()
        await calling
    print(f"\nevery panel as driven after {time.monotonic() - started:.1f}s "
          f"(the wake: {wake_seconds:.2f}s at the client)")

    # Each service fact comes from one process: the leader (no activator, no follower).
    for metric in ("torpor_service_state", "torpor_service_replicas", "torpor_replicas_saved"):
        exporters = await prometheus.query(f"count by (service) (count by (service, instance) "
                                           f"({metric}))")
        assert by(exporters, "service") == {(SLEEPY,): 1, (WOKE,): 1}, (metric, exporters)
    assert await prometheus.query('torpor_service_state{job="torpor-activator"}') == []
    per_service = by(await prometheus.query(
        'count by (service) ({__name__=~"torpor_.+", service=~".+"})'), "service")
    # The per-service histograms' budget (README "Metrics"): 6 buckets + Inf + sum + count,
    # once per outcome and process that observed it; one wake, so once.
    for histogram in ("torpor_wake_duration_seconds", "torpor_cold_start_seconds"):
        series = await prometheus.query(f'count({{__name__=~"{histogram}_(bucket|sum|count)", '
                                        f'service="{WOKE}"}})')
        assert series == [({}, len(PER_SERVICE_BUCKETS) + 3)], (histogram, series)
    print(f"series per service (README: 39 for one that slept and woke, 12 asleep): "
          f"{per_service}")

    # Alerts: none of the fleet's while it is whole.
    async def quiet() -> bool:
        return not {"TorporNoActivator", "TorporNoLeader"} & set(await prometheus.alerts())

    await wait_until(quiet, 15, "no fleet alert while the fleet is whole", 0.25)

    # Zero activators: both killed (-9, no clean-up).
    for proc in fleet.activators:
        proc.kill()

    async def alert(name: str) -> bool:
        return (await prometheus.alerts()).get(name) == "firing"

    await wait_until(lambda: alert("TorporNoActivator"), 20, "TorporNoActivator on the server",
                     0.25)

    # A killed leader with no successor: the follower goes first, then the leader.
    leader = await fleet.holder("leader/reconciler")
    assert leader in ("cp0", "cp1"), leader
    for proc in sorted(fleet.control_planes, key=lambda p: p.name == leader):
        proc.kill()
    await wait_until(lambda: alert("TorporNoLeader"), 20, "TorporNoLeader on the server", 0.25)
