"""Discovery: Deployments labelled torpor.io/enabled: "true" become torpor services.

Owns: watching labelled Deployments (every namespace, or the configured ones), turning
each into a ServiceConfig (annotations.py), and keeping the catalog and the Kubernetes
workloads in step as labels and annotations change, without a restart. A Deployment whose
annotations are bad, or whose name or host is taken, is reported (log line, the
torpor_discovery_errors gauge, `torpor status`) and left exactly as it was: a service it
already was keeps its last good config; one it was not does not appear. Removing the label
(or the Deployment) removes the service from the catalog; its stored record stays, so
labelling it again brings its state and history back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from torpor import metrics
from torpor.catalog import CatalogConflictError, ServiceCatalog
from torpor.config import ServiceConfig
from torpor.logs import event
from torpor.workloads.annotations import (
    ENABLED_LABEL,
    AnnotationError,
    fingerprint,
    service_from_deployment,
)
from torpor.workloads.kube_api import KubeCalls
from torpor.workloads.kube_watch import Change, Reflector

log = logging.getLogger("torpor.discovery")

#: How long start() waits for the first list before going on without it.
FIRST_LIST_TIMEOUT = 30.0


def source_of(deployment: dict[str, Any]) -> str:
    meta = deployment.get("metadata") or {}
    return f"deployment/{meta.get('namespace')}/{meta.get('name')}"


class KubernetesDiscovery:
    """Labelled Deployments → catalog entries (+ `track`/`untrack` on the workloads)."""

    def __init__(self, calls: KubeCalls, catalog: ServiceCatalog,
                 track: Callable[[ServiceConfig], None], untrack: Callable[[str], None],
                 namespaces: tuple[str, ...], poll_every: float) -> None:
        self._calls = calls
        self._catalog = catalog
        self._track = track
        self._untrack = untrack
        self._namespaces = namespaces
        self._poll_every = poll_every
        self._reflectors: list[Reflector] = []
        self._seen: dict[str, tuple[tuple[str, str], ...]] = {}  # source → fingerprint
        self._names: dict[str, str] = {}  # source → service name in the catalog
        self._problems: dict[str, str] = {}  # source → why it is not (updated as) a service

    async def start(self) -> None:
        """Watch, and return once the first list was applied (or FIRST_LIST_TIMEOUT)."""
        loop = asyncio.get_running_loop()
        selector = {"label_selector": f"{ENABLED_LABEL}=true"}
        apps = self._calls.apps
        sources: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = (
            [(f"deployments/{ns}", apps.list_namespaced_deployment, (ns,))
             for ns in self._namespaces]
            or [("deployments/*", apps.list_deployment_for_all_namespaces, ())])
        for resource, list_fn, args in sources:
            self._reflectors.append(Reflector(
                f"discovery:{resource}", list_fn, args, dict(selector),
                functools.partial(self._changed, resource),
                self._poll_every, loop))
        for reflector in self._reflectors:
            reflector.start()
        try:
            async with asyncio.timeout(FIRST_LIST_TIMEOUT):
                await asyncio.gather(*(r.synced.wait() for r in self._reflectors))
        except TimeoutError:
            event(log, "discovery.not_synced", seconds=FIRST_LIST_TIMEOUT,
                  level=logging.WARNING)

    async def stop(self) -> None:
        for reflector in self._reflectors:
            reflector.stop()
        for reflector in self._reflectors:
            await asyncio.to_thread(reflector.join, 5.0)
        self._reflectors.clear()

    def problems(self) -> list[str]:
        return [self._problems[source] for source in sorted(self._problems)]

    # --- applying changes -----------------------------------------------------------------

    def _changed(self, reflector: str, changes: list[Change]) -> None:
        """Only the Deployments that changed are looked at: those gone first (a host or
        name they free may be what an added one needs), then the others."""
        for before, after in changes:
            if after is None and before is not None:
                self._gone(source_of(before))
        for _, deployment in changes:
            if deployment is None:
                continue
            source = source_of(deployment)
            mark = fingerprint(deployment)
            if self._seen.get(source) != mark:
                self._seen[source] = mark
                self._apply(source, deployment)

    def _apply(self, source: str, deployment: dict[str, Any]) -> None:
        """Put the Deployment's service in the catalog, or report why not."""
        replicas = int((deployment.get("spec") or {}).get("replicas") or 1)
        try:
            service = service_from_deployment(deployment, replicas_default=max(1, replicas))
        except AnnotationError as exc:
            self._reject(source, str(exc))
            return
        old_name = self._names.get(source)
        if old_name is not None and old_name != service.name:
            self._remove(source, old_name)
        try:
            self._catalog.check(service, source)
        except CatalogConflictError as exc:
            self._reject(source, f"{source}: {exc}")
            return
        self._track(service)  # before the catalog's listeners ask the workloads about it
        self._catalog.put(service, source)
        self._names[source] = service.name
        self._clear(source)

    def _gone(self, source: str) -> None:
        """Label removed or Deployment deleted: the service leaves the catalog."""
        self._seen.pop(source, None)
        self._clear(source)
        name = self._names.get(source)
        if name is not None:
            self._remove(source, name)

    def _remove(self, source: str, name: str) -> None:
        self._names.pop(source, None)
        if self._catalog.remove(name, source):
            self._untrack(name)

    def _reject(self, source: str, message: str) -> None:
        if self._problems.get(source) != message:
            event(log, "discovery.rejected", source=source, problem=message,
                  kept=self._names.get(source), level=logging.WARNING)
        self._problems[source] = message
        _, namespace, name = source.split("/", 2)
        metrics.DISCOVERY_ERRORS.labels(namespace=namespace, deployment=name).set(1)

    def _clear(self, source: str) -> None:
        if self._problems.pop(source, None) is not None:
            event(log, "discovery.problem_resolved", source=source)
        _, namespace, name = source.split("/", 2)
        try:
            metrics.DISCOVERY_ERRORS.remove(namespace, name)
        except KeyError:
            pass
