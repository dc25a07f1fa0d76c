"""Asynchronous calls: accept a `Prefer: respond-async` request at once (202 + Location),
run it without the client (wake the service if it sleeps, then call a ready replica), and
keep its answer until the client fetches it.

Owns: the spool of calls (one JSON file of metadata and one file of body per call, under
`activator.async_spool`), their bounds (request and result size: `async_max_bytes`; age:
`async_result_ttl`; count: `async_max_calls`), and the answers to a status request. A
call never disappears silently: a result too large, a wake that failed, an activator that
stopped or restarted while the call ran, each leaves a failed call whose status says why.
Holding, waking and the answers of a failed hold are holding.py's and answers.py's; which
replica of a fleet keeps a call, and fetching a status from it, async_owners.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from activator.answers import Answer, answer_for
from activator.async_owners import (
    FORWARDED_HEADER,
    Replicas,
    StatusForwarder,
    new_call_id,
    where_answered,
)
from activator.holding import Holding, Ready
from activator.proxy import HOP_BY_HOP
from torpor import metrics
from torpor.async_calls import PREFER_HEADER, STATUS_PATH
from torpor.logs import event
from torpor.model import Endpoint

log = logging.getLogger("torpor.activator")

#: Seconds a client is told to wait between status requests.
POLL_SECONDS = 1
RUNNING, DONE, FAILED = "running", "done", "failed"
#: Request headers not passed on: the connection's own, and the body framing and the
#: preference that this hop consumed (the call is made with the body read whole).
_NOT_FORWARDED = HOP_BY_HOP | {"content-length", "expect", PREFER_HEADER}
#: Response headers of the call kept with its result (the rest are the replica's business).
KEPT_HEADERS = ("content-type", "content-encoding", "content-language", "cache-control")


@dataclasses.dataclass(frozen=True)
class CallState:
    """One call as the spool keeps it (its body is a separate file)."""

    id: str
    service: str
    state: str  # RUNNING, DONE or FAILED
    created: float
    status: int | None = None  # the call's own HTTP status once DONE (or the failure's)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str | None = None


class ResultSpool:
    """Calls on disk: survives an activator restart (a call that was running is then
    marked failed, not lost); bounded in size per call, in age and in count. `owner`: the
    replica's name in a fleet, which every id it makes starts with (None: one process)."""

    def __init__(self, directory: Path, ttl: float, max_calls: int,
                 clock: Callable[[], float] = time.time, owner: str | None = None) -> None:
        self._dir = directory
        self._owner = owner
        self._ttl = ttl
        self._max_calls = max_calls
        self._clock = clock

    def open(self) -> None:
        """Create the folder (owner only: results may be private) and settle what a
        previous run left: expired calls go, calls that were running fail."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.prune()
        for state in self._states():
            if state.state == RUNNING:
                self.fail(state.id, 503, "the activator stopped while the call ran; "
                          "it may or may not have run: submit it again if that is safe")

    def create(self, service: str) -> CallState:
        """A new running call of `service`, with an unguessable id (anyone holding the
        status URL can read the result). Raises OverflowError at `max_calls`."""
        self.prune()
        if sum(1 for _ in self._dir.glob("*.json")) >= self._max_calls:
            raise OverflowError(f"{self._max_calls} asynchronous calls are kept already "
                                "(activator.async_max_calls); fetch or wait for some")
        state = CallState(new_call_id(self._owner), service, RUNNING, self._clock())
        self._write(state)
        return state

    def finish(self, call_id: str, status: int, headers: dict[str, str], body: bytes) -> None:
        state = self.get(call_id)
        if state is None:
            return  # expired meanwhile
        self._body_path(call_id).write_bytes(body)
        self._write(dataclasses.replace(state, state=DONE, status=status, headers=headers))

    def fail(self, call_id: str, status: int, message: str, code: str = "async_call_failed"
             ) -> None:
        state = self.get(call_id)
        if state is None:
            return
        body = json.dumps({"error": code, "service": state.service, "message": message})
        self._body_path(call_id).write_text(body)
        self._write(dataclasses.replace(state, state=FAILED, status=status, error=message,
                                        headers={"content-type": "application/json"}))

    def get(self, call_id: str) -> CallState | None:
        """The call, or None if unknown or expired."""
        if not call_id or "/" in call_id or call_id.startswith("."):
            return None
        try:
            raw = json.loads(self._meta_path(call_id).read_text())
        except (OSError, ValueError):
            return None
        state = CallState(**raw)
        if self._clock() - state.created > self._ttl:
            self._remove(call_id)
            return None
        return state

    def body(self, call_id: str) -> bytes:
        try:
            return self._body_path(call_id).read_bytes()
        except OSError:
            return b""

    def prune(self) -> None:
        """Forget calls older than the TTL."""
        for state in self._states():
            if self._clock() - state.created > self._ttl:
                self._remove(state.id)

    def _states(self) -> list[CallState]:
        out = []
        for meta in self._dir.glob("*.json"):
            try:
                out.append(CallState(**json.loads(meta.read_text())))
            except (OSError, ValueError, TypeError):
                meta.unlink(missing_ok=True)  # a torn write of a crashed run
        return out

    def _write(self, state: CallState) -> None:
        """Atomically: a reader sees the old metadata or the new, never half."""
        tmp = self._dir / f".{state.id}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(state)))
        os.replace(tmp, self._meta_path(state.id))

    def _remove(self, call_id: str) -> None:
        self._meta_path(call_id).unlink(missing_ok=True)
        self._body_path(call_id).unlink(missing_ok=True)

    def _meta_path(self, call_id: str) -> Path:
        return self._dir / f"{call_id}.json"

    def _body_path(self, call_id: str) -> Path:
        return self._dir / f"{call_id}.body"


Forward = Callable[[str, tuple[Endpoint, ...], "CallRequest"],
                   Awaitable[tuple[int, dict[str, str], bytes]]]


@dataclasses.dataclass(frozen=True)
class CallRequest:
    """What is kept of an accepted request to make the call later (its body read whole,
    within `async_max_bytes`)."""

    method: str
    path_qs: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


class AsyncCalls:
    """Accepts calls (202), runs them in the background, answers status requests (in a
    fleet, `replicas`: fetching those of calls another replica keeps from it)."""

    def __init__(self, spool: ResultSpool, holding: Holding, max_bytes: int,
                 proxy_timeout: float | None = None, replicas: Replicas | None = None
                 ) -> None:
        self._spool = spool
        self._me = replicas.me if replicas is not None else None
        self._forwarder = StatusForwarder(replicas, max_bytes) if replicas else None
        self._holding = holding
        self._max_bytes = max_bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0,
                                              sock_read=proxy_timeout)

    async def start(self) -> None:
        self._spool.open()
        if self._forwarder is not None:
            await self._forwarder.start()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), timeout=self._timeout)

    async def stop(self) -> None:
        """Calls still running are failed (and say so), never left 'running' forever."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._forwarder is not None:
            await self._forwarder.stop()

    # --- accepting ----------------------------------------------------------------------

    async def submit(self, request: web.Request, service: str) -> web.Response:
        """202 + Location at once; the call runs without the client."""
        if request.content_length is not None and request.content_length > self._max_bytes:
            return _too_large(service, self._max_bytes)
        try:
            body = await request.content.read(self._max_bytes + 1)
            if len(body) > self._max_bytes or not request.content.at_eof():
                return _too_large(service, self._max_bytes)
            state = self._spool.create(service)
        except OverflowError as exc:
            return web.json_response({"error": "async_calls_full", "service": service,
                                      "message": str(exc)}, status=503,
                                     headers={"Retry-After": str(POLL_SECONDS * 30)})
        headers = tuple((k, v) for k, v in request.headers.items()
                        if k.lower() not in _NOT_FORWARDED)
        call = CallRequest(request.method, request.path_qs, headers, body)
        task = asyncio.get_running_loop().create_task(self._run(state, call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        metrics.ASYNC_CALLS.labels(service=service, outcome="accepted").inc()
        event(log, "activator.async_accepted", service=service, call=state.id)
        location = STATUS_PATH + state.id
        return web.json_response(
            {"status": RUNNING, "service": service, "location": location}, status=202,
            headers={"Location": location, "Preference-Applied": "respond-async",
                     "Retry-After": str(POLL_SECONDS)})

    async def _run(self, state: CallState, call: CallRequest) -> None:
        """Hold (wake if asleep), call a ready replica, keep the answer."""
        try:
            outcome = await self._holding.hold(state.service)
            if not isinstance(outcome, Ready):
                answer = answer_for(outcome)
                self._fail(state, answer.status, answer.message, answer.code)
                return
            status, headers, body = await self._call(outcome.endpoints, call)
            if len(body) > self._max_bytes:
                self._fail(state, 502, f"the result is {len(body)} bytes, above "
                           f"activator.async_max_bytes ({self._max_bytes}); not kept",
                           "async_result_too_large")
                return
            self._spool.finish(state.id, status, headers, body)
            metrics.ASYNC_CALLS.labels(service=state.service, outcome="done").inc()
            event(log, "activator.async_done", service=state.service, call=state.id,
                  status=status)
        except asyncio.CancelledError:
            self._fail(state, 503, "the activator stopped while the call ran; it may or "
                       "may not have run: submit it again if that is safe")
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._fail(state, 502, f"calling the service failed: {exc!r}",
                       "upstream_failed")

    async def _call(self, endpoints: tuple[Endpoint, ...], call: CallRequest
                    ) -> tuple[int, dict[str, str], bytes]:
        """The first endpoint that takes the connection answers (another is tried only
        when the connection itself failed: the call never ran twice)."""
        assert self._session is not None
        last: Exception | None = None
        for endpoint in endpoints:
            url = f"http://{endpoint.host}:{endpoint.port}{call.path_qs}"
            try:
                async with self._session.request(call.method, url, headers=list(call.headers),
                                                 data=call.body) as response:
                    body = await response.content.read(self._max_bytes + 1)
                    kept = {k.lower(): v for k, v in response.headers.items()
                            if k.lower() in KEPT_HEADERS}
                    return response.status, kept, body
            except aiohttp.ClientConnectorError as exc:
                last = exc
        raise last or aiohttp.ClientError("no ready endpoint")

    def _fail(self, state: CallState, status: int, message: str,
              code: str = "async_call_failed") -> None:
        self._spool.fail(state.id, status, message, code)
        metrics.ASYNC_CALLS.labels(service=state.service, outcome="failed").inc()
        event(log, "activator.async_failed", service=state.service, call=state.id,
              status=status, error=message, level=logging.WARNING)

    # --- status -------------------------------------------------------------------------

    def service_of(self, call_id: str) -> str | None:
        """The service a kept call was made to (a version's name, for a service with
        versions), or None."""
        state = self._spool.get(call_id)
        return state.service if state is not None else None

    def kept_elsewhere(self, call_id: str, headers: Mapping[str, str]) -> str | None:
        """The replica that keeps `call_id` when it is not this one and the status request
        (its `headers`) may be forwarded there; None: answer it here (`status`)."""
        return where_answered(call_id, kept_here=self._spool.get(call_id) is not None,
                              me=self._me, forwarded=FORWARDED_HEADER in headers)

    async def fetch_status(self, request: web.Request, owner: str, service: str
                           ) -> web.Response:
        """The answer of the replica `owner` to this status request (`kept_elsewhere`)."""
        assert self._forwarder is not None
        return await self._forwarder.fetch(request, owner, service)

    def status(self, call_id: str, service: str) -> web.Response:
        """202 while the call runs; then its own status, headers and body. A call is
        fetched under the host it was made to (another service's host does not find it)."""
        state = self._spool.get(call_id)
        if state is None or state.service != service:
            return web.json_response(
                {"error": "unknown_call", "service": service,
                 "message": "no such asynchronous call (never made, made to another host, "
                            "or older than activator.async_result_ttl)"}, status=404)
        if state.state == RUNNING:
            return web.json_response(
                {"status": RUNNING, "service": service, "location": STATUS_PATH + call_id},
                status=202, headers={"Retry-After": str(POLL_SECONDS)})
        assert state.status is not None
        response = web.Response(status=state.status, body=self._spool.body(call_id))
        for key, value in state.headers.items():
            response.headers[key] = value
        return response


def _too_large(service: str, limit: int) -> web.Response:
    answer = Answer(413, "request_too_large", 0,
                    f"an asynchronous call's body may hold at most {limit} bytes "
                    "(activator.async_max_bytes)")
    return web.json_response({"error": answer.code, "service": service,
                              "message": answer.message}, status=answer.status)


def describe(state: CallState) -> dict[str, Any]:
    """For logs and tests: the call without its body."""
    return dataclasses.asdict(state)
