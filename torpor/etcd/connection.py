"""One gRPC channel to an etcd cluster, its stubs, and the errors callers may see.

Owns: the channel (every endpoint of `store.endpoints` in one target, so that gRPC fails
over between them), the per-call timeout, key naming under the configured prefix, and
turning gRPC failures into StoreUnavailableError with the endpoints in the message. Must
not know what the keys mean.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from aetcd import rpc

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


class EtcdConnection:
    """The channel and stubs one process uses for every etcd call."""

    def __init__(self, endpoints: Sequence[str], prefix: str = "/torpor/",
                 timeout: float = 5.0) -> None:
        self.endpoints = tuple(endpoints)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.timeout = timeout
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
        self._channel = grpc.aio.insecure_channel(
            grpc_target(self.endpoints),
            options=[("grpc.max_receive_message_length", _MAX_MESSAGE),
                     ("grpc.keepalive_time_ms", 10_000),
                     ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 1)])
        self.kv = rpc.KVStub(self._channel)
        self.watch = rpc.WatchStub(self._channel)
        self.lease = rpc.LeaseStub(self._channel)
        try:
            await self.call("connect", self.kv.Range,
                            rpc.RangeRequest(key=self.key(), count_only=True))
        except StoreError:
            await self.close()
            raise

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

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
