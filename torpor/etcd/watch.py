"""One etcd watch stream: events of a key or key range from a revision on.

Owns the stream's mechanics: the create request, a request side that stays open (etcd
ends a watch whose client half-closes), compaction reported as WatchCompactedError (the
caller must list again), and gRPC failures as StoreUnavailableError. Reconnecting and
resuming is the caller's: only it knows the last revision it applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aetcd import rpc

from torpor.errors import StoreError
from torpor.etcd.connection import EtcdConnection


class WatchCompactedError(StoreError):
    """The revision to resume from was compacted away: list again, then watch."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd watch: revision compacted (oldest kept {compact_revision})")
        self.compact_revision = compact_revision


async def watch(conn: EtcdConnection, key: bytes, end: bytes | None = None,
                start_revision: int = 0, deletes_only: bool = False,
                ) -> AsyncIterator[tuple[int, list[Any]]]:
    """Yield (response revision, events) for each watch response that carries events,
    starting with the first response after creation. Runs until the caller stops
    iterating (the stream is cancelled) or raises on a failure."""
    stop = asyncio.Event()
    create = rpc.WatchCreateRequest(key=key, range_end=end or b"",
                                    start_revision=start_revision,
                                    filters=[rpc.WatchCreateRequest.NOPUT] if deletes_only
                                    else [])

    async def requests() -> AsyncIterator[Any]:
        yield rpc.WatchRequest(create_request=create)
        await stop.wait()

    call = conn.watch.Watch(requests())
    try:
        async for response in call:
            if response.compact_revision:
                raise WatchCompactedError(response.compact_revision)
            if response.canceled:
                raise StoreError(f"etcd {conn.where}: watch cancelled by the server: "
                                 f"{response.cancel_reason or 'no reason given'}")
            if response.events:
                yield response.header.revision, list(response.events)
        raise conn.error("watch", _ended())
    except grpc.aio.AioRpcError as exc:
        raise conn.error("watch", exc) from exc
    finally:
        stop.set()
        call.cancel()


def _ended() -> grpc.aio.AioRpcError:
    """The error a watch stream that ended without a status means (etcd went away)."""
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                grpc.aio.Metadata(), details="watch stream ended")


def is_delete(event: Any) -> bool:
    return bool(event.type == rpc.Event.DELETE)
