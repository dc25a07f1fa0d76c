"""One gRPC channel to an etcd cluster, its stubs, and the errors callers may see.

Owns: the channel (every endpoint of `store.endpoints` in one target, so that gRPC fails
over between them; TLS with `store.tls`, and etcd's user/password auth with `store.user`),
the per-call timeout, key naming under the configured prefix, and turning gRPC failures
into StoreUnavailableError with the endpoints in the message. Must not know what the keys
mean.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from torpor.config import ClientTlsConfig
from torpor.errors import StoreError

T = TypeVar("T")

#: etcd refuses a transaction with more operations than this (its --max-txn-ops default).
MAX_TXN_OPS = 128
#: Larger than etcd's default request limit (1.5 MiB): a full listing is paged anyway.
_MAX_MESSAGE = 64 * 1024 * 1024


class StoreUnavailableError(StoreError):
    """etcd did not answer (down, unreachable, or slower than the call timeout)."""


def reraise_if_cancelling(exc: BaseException) -> None:
    """In a retry loop's `except StoreError`: if this task is being cancelled (a stop),
    raise CancelledError. gRPC turns a cancel during a call into its own error, which a
    loop that retries store errors would otherwise swallow, and its stop would hang."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


def grpc_target(endpoints: Sequence[str]) -> str:
    """A gRPC target for etcd's client endpoints. Several IP endpoints become one
    `ipv4:` target, so that gRPC fails over between them; a DNS name (one endpoint, e.g.
    a Kubernetes Service) is resolved by gRPC."""
    if len(endpoints) == 1:
        return endpoints[0]
    hosts = [e.rpartition(":")[0] for e in endpoints]
    try:
        for host in hosts:
            ipaddress.IPv4Address(host)
    except ValueError:
        return endpoints[0]  # names: the first (a Service balances); see README
    return "ipv4:" + ",".join(endpoints)


def range_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclasses.dataclass(frozen=True)
class EtcdCredentials:
    """How torpor proves itself to etcd: TLS files (the CA of etcd's certificate, and a
    client certificate when etcd runs with --client-cert-auth), and/or a user of etcd's
    auth with its password (read from store.password_file)."""

    tls: ClientTlsConfig | None = None
    user: str | None = None
    password: str | None = None


def channel_credentials(tls: ClientTlsConfig) -> grpc.ChannelCredentials:
    """grpc's TLS credentials from the files of `store.tls` (None where not given: the
    system's CAs, no client certificate). Raises StoreError naming a file it cannot read."""

    def read(path: Any, key: str) -> bytes | None:
        if path is None:
            return None
        try:
            return bytes(path.read_bytes())
        except OSError as exc:
            raise StoreError(f"store.tls.{key}: cannot read {path}: {exc.strerror}") from exc

    return grpc.ssl_channel_credentials(root_certificates=read(tls.ca, "ca"),
                                        private_key=read(tls.key, "key"),
                                        certificate_chain=read(tls.cert, "cert"))


#: etcd's simple tokens expire after 5 minutes by default (--auth-token-ttl): a new one is
#: fetched well before.
TOKEN_REFRESH_EVERY = 60.0


class _AuthToken:
    """etcd's auth token for `user`: fetched with Authenticate on a channel of its own,
    refreshed every TOKEN_REFRESH_EVERY, and added as `token` metadata to every call (by
    the interceptors below)."""

    def __init__(self, channel: grpc.aio.Channel, user: str, password: str,
                 timeout: float) -> None:
        self._auth = rpc.AuthStub(channel)
        self._channel = channel
        self._user, self._password, self._timeout = user, password, timeout
        self._token = ""
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        async with self._lock:
            if not self._token or time.monotonic() - self._fetched > TOKEN_REFRESH_EVERY:
                response = await self._auth.Authenticate(
                    rpc.AuthenticateRequest(name=self._user, password=self._password),
                    timeout=self._timeout)
                self._token, self._fetched = str(response.token), time.monotonic()
            return self._token

    async def close(self) -> None:
        await self._channel.close()


class _TokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
                        grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
                        grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds etcd's `token` metadata to every call of the channel."""

    def __init__(self, token: _AuthToken) -> None:
        self._token = token

    async def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), ("token", await self._token.get())]
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(await self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any,
                                     request: Any) -> Any:
        return await continuation(await self._details(details), request)

    async def intercept_stream_stream(self, continuation: Any, details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(await self._details(details), request_iterator)


class EtcdConnection:
    """The channel and stubs one process uses for every etcd call."""

    def __init__(self, endpoints: Sequence[str], prefix: str = "/torpor/",
                 timeout: float = 5.0, credentials: EtcdCredentials | None = None) -> None:
        self.endpoints = tuple(endpoints)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.timeout = timeout
        self.credentials = credentials or EtcdCredentials()
        self._token: _AuthToken | None = None
        self._channel: grpc.aio.Channel | None = None
        self.kv: Any = None
        self.watch: Any = None
        self.lease: Any = None

    def key(self, *parts: str) -> bytes:
        """`prefix` + parts joined by "/", as etcd bytes."""
        return (self.prefix + "/".join(parts)).encode()

    async def open(self) -> None:
        """Create the channel and check that etcd answers, so that a wrong endpoint fails
        at start with a clear message instead of at the first wake."""
        if self._channel is not None:
            return
        interceptors = None
        creds = self.credentials
        if creds.user is not None:
            self._token = _AuthToken(self._new_channel(None), creds.user,
                                     creds.password or "", self.timeout)
            interceptors = [_TokenInterceptor(self._token)]
        self._channel = self._new_channel(interceptors)
        self.kv = rpc.KVStub(self._channel)
        self.watch = rpc.WatchStub(self._channel)
        self.lease = rpc.LeaseStub(self._channel)
        try:
            await self.call("connect", self.kv.Range,
                            rpc.RangeRequest(key=self.key(), count_only=True))
        except StoreError:
            await self.close()
            raise

    def _new_channel(self, interceptors: list[Any] | None) -> grpc.aio.Channel:
        """A channel to every endpoint: TLS with store.tls, else plaintext."""
        target = grpc_target(self.endpoints)
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE),
                   ("grpc.keepalive_time_ms", 10_000),
                   ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.keepalive_permit_without_calls", 1)]
        if self.credentials.tls is not None:
            return grpc.aio.secure_channel(target, channel_credentials(self.credentials.tls),
                                           options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
        token, self._token = self._token, None
        if token is not None:
            await token.close()

    async def call(self, what: str, method: Callable[..., Awaitable[T]], request: Any,
                   timeout: float | None = None) -> T:
        """One unary call with the call timeout; gRPC errors become StoreUnavailableError
        (or StoreError for a refused request) naming the operation and the endpoints."""
        if self._channel is None:
            raise StoreError(f"etcd {self.where}: not connected")
        try:
            return await method(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self.error(what, exc) from exc

    def error(self, what: str, exc: grpc.aio.AioRpcError) -> StoreError:
        """The StoreError a failed call means to callers."""
        code = exc.code()
        text = f"etcd {self.where}: {what}: {code.name}: {exc.details()}"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
            return StoreUnavailableError(text)
        return StoreError(text)

    @property
    def where(self) -> str:
        return ",".join(self.endpoints)

    # --- small helpers shared by the store, the lock and the election --------------------

    async def get(self, key: bytes) -> Any | None:
        """The KeyValue at `key`, or None."""
        response = await self.call("get", self.kv.Range, rpc.RangeRequest(key=key))
        return response.kvs[0] if response.kvs else None

    async def create(self, key: bytes, value: bytes, lease: int) -> tuple[bool, Any]:
        """Put `key` only if it does not exist. Returns (created, response): on success the
        response header's revision is the key's create revision; otherwise the response
        carries the existing KeyValue (responses[0].response_range.kvs)."""
        txn = rpc.TxnRequest(
            compare=[rpc.Compare(key=key, target=rpc.Compare.CREATE,
                                 result=rpc.Compare.EQUAL, create_revision=0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value,
                                                               lease=lease))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
        )
        response = await self.call("create", self.kv.Txn, txn)
        return bool(response.succeeded), response

    async def delete_if_created_at(self, key: bytes, create_revision: int) -> bool:
        """Delete `key` only if it is still the one created at `create_revision` (never a
        key someone else created after ours expired)."""
        txn = rpc.TxnRequest(
            compare=[rpc.Compare(key=key, target=rpc.Compare.CREATE,
                                 result=rpc.Compare.EQUAL, create_revision=create_revision)],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))],
        )
        response = await self.call("delete", self.kv.Txn, txn)
        return bool(response.succeeded)
