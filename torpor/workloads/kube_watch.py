"""A reflector: a local copy of one kind of Kubernetes object, kept by list + watch.

Owns the watch protocol as the API server speaks it: list to get a resourceVersion, watch
from it, follow bookmarks, re-list at once when the watch expires (410 Gone: the server
compacted the history), and while a watch cannot be held (errors, no answer) re-list every
`poll_every` seconds, so readiness still flows, only later. The blocking client runs on a
thread of its own; each event reaches the event loop through `call_soon_threadsafe` and is
applied there, so `objects` is only ever changed on the loop. The owner is told what
changed, object by object (before, after), never handed the whole set: an event about one
of 10,000 Deployments costs work for that one (a re-list is diffed, and reports only the
objects that differ). Must not interpret the objects: the owner gets them as plain dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import watch
from kubernetes.client.rest import ApiException

from torpor import metrics
from torpor.logs import event
from torpor.workloads.kube_api import describe, status_of

log = logging.getLogger("torpor.kubernetes.watch")

#: Objects by name (namespaced lists key by "namespace/name").
Objects = dict[str, dict[str, Any]]
#: One object's change: (before, after); None before = added, None after = deleted.
Change = tuple[dict[str, Any] | None, dict[str, Any] | None]
#: Called on the loop with the changes of one event, or of one re-list (only the objects
#: that differ from what was known; nothing when none does).
OnChange = Callable[[list[Change]], None]

#: How long the server keeps one watch open before we re-watch from the last version.
WATCH_SECONDS = 240


def key_of(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Reflector:
    """Keeps `objects` equal to what `list_fn(*args, **kwargs)` returns, by watching."""

    def __init__(self, resource: str, list_fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], on_change: OnChange, poll_every: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.resource = resource
        self._list_fn = list_fn
        self._args = args
        self._kwargs = kwargs
        self._on_change = on_change
        self._poll_every = poll_every
        self._loop = loop
        self.objects: Objects = {}
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"torpor-watch-{resource}",
                                        daemon=True)
        self.synced = asyncio.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread: the open watch's socket is shut so a blocked read returns."""
        self._stop.set()
        current = self._watch
        if current is not None:
            current.stop()
            response = getattr(current, "_resp", None)
            if response is not None:
                with contextlib.suppress(Exception):
                    response.shutdown()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist()
                version = self._watch_from(version)
            except ApiException as exc:
                if status_of(exc) == 410:
                    metrics.KUBERNETES_WATCH_RESTARTS.labels(self.resource, "expired").inc()
                    event(log, "kubernetes.watch_expired", resource=self.resource,
                          level=logging.INFO)
                    version = None
                    continue
                version = None
                self._failed(exc)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                version = None
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        """Log, count, and wait before the next list (the fallback poll's period)."""
        if self._stop.is_set():
            return
        metrics.KUBERNETES_WATCH_RESTARTS.labels(self.resource, "error").inc()
        event(log, "kubernetes.watch_failed", resource=self.resource, error=describe(exc),
              retry_in=self._poll_every, level=logging.WARNING)
        self._stop.wait(self._poll_every)

    def _relist(self) -> str:
        response = self._list_fn(*self._args, _preload_content=False,
                                 _request_timeout=(5.0, 30.0), **self._kwargs)
        body = json.loads(response.data)
        objects = {key_of(item): item for item in body.get("items") or []}
        self._post(self._replace, objects)
        return str(body["metadata"]["resourceVersion"])

    def _watch_from(self, version: str) -> str:
        """Pass events on until the server ends the watch; returns the last version seen."""
        self._watch = watch.Watch()
        stream = self._watch.stream(self._list_fn, *self._args, resource_version=version,
                                    timeout_seconds=WATCH_SECONDS, allow_watch_bookmarks=True,
                                    _request_timeout=(5.0, WATCH_SECONDS + 30.0),
                                    **self._kwargs)
        for change in stream:
            if self._stop.is_set():
                break
            raw = change["raw_object"]
            version = str((raw.get("metadata") or {}).get("resourceVersion") or version)
            kind = change["type"]
            if kind != "BOOKMARK":
                self._post(self._apply, kind == "DELETED", raw)
        return version

    def _post(self, apply: Callable[..., None], *args: Any) -> None:
        """Run `apply(*args)` on the loop, in the order the thread posts them."""
        with contextlib.suppress(RuntimeError):  # the loop closed while we stopped
            self._loop.call_soon_threadsafe(apply, *args)

    # --- on the loop ----------------------------------------------------------------------

    def _replace(self, objects: Objects) -> None:
        """A re-list: the new set, and the objects that differ from the known ones."""
        known, self.objects = self.objects, objects
        changes = [(known.get(key), objects.get(key)) for key in sorted(known.keys() | objects)
                   if known.get(key) != objects.get(key)]
        self._deliver(changes)

    def _apply(self, deleted: bool, raw: dict[str, Any]) -> None:
        key = key_of(raw)
        before = self.objects.pop(key, None) if deleted else self.objects.get(key)
        if not deleted:
            self.objects[key] = raw
        self._deliver([] if deleted and before is None else [(before, None if deleted else raw)])

    def _deliver(self, changes: list[Change]) -> None:
        self.synced.set()
        if changes:
            self._on_change(changes)
