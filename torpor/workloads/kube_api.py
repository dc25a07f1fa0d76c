"""Calls to the Kubernetes API through the official client, off the event loop, retried.

Owns: building the client (a kubeconfig file and context, else in-cluster config, else the
default kubeconfig), running its blocking calls on a small thread pool of their own (the
loop's default executor is too small to share with them), retrying what may pass on a
second try (409 conflict, 429, 5xx, no answer) with capped exponential backoff, and turning
what will not (403, 404, 422) into a WorkloadError that says what to fix. Must not know
what torpor does with Deployments: kubernetes.py and discovery.py decide that.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from torpor import metrics
from torpor.errors import WorkloadError
from torpor.logs import event

log = logging.getLogger("torpor.kubernetes")

#: Statuses worth another try: a conflict (someone wrote meanwhile), throttling, server
#: trouble; 0 stands for "no answer" (connection refused, reset, timed out).
RETRYABLE = frozenset({0, 409, 429, 500, 502, 503, 504})
#: What a failed call tells the operator to do, by status.
ADVICE = {
    401: "torpor's credentials were refused; check the kubeconfig or ServiceAccount token",
    403: "torpor's ServiceAccount lacks this permission; see deploy/ (RBAC) for what it needs",
    404: "it does not exist; check the namespace and name in the config or annotations",
    422: "the API server refused the value",
}
#: Seconds a single call may take (connect, read); watches set their own.
CALL_TIMEOUT = (5.0, 30.0)


def make_api_client(kubeconfig: Path | None, context: str | None) -> client.ApiClient:
    """A client for the configured cluster, without touching the library's global config:
    the named kubeconfig (and context), else the pod's ServiceAccount, else ~/.kube/config."""
    configuration = client.Configuration()
    try:
        if kubeconfig is not None or context is not None:
            config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None,
                                    context=context, client_configuration=configuration,
                                    persist_config=False)
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException:
                config.load_kube_config(client_configuration=configuration,
                                        persist_config=False)
    except (ConfigException, OSError) as exc:
        raise WorkloadError(f"cannot configure the Kubernetes client: {exc}") from exc
    # Watches hold a pooled connection each; the default pool (5 per core) is too small.
    configuration.connection_pool_maxsize = 64
    return client.ApiClient(configuration)


def status_of(exc: BaseException) -> int:
    """The HTTP status of a failed call; 0 when the server did not answer."""
    return int(exc.status or 0) if isinstance(exc, ApiException) else 0


def describe(exc: BaseException) -> str:
    """The API server's own message (its Status body) when it sent one."""
    if isinstance(exc, ApiException):
        try:
            body = json.loads(exc.body or "{}")
        except (TypeError, ValueError):
            body = {}
        message = body.get("message") if isinstance(body, dict) else None
        return f"{exc.status} {exc.reason}: {message or exc.body or ''}".strip()
    return f"no answer ({type(exc).__name__}: {exc})"


class KubeCalls:
    """Runs client calls on a dedicated pool, with retries and clear errors."""

    def __init__(self, api_client: client.ApiClient, attempts: int = 5,
                 base_delay: float = 0.2, max_delay: float = 5.0) -> None:
        self.api_client = api_client
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        self.autoscaling = client.AutoscalingV2Api(api_client)
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="torpor-kube")
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.api_client.close()

    async def call(self, operation: str, fn: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` off the loop, returning the JSON body as plain data.

        Retries RETRYABLE failures with capped, jittered exponential backoff; raises
        WorkloadError naming `operation`, the status and the server's message otherwise
        or once the attempts are spent."""
        kwargs.setdefault("_request_timeout", CALL_TIMEOUT)
        kwargs["_preload_content"] = False
        loop = asyncio.get_running_loop()
        for attempt in range(1, self._attempts + 1):
            try:
                response = await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
                return json.loads(response.data or b"null")
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                status = status_of(exc)
                metrics.KUBERNETES_API_ERRORS.labels(operation=operation,
                                                     status=str(status)).inc()
                if status not in RETRYABLE or attempt == self._attempts:
                    raise self._error(operation, exc, attempt) from exc
                delay = min(self._max_delay, self._base_delay * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)
                event(log, "kubernetes.retry", operation=operation, status=status,
                      attempt=attempt, delay=round(delay, 3), error=describe(exc),
                      level=logging.WARNING)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _error(operation: str, exc: BaseException, attempts: int) -> WorkloadError:
        status = status_of(exc)
        advice = ADVICE.get(status)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return WorkloadError(f"Kubernetes API: {operation} failed{tries}: {describe(exc)}"
                             + (f" ({advice})" if advice else ""))
