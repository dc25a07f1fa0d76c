"""Asynchronous calls in a fleet: a status request may reach any activator replica (Envoy
balances over all of them), but a call's result is on the disk of the replica that took
it. The call's id names that replica (`<member>.<random>`), and a replica asked about a
call it does not keep fetches the answer from the owner and relays it.

Owns: the id scheme (`new_call_id`, `owner_of`), the decision whether a status request is
answered here or at another replica (`where_answered`, pure), and that fetch
(`StatusForwarder`): the owner's address comes from the fleet's registry of activators
(`Replicas.address_of`, injected: etcd in a fleet), never from the request, so a client
cannot make the activator call an address of its choosing. A forwarded request carries
FORWARDED_HEADER and is always answered from the spool of the replica it reaches, so a
request is forwarded at most once.

Must not: read the spool (async_calls.py) or know how the registry is stored.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from activator.proxy import HOP_BY_HOP
from torpor import metrics
from torpor.errors import TorporError
from torpor.logs import event
from torpor.model import Endpoint
from torpor.routes import SERVICE_HEADER, VERSION_HEADER

log = logging.getLogger("torpor.activator")

#: Marks a status request one replica forwarded to another: answered from the local spool
#: only (never forwarded again). Its value is the forwarding replica's name, for logs.
FORWARDED_HEADER = "x-torpor-async-forwarded"
#: The longest a forwarded status request may take, connection included: the owner reads
#: one file; a slower owner is answered as unreachable rather than holding the client.
FORWARD_SECONDS = 10.0
CONNECT_SECONDS = 2.0
#: Seconds a client is told to wait before asking again when the owner may come back.
RETRY_AFTER_SECONDS = 2
#: Response headers of the owner's answer not relayed: the connection's own, the framing
#: (the body is relayed whole) and the owner's server and date. The owner chose the rest
#: (a result's kept content headers, a status answer's Retry-After).
NOT_RELAYED = HOP_BY_HOP | {"content-length", "date", "server"}
#: A body the owner's JSON answers need beyond the largest result (async_max_bytes).
SLACK_BYTES = 64 * 1024

#: The random part of an id: secrets.token_urlsafe(18), 24 URL-safe characters.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{24}")
#: A member name that can be part of an id (URL-safe, a file name, an etcd key part): the
#: rule of `store.member`, shorter so that the spool's file names stay below 255 bytes.
_MEMBER = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
MAX_MEMBER_CHARS = 200

#: member name → its HTTP/1 address, or None when no such replica is registered; raises
#: TorporError when the registry cannot be read.
AddressOf = Callable[[str], Awaitable[Endpoint | None]]


def valid_member(name: str) -> bool:
    """Whether `name` can name the owner in a call id."""
    return len(name) <= MAX_MEMBER_CHARS and _MEMBER.fullmatch(name) is not None


@dataclasses.dataclass(frozen=True)
class Replicas:
    """This replica's name in the fleet and where the others are (the registry's lookup)."""

    me: str
    address_of: AddressOf

    def __post_init__(self) -> None:
        if not valid_member(self.me):
            raise ValueError(
                f"the member name {self.me!r} cannot be part of an asynchronous call's id: "
                f"use letters, digits, '-', '_' and '.' (at most {MAX_MEMBER_CHARS}), "
                "starting and ending with a letter or digit (store.member or --member)")


def new_call_id(owner: str | None) -> str:
    """An unguessable id (anyone holding the status URL reads the result), naming the
    replica that keeps the call when there is a fleet (`owner`)."""
    token = secrets.token_urlsafe(18)
    return token if owner is None else f"{owner}.{token}"


def owner_of(call_id: str) -> str | None:
    """The replica an id names, or None (an id of one process, or not an id at all). The
    token has no '.', so the owner is what comes before the last one."""
    owner, dot, token = call_id.rpartition(".")
    if not dot or _TOKEN.fullmatch(token) is None or not valid_member(owner):
        return None
    return owner


def where_answered(call_id: str, *, kept_here: bool, me: str | None,
                   forwarded: bool) -> str | None:
    """The replica to fetch a status from, or None to answer here: here when the call is
    kept here (also a shared spool, or a call from before this replica was renamed), when
    there is no fleet (`me` None), when the request was forwarded already, and when the
    id names no other replica."""
    if kept_here or me is None or forwarded:
        return None
    owner = owner_of(call_id)
    return None if owner is None or owner == me else owner


class StatusForwarder:
    """Fetches a status from the replica that owns the call, bounded in time and size."""

    def __init__(self, replicas: Replicas, max_bytes: int) -> None:
        self._replicas = replicas
        self._max_bytes = max_bytes + SLACK_BYTES
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=FORWARD_SECONDS,
                                          sock_connect=CONNECT_SECONDS))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, request: web.Request, owner: str, service: str) -> web.Response:
        """The owner's answer to this status request (same path, Host and service
        headers), or a JSON error when it cannot be had: 404 `unknown_call` when no replica
        of that name is registered (it stopped or died, and its calls with it), 503 +
        Retry-After when the registry cannot be read or the owner does not answer (it may
        be restarting; once its registration expires the answer becomes the 404)."""
        failed = _Failure(owner, service)
        try:
            address = await self._replicas.address_of(owner)
        except TorporError as exc:
            return failed("registry_unavailable", "registry_unavailable", 503,
                          f"cannot look up the activator replica {owner} that keeps this "
                          f"call: {exc}; ask again shortly")
        if address is None:
            return failed("owner_gone", "unknown_call", 404,
                          f"the activator replica {owner} that kept this call is gone (not "
                          "registered any more), and its result with it; submit the call "
                          "again if that is safe")
        try:
            status, headers, body = await self._get(address, request)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return failed("owner_unreachable", "async_owner_unreachable", 503,
                          f"the activator replica {owner} that keeps this call did not "
                          f"answer ({exc!r}); ask again shortly")
        except OverflowError as exc:
            return failed("too_large", "async_result_too_large", 502, str(exc))
        metrics.ASYNC_STATUS_FORWARDS.labels(outcome="relayed").inc()
        response = web.Response(status=status, body=body)
        for key, value in headers.items():
            response.headers[key] = value
        return response

    async def _get(self, address: Endpoint, request: web.Request
                   ) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        headers = {"Host": request.headers.get("Host", ""),
                   FORWARDED_HEADER: self._replicas.me}
        for name in (SERVICE_HEADER, VERSION_HEADER):
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        url = f"http://{address.host}:{address.port}{request.raw_path}"
        async with self._session.get(url, headers=headers, allow_redirects=False) as response:
            body = await response.content.read(self._max_bytes + 1)
            if len(body) > self._max_bytes:
                raise OverflowError(f"the owner's answer is above {self._max_bytes} bytes "
                                    "(activator.async_max_bytes here); not relayed")
            kept = {k.lower(): v for k, v in response.headers.items()
                    if k.lower() not in NOT_RELAYED}
            return response.status, kept, body


@dataclasses.dataclass(frozen=True)
class _Failure:
    """A status that could not be fetched from its owner, as the client gets it (the
    handler's JSON body, Retry-After when asking again may help), counted and logged."""

    owner: str
    service: str

    def __call__(self, outcome: str, code: str, status: int, message: str) -> web.Response:
        metrics.ASYNC_STATUS_FORWARDS.labels(outcome=outcome).inc()
        event(log, "activator.async_forward_failed", service=self.service, owner=self.owner,
              outcome=outcome, error=message,
              level=logging.INFO if status == 404 else logging.WARNING)
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
        return web.json_response({"error": code, "service": self.service, "message": message},
                                 status=status, headers=headers)
