"""A test double of the Kubernetes API server for the official `kubernetes` Python client.

`FakeKube` serves the few API paths torpor uses over real HTTP on 127.0.0.1, from its own
thread and event loop, so the unchanged client (blocking urllib3 calls, streamed watches)
talks to it exactly as to a cluster. Behind it runs a small simulated cluster: Deployment,
EndpointSlice and HPA controllers and a kubelet that starts one real local process per pod on
its own loopback IP and reports readiness from that process's probe. See api.py / cluster.py.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import pathlib
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

import kubernetes
from aiohttp import web

from .api import (
    ApiError,
    ApiServer,
    Injection,
    RequestRecord,
    Resource,
    Store,
    expired,
    merge_patch,
    not_found,
    parse_path,
    resource_for,
)
from .cluster import DESIRED_ANNOTATION, Cluster

__all__ = ["DESIRED_ANNOTATION", "ApiError", "FakeKube", "RequestRecord"]
TOKEN = "torpor-test"
T = TypeVar("T")


class FakeKube:
    """Start/stop it (or use `with`); point the client at `write_kubeconfig()` or `api_client()`."""

    def __init__(self, *, hpa_scale_to_zero: bool = False, probe_period: float = 0.1,
                 history: int = 1000) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-kube-")
        self.log_dir = pathlib.Path(self._tmp.name)  # pod logs, `{namespace}_{pod}.log`
        self.store = Store(history=history, hpa_scale_to_zero=hpa_scale_to_zero)
        self.server = ApiServer(self.store)
        self.cluster = Cluster(self.store, probe_period=probe_period, workdir=self.log_dir)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopped = False
        self.url = ""

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Serve on an ephemeral 127.0.0.1 port from a background thread with its own loop."""
        if self._loop is not None or self._stopped:
            return
        atexit.register(self.cluster.kubelet.kill_all)  # a forgotten stop() leaves nothing
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-kube",
                                        daemon=True)
        self._thread.start()
        port = self._submit(self._serve())
        self.url = f"http://127.0.0.1:{port}"

    async def _serve(self) -> int:
        self._runner = web.AppRunner(self.server.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.cluster.start()
        return int(self._runner.addresses[0][1])

    def stop(self) -> None:
        """Close watches, end every pod process (SIGTERM, SIGKILL after 5 s), stop serving."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._submit(self._shutdown(), timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self.cluster.kubelet.kill_all()  # even if the loop was wedged
            if not thread.is_alive():
                loop.close()
            self._loop, self._thread, self._stopped = None, None, True
            atexit.unregister(self.cluster.kubelet.kill_all)
            self._tmp.cleanup()

    async def _shutdown(self) -> None:
        self.store.close_all_watches()
        await self.cluster.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()

    def __enter__(self) -> FakeKube:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def _submit(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("FakeKube is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the fake's loop: the store is single-threaded by design."""

        async def call() -> T:
            return fn(*args, **kwargs)

        return self._submit(call())

    # clients ------------------------------------------------------------------------------
    def write_kubeconfig(self, path: pathlib.Path, namespace: str = "default") -> pathlib.Path:
        """A kubeconfig (JSON is YAML) with context "fake" and a static bearer token."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url,
                                                      "insecure-skip-tls-verify": True}}],
            "users": [{"name": TOKEN, "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": TOKEN,
                                                      "namespace": namespace}}]}
        path.write_text(json.dumps(config, indent=2))
        return path

    def api_client(self) -> kubernetes.client.ApiClient:
        configuration = kubernetes.client.Configuration(host=self.url)
        configuration.api_key = {"BearerToken": TOKEN}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return kubernetes.client.ApiClient(configuration)

    # seeding ------------------------------------------------------------------------------
    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        res = resource_for(obj.get("apiVersion", ""), obj.get("kind", ""))
        return self._call(self.store.create, res, obj)

    def create_many(self, objs: list[dict[str, Any]], timeout: float = 120.0) -> None:
        """Create every object in one turn of the fake's loop: the controllers then make one
        pass over all of them, not one per object (10,000 Deployments in seconds)."""

        async def create_all() -> None:
            for obj in objs:
                self.store.create(resource_for(obj.get("apiVersion", ""), obj.get("kind", "")),
                                  obj)

        self._submit(create_all(), timeout)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(self.store.get, resource_for(api_version, kind), namespace, name)

    def patch_object(self, api_version: str, kind: str, namespace: str, name: str,
                     merge_patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch through the same path as the API's PATCH."""
        res = resource_for(api_version, kind)
        return self._call(self._merge, res, namespace, name, merge_patch)

    def _merge(self, res: Resource, namespace: str, name: str, patch: dict[str, Any]) -> Any:
        current = self.store.get(res, namespace, name)
        if current is None:
            raise not_found(res, name)
        return self.store.replace(res, merge_patch(current, patch))

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._call(self.store.delete, resource_for(api_version, kind), namespace, name)

    # failures and observation -------------------------------------------------------------
    def inject(self, status: int, *, verb: str | None = None, resource: str | None = None,
               subresource: str | None = None, namespace: str | None = None,
               name: str | None = None, times: int = 1, reason: str | None = None,
               message: str | None = None) -> None:
        """The next `times` matching requests answer `status` with a real-looking Status body."""
        injection = Injection(status, verb, resource, subresource, namespace, name, times,
                              reason, message)
        self._call(self.server.injections.append, injection)

    def expire_watches(self) -> None:
        """Every open watch gets a 410 Expired ERROR and ends; older RVs can't be watched."""

        def expire() -> None:
            self.store.close_all_watches(
                expired("The resourceVersion for the provided watch is too old."))
            self.store.compact()

        self._call(expire)

    def compact(self) -> None:
        self._call(self.store.compact)

    @property
    def requests(self) -> list[RequestRecord]:
        return self.server.requests

    def count(self, verb: str, resource: str, subresource: str | None = None,
              name: str | None = None) -> int:
        """Requests served with `verb` on `resource` (subresource None = the main resource)."""
        total = 0
        for record in list(self.server.requests):
            route = parse_path(record.path)
            if route is not None and (record.verb, route.res.plural, route.sub) == (
                    verb, resource, subresource) and name in (None, route.name):
                total += 1
        return total

    def pod_processes(self, namespace: str | None = None) -> dict[str, int]:
        """Pod name -> pid of its running process (terminating pods included)."""
        if self._loop is None:
            return {}
        return self._call(self.cluster.kubelet.processes, namespace)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0,
                 what: str | None = None) -> None:
        """Poll until true; on timeout fail saying what was awaited and the last error seen."""
        deadline, last_error = time.monotonic() + timeout, None
        while True:
            try:
                if predicate():
                    return
            except Exception as err:  # a transient error is just "not yet"
                last_error = err
            if time.monotonic() > deadline:
                name = what or getattr(predicate, "__name__", repr(predicate))
                hint = f" (last error: {last_error!r})" if last_error else ""
                raise AssertionError(f"timed out after {timeout}s waiting for {name}{hint}")
            time.sleep(0.05)
