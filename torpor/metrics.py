"""Every Prometheus metric torpor exports, defined once (prefix `torpor_`).

Owns metric names, labels and help texts, so that dashboards and alert rules have one
place to check against. Components import the objects they update; nothing else here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.metrics_core import Metric

from torpor.errors import TorporError
from torpor.model import ServiceState

# No `_created` series beside every counter and histogram: nothing reads them, and at
# 10,000 services they would be a quarter of all series (the budget: README "Metrics").
disable_created_metrics()

# --- who exports what, so that sums over a fleet count each fact once ----------------------
# Every control plane of a fleet watches the same store and workloads, so each knows every
# service's state, replicas and endpoints, and an activator knows the states of the wakes it
# ran. Were each to export them, a dashboard summing over instances would count a service
# once per process (2 control planes: an ACTIVE service's timeline value 2). So these
# "service facts" are exported by one process only: the one `export_service_facts` names
# (the leader of the reconciler election; a control plane without a fleet). Every process
# keeps the values current (a follower that becomes leader exports them at once); only the
# owner's /metrics shows them. Events (counters, histograms) are counted by the one process
# that saw them (its own Envoys' calls, the wakes it ran), so their sums are right as they are.

_service_facts_owner: Callable[[], bool] | None = None
_running_replicas: Callable[[], Mapping[str, int]] | None = None


def export_service_facts(owner: Callable[[], bool] | None,
                         replicas: Callable[[], Mapping[str, int]] | None = None) -> None:
    """From now on this process exports the service facts while `owner()` is true (None:
    never, the default: an activator, a stopped control plane). `replicas()`: the replicas
    running now per service, read at each scrape (a Deployment's count changes after its
    endpoints did, with no event of its own). It runs on the metrics server's thread: it
    must only read."""
    global _service_facts_owner, _running_replicas
    _service_facts_owner = owner
    _running_replicas = replicas


def exports_service_facts() -> bool:
    owner = _service_facts_owner
    return owner is not None and owner()


class LeaderGauge(Gauge):  # type: ignore[misc]
    """A gauge of a service fact: on /metrics only while this process owns service facts."""

    def collect(self) -> Iterable[Metric]:
        return super().collect() if exports_service_facts() else []


class ReplicasGauge(LeaderGauge):
    """torpor_service_replicas: read from the workloads at each scrape, when they can be."""

    def collect(self) -> Iterable[Metric]:
        replicas = _running_replicas
        if replicas is not None and exports_service_facts():
            try:
                counts = replicas()
            except Exception:  # a failing read keeps the last values; /metrics stays up
                counts = {}
            for service, count in counts.items():
                self.labels(service=service).set(count)
        return super().collect()


class SetGauge(Gauge):  # type: ignore[misc]
    """A gauge that appears on /metrics only once it has been set (a gauge without labels
    would show 0 in every process, including those that never measure it)."""

    _was_set = False

    def set(self, value: float) -> None:
        self._was_set = True
        super().set(value)

    def collect(self) -> Iterable[Metric]:
        return super().collect() if self._was_set else []


XDS_PUSHES = Counter("torpor_xds_pushes", "xDS responses sent to Envoys", ["type"])
XDS_ACKS = Counter("torpor_xds_acks", "xDS responses acknowledged by Envoys", ["type"])
XDS_NACKS = Counter("torpor_xds_nacks", "xDS responses rejected by Envoys (NACK)", ["type"])
SERVICE_QUARANTINED = Gauge(
    "torpor_service_quarantined",
    "1 while a service is left out of Envoy's config (or held at its last good config) "
    "because Envoy refused it or would (torpor status shows why)", ["service"])
XDS_CONFIG_REJECTED = Gauge(
    "torpor_xds_config_rejected",
    "1 while a connected Envoy rejects the current config and no quarantine resolved it "
    "(the control plane reports not ready)")
XDS_STALE_NONCES = Counter(
    "torpor_xds_stale_nonces", "xDS requests ignored because their nonce was stale", ["type"]
)
XDS_PUSH_DURATION = Histogram(
    "torpor_xds_push_duration_seconds",
    "From a new snapshot to every connected Envoy having applied it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
XDS_CONNECTED_ENVOYS = Gauge("torpor_xds_connected_envoys", "Envoy ADS streams connected now")
XDS_SNAPSHOT_VERSION = Gauge("torpor_xds_snapshot_version", "Version of the current snapshot")
XDS_RESOURCES = Gauge("torpor_xds_resources", "Resources in the current snapshot", ["type"])

SERVICE_STATE = LeaderGauge(
    "torpor_service_state",
    "1 for the state a service is in, 0 for the others (exported by the leader only)",
    ["service", "state"],
)
SERVICE_REPLICAS = ReplicasGauge("torpor_service_replicas",
                                 "Replicas running now (exported by the leader only)",
                                 ["service"])
REPLICAS_SAVED = LeaderGauge(
    "torpor_replicas_saved",
    "Replicas not running because torpor put the service to sleep (its recorded count while "
    "HIBERNATED or EVICTED, else 0; exported by the leader only)", ["service"],
)
SERVICE_READY_ENDPOINTS = LeaderGauge(
    "torpor_service_ready_endpoints", "Ready endpoints of a service (exported by the leader "
    "only)", ["service"]
)
REQUESTS_SEEN = Counter(
    "torpor_requests_seen", "Requests Envoy reported in its access log, per service", ["service"]
)
LAST_REQUEST = Gauge(
    "torpor_last_request_timestamp_seconds", "Unix time of the last request seen (each "
    "control plane: its own Envoys' and, within a stats flush, its peers'; take the max)",
    ["service"]
)
UNKNOWN_HOST_REQUESTS = Counter(
    "torpor_unknown_host_requests", "Requests for hosts that are not in the service table"
)

SERVICE_TRANSITIONS = Counter(
    "torpor_service_transitions", "State changes of a service, by the state entered",
    ["service", "to_state"],
)
HIBERNATIONS = Counter("torpor_hibernations", "Completed hibernations (scaled to zero)",
                       ["service"])
EVICTIONS = Counter("torpor_evictions", "Services whose route was removed (EVICTED)",
                    ["service"])
HIBERNATE_FAILURES = Counter(
    "torpor_hibernate_failures",
    "Hibernations abandoned (an Envoy did not ACK the flip, or scaling failed)", ["service"],
)
POLICY_CHECKS = Counter("torpor_policy_checks", "Reconciler passes over the service table")
POLICY_PREWAKES = Counter(
    "torpor_policy_prewakes", "Pre-wakes the learning policy started ahead of a predicted call",
    ["service"],
)
CALL_STATS_FLUSHES = Counter(
    "torpor_call_stats_flushes", "Flushes of calling statistics to the store", ["outcome"]
)
CONFIG_RELOADS = Counter(
    "torpor_config_reloads",
    "Config reloads (SIGHUP or a changed file), by result: applied (something changed), "
    "unchanged, or failed (the file is invalid: the running config stays)", ["result"],
)

HELD_REQUESTS = Gauge("torpor_held_requests", "Requests the activator holds now", ["service"])
HELD_REQUESTS_TOTAL = Counter(
    "torpor_requests_held", "Requests the activator has held (since start)", ["service"]
)
HELD_ABANDONED = Counter(
    "torpor_held_abandoned",
    "Held requests that left the queue unanswered: the client hung up (disconnected) or the "
    "wake deadline passed (deadline), the wake failed (failed) or the activator stopped (drained)",
    ["service", "reason"],
)
QUEUE_OVERFLOWS = Counter(
    "torpor_queue_overflows", "Requests refused with 503 because a service's queue was full",
    ["service"],
)
#: Few buckets, because the wake and cold-start histograms are per service: each has
#: len(buckets) + 3 series (+Inf, _sum, _count) per service (and outcome), i.e. 9 at 6
#: buckets; 10,000 services that all woke: 90,000 series of each.
PER_SERVICE_BUCKETS = (1, 5, 30, 120, 300, 600)
WAKE_DURATION = Histogram(
    "torpor_wake_duration_seconds", "From the start of a wake to its first ready endpoint, "
    "counted by the process that ran the wake", ["service", "outcome"],
    buckets=PER_SERVICE_BUCKETS,
)
WAKE_OUTCOME_NAMES = ("woken", "timeout", "failed")
WAKE_OUTCOMES = Counter(
    "torpor_wake_outcomes", "Wakes by outcome (woken, timeout, failed)", ["service", "outcome"]
)
KUBERNETES_API_ERRORS = Counter(
    "torpor_kubernetes_api_errors",
    "Failed Kubernetes API calls, by operation and HTTP status (0: no answer)",
    ["operation", "status"],
)
KUBERNETES_WATCH_RESTARTS = Counter(
    "torpor_kubernetes_watch_restarts",
    "Kubernetes watches started again, by resource and why (expired: 410 Gone; error)",
    ["resource", "reason"],
)
DISCOVERY_ERRORS = Gauge(
    "torpor_discovery_errors",
    "1 while a labelled Deployment cannot become a service (bad annotations, name or host "
    "clash); it is left as it was", ["namespace", "deployment"],
)
AUTH_RELOADS = Counter(
    "torpor_auth_reloads",
    "API key and JWKS files read again after a change: applied, failed (old kept)",
    ["result"],
)
TLS_RELOADS = Counter(
    "torpor_tls_reloads",
    "Gateway certificate files read again after a change: applied, failed (old kept)",
    ["result"],
)
REQUESTS_LIMITED = Counter(
    "torpor_requests_limited",
    "Requests Envoy answered 429 by service and reason: rate (its rate_limit), "
    "concurrency (its max_concurrent, or a full queue of held requests)",
    ["service", "reason"],
)
ASYNC_CALLS = Counter(
    "torpor_activator_async_calls",
    "Asynchronous calls (Prefer: respond-async) by outcome: accepted, done, failed",
    ["service", "outcome"],
)
ASYNC_STATUS_FORWARDS = Counter(
    "torpor_activator_async_status_forwards",
    "Status requests of asynchronous calls kept by another activator replica, by outcome: "
    "relayed (the owner answered), owner_gone, owner_unreachable, registry_unavailable, "
    "too_large",
    ["outcome"],
)
PROXY_ERRORS = Counter(
    "torpor_activator_proxy_errors", "Held requests the activator could not proxy", ["service"]
)

# --- fleet mode (store: etcd) -------------------------------------------------------------
LOCK_ACQUIRE_SECONDS = Histogram(
    "torpor_lock_acquire_seconds",
    "From asking for a service's etcd lock to holding it (waits for another holder included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)
LEADER = Gauge("torpor_leader", "1 while this process leads the election (reconciler)",
               ["election"])
ETCD_WATCH_RESTARTS = Counter(
    "torpor_etcd_watch_restarts", "etcd watches resumed after a failure, by watch", ["watch"]
)
ACTIVATORS = SetGauge("torpor_activators", "Activator replicas registered in etcd, as this "
                      "control plane sees them (the endpoints of Envoy's activator cluster; "
                      "fleet only)")
ACTIVATOR_SERVING = SetGauge(
    "torpor_activator_serving",
    "1 while this process's activator accepts requests for sleeping services, 0 once it stopped")

# The savings ledger (torpor/ledger.py): exported only by the control plane whose ledger
# counts (the leader in a fleet).
REPLICA_SECONDS_SAVED = Counter(
    "torpor_replica_seconds_saved",
    "Replica-seconds not run because the service slept (time HIBERNATED or EVICTED x its "
    "recorded replicas)", ["service"],
)
COLD_STARTS = Counter(
    "torpor_cold_starts", "Completed wakes a request (or torpor wake) asked for; pre-wakes are "
    "not cold starts", ["service"],
)
COLD_START_SECONDS = Histogram(
    "torpor_cold_start_seconds", "A cold start's wait, from WAKING to ACTIVE", ["service"],
    buckets=PER_SERVICE_BUCKETS,
)
PREWAKES = Counter(
    "torpor_prewakes", "Pre-wakes by outcome: useful (a call came before the service slept "
    "again) or wasted", ["service", "outcome"],
)
ENVOY_RESTARTS = Counter(
    "torpor_envoy_restarts", "Times `torpor up` restarted the Envoy it runs after it died"
)
REPLICA_RESTARTS = Counter(
    "torpor_replica_restarts", "Local replicas replaced after they died (reason exited) or "
    "failed their liveness probe and were killed (reason liveness)", ["service", "reason"],
)


def set_service_state(service: str, state: ServiceState, recorded_replicas: int = 0) -> None:
    """Export `state` as the one current state of `service` (an enum as 0/1 gauges), and
    the replicas its sleep saves."""
    for candidate in ServiceState:
        SERVICE_STATE.labels(service=service, state=candidate.value).set(
            1 if candidate is state else 0
        )
    asleep = state in (ServiceState.HIBERNATED, ServiceState.EVICTED)
    REPLICAS_SAVED.labels(service=service).set(recorded_replicas if asleep else 0)


def forget_service(service: str) -> None:
    """Drop a removed service's series so dashboards don't show it forever."""
    for candidate in ServiceState:
        _remove(SERVICE_STATE, service, candidate.value)
    for gauge in (SERVICE_REPLICAS, SERVICE_READY_ENDPOINTS, HELD_REQUESTS, REPLICAS_SAVED,
                  SERVICE_QUARANTINED):
        _remove(gauge, service)
    for outcome in WAKE_OUTCOME_NAMES:
        _remove(WAKE_DURATION, service, outcome)


def forget_savings(service: str) -> None:
    """Drop a service's ledger series (this process's ledger stopped counting)."""
    for metric in (REPLICA_SECONDS_SAVED, COLD_STARTS, COLD_START_SECONDS):
        _remove(metric, service)
    for outcome in ("useful", "wasted"):
        _remove(PREWAKES, service, outcome)


def _remove(metric: Gauge | Counter | Histogram, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


#: Why a process is not ready ([] when it is), and notes shown either way.
Readiness = Callable[[], tuple[list[str], list[str]]]


def serve_metrics(host: str, port: int, ready: Readiness | None = None,
                  ) -> tuple[WSGIServer, int]:
    """Serve /metrics on host:port in a background thread; returns (server, bound port).
    Stop it with `server.shutdown()`.

    With `ready`, `/ready` answers 200 "ready" when `ready()` returns no reason, else 503
    with one reason a line (e.g. Envoy rejects the current config); its notes follow
    (e.g. quarantined services). `ready` runs on the server's thread: it must only read."""
    if ready is None:
        try:
            server, _thread = start_http_server(port, addr=host)
        except OSError as exc:
            raise TorporError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        return server, int(server.server_port)
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") != "/ready":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        reasons, notes = ready()
        lines = [f"not ready: {r}" for r in reasons] or ["ready"]
        body = "\n".join([*lines, *notes]) + "\n"
        start_response("503 Service Unavailable" if reasons else "200 OK",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [body.encode("utf-8")]

    try:
        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise TorporError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server, int(server.server_port)


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per request (a slow scrape must not hold up /ready)."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
