"""Kubernetes workloads: a service's replicas are a Deployment's pods.

Owns: scaling through the Deployment's `scale` subresource; the recorded replica count as
the Deployment annotation torpor.io/recorded-replicas (written before scaling to zero, so
it outlives a lost store); ready endpoints from the EndpointSlices of the service's
Kubernetes Service (ready addresses, the configured port), kept by watches (kube_watch.py);
and HorizontalPodAutoscalers (hpa.py). One reflector per namespace and kind, shared by
every service in that namespace, so 10k services cost a handful of watches, not 10k.

Must not decide when to scale (the reconciler and the waker do) nor talk to Envoy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from torpor.catalog import ServiceCatalog
from torpor.config import ServiceConfig, WorkloadsConfig
from torpor.errors import UnknownServiceError, WorkloadError
from torpor.listeners import Listeners
from torpor.logs import event
from torpor.model import Endpoint
from torpor.workloads.annotations import RECORDED_REPLICAS
from torpor.workloads.base import Discovery, EndpointListener, Workloads, wait_for_ready
from torpor.workloads.discovery import KubernetesDiscovery
from torpor.workloads.hpa import HpaGuard
from torpor.workloads.kube_api import KubeCalls, make_api_client
from torpor.workloads.kube_watch import Change, Objects, OnChange, Reflector, key_of

log = logging.getLogger("torpor.kubernetes")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclasses.dataclass
class _Tracked:
    """One torpor service's Deployment, as last seen."""

    config: ServiceConfig
    namespace: str
    deployment: str
    service: str
    port: int
    published: tuple[Endpoint, ...] = ()
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # What this process last asked for, until the watch shows the Deployment's own.
    asked: int | None = None


@dataclasses.dataclass
class _Namespace:
    """The reflectors of one namespace, shared by its services, and its EndpointSlices by
    the Kubernetes Service they belong to (kept from the slices' changes, so a change is
    looked at for its own Service only)."""

    deployments: Reflector
    slices: Reflector
    hpas: Reflector
    slices_of: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)


def _tracked(service: ServiceConfig) -> _Tracked:
    kube = service.kubernetes
    if kube is None:
        raise WorkloadError(f"service {service.name!r} has no kubernetes: block")
    return _Tracked(service, kube.namespace, kube.deployment, kube.service_name, kube.port)


class KubernetesWorkloads(Workloads):
    """Deployments in one cluster, reached through the official client."""

    def __init__(self, services: Iterable[ServiceConfig], settings: WorkloadsConfig,
                 calls: KubeCalls | None = None) -> None:
        self._settings = settings
        self._calls = calls
        self._services: dict[str, _Tracked] = {}
        # (namespace, Kubernetes Service) -> the torpor services whose endpoints it lists
        self._users: dict[tuple[str, str], set[str]] = {}
        self._namespaces: dict[str, _Namespace] = {}
        self._listeners: Listeners[[str, tuple[Endpoint, ...]]] = Listeners(
            "workloads.listener_failed")
        self._hpa: HpaGuard | None = None
        self._started = False
        for service in services:
            self._add(_tracked(service))

    @property
    def calls(self) -> KubeCalls:
        if self._calls is None:
            raise WorkloadError("Kubernetes workloads are not started")
        return self._calls

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, then list every namespace in use before returning, so that replica
        counts and ready endpoints are known when the control plane builds its first
        snapshot."""
        if self._calls is None:
            self._calls = KubeCalls(make_api_client(self._settings.kubeconfig,
                                                    self._settings.context))
        self._hpa = HpaGuard(self._calls, self._hpas_of)
        self._started = True
        for tracked in list(self._services.values()):
            self._watch_namespace(tracked.namespace)
        await self._wait_synced(30.0)

    async def close(self) -> None:
        """Stop watching. Pods are not ours to stop: the Deployments stay as they are."""
        self._started = False
        namespaces = list(self._namespaces.values())
        self._namespaces.clear()
        reflectors = [r for ns in namespaces for r in (ns.deployments, ns.slices, ns.hpas)]
        for reflector in reflectors:
            reflector.stop()
        for reflector in reflectors:
            await asyncio.to_thread(reflector.join, 5.0)
        if self._calls is not None:
            self._calls.close()
            self._calls = None
        for tracked in self._services.values():
            _wake_waiters(tracked)

    # --- services coming and going (discovery) --------------------------------------------

    def track(self, service: ServiceConfig) -> None:
        """Manage `service` too (or again, with a changed config)."""
        tracked = _tracked(service)
        old = self._remove(service.name)
        if old is not None:
            tracked.published, tracked.changed = old.published, old.changed
        self._add(tracked)
        if self._started:
            self._watch_namespace(tracked.namespace)
            self._publish_ready(tracked)

    def untrack(self, name: str) -> None:
        """Stop managing `name` (its Deployment is left as it is)."""
        tracked = self._remove(name)
        if tracked is not None:
            _wake_waiters(tracked)

    async def put_service(self, service: ServiceConfig) -> None:
        self.track(service)

    async def drop_service(self, name: str) -> None:
        self.untrack(name)

    def _add(self, tracked: _Tracked) -> None:
        self._services[tracked.config.name] = tracked
        self._users.setdefault((tracked.namespace, tracked.service), set()).add(
            tracked.config.name)

    def _remove(self, name: str) -> _Tracked | None:
        tracked = self._services.pop(name, None)
        if tracked is not None:
            key = (tracked.namespace, tracked.service)
            users = self._users.get(key, set())
            users.discard(name)
            if not users:
                self._users.pop(key, None)
        return tracked

    # --- the Workloads contract -----------------------------------------------------------

    def running_replicas(self, name: str) -> int:
        deployment = self._deployment(self._service(name))
        status = (deployment or {}).get("status") or {}
        return int(status.get("replicas") or 0)

    def desired_replicas(self, name: str) -> int:
        tracked = self._service(name)
        deployment = self._deployment(tracked)
        if deployment is None:
            return tracked.asked or 0
        return int((deployment.get("spec") or {}).get("replicas") or 0)

    def recorded_replicas(self, name: str) -> int | None:
        deployment = self._deployment(self._service(name))
        if deployment is None or self.desired_replicas(name) != 0:
            return None
        annotations = (deployment.get("metadata") or {}).get("annotations") or {}
        try:
            value = int(annotations.get(RECORDED_REPLICAS, ""))
        except ValueError:
            return None
        return value if value > 0 else None

    async def scale(self, name: str, replicas: int) -> None:
        """To zero: annotate the count first, then scale (an HPA is set aside first). Up:
        scale, then restore the HPA and drop the annotation. A failure at any step raises
        WorkloadError and leaves what was already written consistent."""
        tracked = self._service(name)
        if replicas < 0:
            raise WorkloadError(f"service {name!r}: cannot scale to {replicas} replicas")
        async with tracked.lock:
            if replicas == 0:
                await self._scale_to_zero(tracked)
            else:
                await self._scale_up(tracked, replicas)

    def ready_endpoints(self, name: str) -> tuple[Endpoint, ...]:
        return self._service(name).published

    async def wait_ready(self, name: str, min_ready: int, timeout: float) -> tuple[Endpoint, ...]:
        tracked = self._service(name)
        return await wait_for_ready(
            lambda: tracked.published, lambda: tracked.changed, self._check_started,
            min_ready, timeout, f"service {name!r}: endpoints in EndpointSlices of "
            f"{tracked.namespace}/{tracked.service}")

    def _check_started(self) -> None:
        if not self._started:
            raise WorkloadError("Kubernetes workloads were stopped")

    def add_listener(self, listener: EndpointListener) -> Callable[[], None]:
        return self._listeners.add(listener)

    async def discover(self, catalog: ServiceCatalog) -> Discovery | None:
        if not self._settings.discover:
            return None
        discovery = KubernetesDiscovery(self.calls, catalog, self.track, self.untrack,
                                        self._settings.namespaces, self._settings.poll_every)
        await discovery.start()
        # Namespaces of newly tracked services are listed before the first snapshot.
        await self._wait_synced(30.0)
        return discovery

    # --- scaling --------------------------------------------------------------------------

    async def _scale_to_zero(self, tracked: _Tracked) -> None:
        current = await self._read_scale(tracked)
        if current > 0:
            await self._annotate(tracked, str(current))
        assert self._hpa is not None
        await self._hpa.before_zero(tracked.namespace, tracked.deployment)
        await self._patch_scale(tracked, 0)

    async def _scale_up(self, tracked: _Tracked, replicas: int) -> None:
        assert self._hpa is not None
        target = await self._hpa.bounded(tracked.namespace, tracked.deployment, replicas)
        await self._patch_scale(tracked, target)
        await self._hpa.after_wake(tracked.namespace, tracked.deployment)
        deployment = self._deployment(tracked)
        annotations = ((deployment or {}).get("metadata") or {}).get("annotations") or {}
        if RECORDED_REPLICAS in annotations:
            await self._annotate(tracked, None)

    async def _read_scale(self, tracked: _Tracked) -> int:
        scale = await self.calls.call(
            f"read deployments/scale {tracked.namespace}/{tracked.deployment}",
            self.calls.apps.read_namespaced_deployment_scale, tracked.deployment,
            tracked.namespace)
        return int((scale.get("spec") or {}).get("replicas") or 0)

    async def _patch_scale(self, tracked: _Tracked, replicas: int) -> None:
        await self.calls.call(
            f"patch deployments/scale {tracked.namespace}/{tracked.deployment}",
            self.calls.apps.patch_namespaced_deployment_scale, tracked.deployment,
            tracked.namespace, {"spec": {"replicas": replicas}})
        tracked.asked = replicas
        event(log, "kubernetes.scaled", service=tracked.config.name,
              deployment=f"{tracked.namespace}/{tracked.deployment}", replicas=replicas)

    async def _annotate(self, tracked: _Tracked, value: str | None) -> None:
        """Set (or with None remove) the recorded-replicas annotation, by merge patch."""
        await self.calls.call(
            f"patch deployments {tracked.namespace}/{tracked.deployment} (annotation)",
            self.calls.apps.patch_namespaced_deployment, tracked.deployment,
            tracked.namespace, {"metadata": {"annotations": {RECORDED_REPLICAS: value}}})

    # --- watching -------------------------------------------------------------------------

    def _watch_namespace(self, namespace: str) -> None:
        if namespace in self._namespaces:
            return
        loop = asyncio.get_running_loop()
        calls = self.calls
        every = self._settings.poll_every

        def reflector(resource: str, list_fn: Callable[..., Any],
                      on_change: OnChange = _unused) -> Reflector:
            return Reflector(f"{resource}/{namespace}", list_fn, (namespace,), {},
                             on_change, every, loop)

        ns = _Namespace(
            deployments=reflector("deployments", calls.apps.list_namespaced_deployment),
            slices=reflector("endpointslices", calls.discovery.list_namespaced_endpoint_slice,
                             functools.partial(self._slices_changed, namespace)),
            hpas=reflector("horizontalpodautoscalers",
                           calls.autoscaling.list_namespaced_horizontal_pod_autoscaler),
        )
        self._namespaces[namespace] = ns
        for r in (ns.deployments, ns.slices, ns.hpas):
            r.start()

    async def _wait_synced(self, timeout: float) -> None:
        waits = [r.synced.wait() for ns in self._namespaces.values()
                 for r in (ns.deployments, ns.slices, ns.hpas)]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waits)
        except TimeoutError:
            event(log, "kubernetes.not_synced", seconds=timeout, level=logging.WARNING)

    def _slices_changed(self, namespace: str, changes: list[Change]) -> None:
        """Keep the namespace's slices by Service; recompute the ready endpoints of the
        torpor services of the Kubernetes Services these slices belong (or belonged) to."""
        ns = self._namespaces.get(namespace)
        if ns is None:
            return
        affected: set[str] = set()
        for before, after in changes:
            for item, present in ((before, False), (after, True)):
                if item is None:
                    continue
                owner = _service_of(item)
                affected.add(owner)
                group = ns.slices_of.setdefault(owner, {})
                if present:
                    group[key_of(item)] = item
                else:
                    group.pop(key_of(item), None)
                    if not group:
                        ns.slices_of.pop(owner, None)
        for owner in sorted(affected):
            for name in sorted(self._users.get((namespace, owner), ())):
                self._publish_ready(self._services[name])

    def _publish_ready(self, tracked: _Tracked) -> None:
        """Recompute one service's ready endpoints from its Service's slices; notify a
        change."""
        ns = self._namespaces.get(tracked.namespace)
        slices = ns.slices_of.get(tracked.service, {}) if ns is not None else {}
        ready = ready_endpoints(slices.values(), tracked.service, tracked.port)
        if ready != tracked.published:
            tracked.published = ready
            _wake_waiters(tracked)
            self._listeners.notify(tracked.config.name, ready)

    # --- helpers --------------------------------------------------------------------------

    def _service(self, name: str) -> _Tracked:
        tracked = self._services.get(name)
        if tracked is None:
            raise UnknownServiceError(f"unknown service {name!r}")
        return tracked

    def _deployment(self, tracked: _Tracked) -> dict[str, Any] | None:
        ns = self._namespaces.get(tracked.namespace)
        if ns is None:
            return None
        return ns.deployments.objects.get(f"{tracked.namespace}/{tracked.deployment}")

    def _hpas_of(self, namespace: str) -> Objects:
        ns = self._namespaces.get(namespace)
        return ns.hpas.objects if ns is not None else {}


def _unused(changes: list[Change]) -> None:
    """Deployments and HPAs are read when asked for (`objects`); their changes need no work."""


def _service_of(item: dict[str, Any]) -> str:
    """The Kubernetes Service an EndpointSlice belongs to (its service-name label)."""
    labels = (item.get("metadata") or {}).get("labels") or {}
    return str(labels.get(SERVICE_NAME_LABEL, ""))


def _wake_waiters(tracked: _Tracked) -> None:
    changed, tracked.changed = tracked.changed, asyncio.Event()
    changed.set()


def ready_endpoints(slices: Iterable[dict[str, Any]], service: str,
                    port: int) -> tuple[Endpoint, ...]:
    """Addresses of `service`'s EndpointSlices that are ready and not terminating, at
    `port` when a slice lists it. A missing `ready` condition counts as ready, as the API
    documents ("nil should be interpreted as ready")."""
    found: set[Endpoint] = set()
    for item in slices:
        labels = (item.get("metadata") or {}).get("labels") or {}
        if labels.get(SERVICE_NAME_LABEL) != service:
            continue
        ports = item.get("ports")
        if ports and not any(p.get("port") == port for p in ports):
            continue
        for endpoint in item.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            for address in endpoint.get("addresses") or []:
                found.add(Endpoint(address, port))
    return tuple(sorted(found, key=lambda e: (e.host, e.port)))
