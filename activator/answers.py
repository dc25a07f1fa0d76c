"""What a client is told when the activator does not (or not yet) serve its request.

Owns: the one mapping from how a held request left (holding.Outcome) to an `Answer`: HTTP
status, error code, gRPC status, message, and whether it carries Retry-After (the client may
try again shortly) or the retry marker (Envoy replays the request to the replicas now). Both
fronts render these answers, so a failure means the same on HTTP/1 and HTTP/2: handler.py as
a JSON body, h2_holder.py as headers (trailers-only for gRPC).

Must not: render bytes or headers, hold, wake or log. Pure functions of their arguments, so
that the whole mapping is testable as a table.
"""

from __future__ import annotations

import dataclasses
from typing import assert_never

from activator.holding import (
    DeadlinePassed,
    Draining,
    FlipUnconfirmed,
    Outcome,
    QueueFull,
    Ready,
    UnknownService,
    WakeFailed,
)

#: Seconds a client is asked to wait before retrying a refused request.
RETRY_AFTER_SECONDS = 1

# gRPC status codes used in answers (grpc/doc/statuscodes.md).
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14


@dataclasses.dataclass(frozen=True)
class Answer:
    """What a request gets: an HTTP status, an error code (the JSON body's "error"), its
    gRPC equivalent and a message."""

    status: int
    code: str
    grpc_status: int
    message: str
    retry_after: bool = False  # carries Retry-After: the client may try again shortly
    retry: bool = False  # carries the retry marker: Envoy replays the request to the replicas


#: The one answer that carries the retry marker: the service is awake, the flip confirmed.
#: Only the HTTP/2 front sends it; HTTP/1 proxies a ready request itself.
READY = Answer(503, "ready", GRPC_UNAVAILABLE, "waking", retry=True)


def answer_for(outcome: Outcome) -> Answer:
    """The answer to a request that left holding with `outcome`.

    Everything but "unknown service" carries Retry-After: the service exists and may well
    serve a retry. Nothing but READY carries the retry marker: Envoy must replay a request
    only to replicas known to be ready and routed.
    """
    name = outcome.service
    match outcome:
        case Ready():
            return READY
        case QueueFull(message=message):
            return Answer(503, "queue_full", GRPC_UNAVAILABLE, message, retry_after=True)
        case DeadlinePassed(phase="wake", wake_timeout=timeout):
            return Answer(504, "wake_timeout", GRPC_DEADLINE_EXCEEDED,
                          f"service {name!r} did not become ready within {timeout:g}s",
                          retry_after=True)
        case DeadlinePassed(wake_timeout=timeout):
            return Answer(504, "flip_timeout", GRPC_DEADLINE_EXCEEDED,
                          f"service {name!r} is ready but the gateway did not confirm its "
                          f"route within {timeout:g}s", retry_after=True)
        case WakeFailed(outcome="timeout", message=message):
            return Answer(504, "wake_timeout", GRPC_DEADLINE_EXCEEDED, message,
                          retry_after=True)
        case WakeFailed(message=message):
            return Answer(503, "wake_failed", GRPC_UNAVAILABLE, message, retry_after=True)
        case UnknownService(message=message):
            return Answer(404, "unknown_service", GRPC_NOT_FOUND, message)
        case FlipUnconfirmed(error=error):
            return Answer(503, "flip_unconfirmed", GRPC_UNAVAILABLE,
                          f"service {name!r} is ready but the gateway did not confirm its "
                          f"route: {error}", retry_after=True)
        case Draining(when="refused"):
            return Answer(503, "draining", GRPC_UNAVAILABLE,
                          "the activator is shutting down; try again", retry_after=True)
        case Draining():
            return Answer(503, "draining", GRPC_UNAVAILABLE,
                          f"the activator is shutting down and service {name!r} was not ready "
                          "within its drain grace; try again", retry_after=True)
        case _:
            assert_never(outcome)


def unknown_host(host: str) -> Answer:
    """No service has this Host (or :authority), even after a catalog refresh."""
    return Answer(404, "unknown_host", GRPC_NOT_FOUND,
                  f"no torpor service is configured for host {host!r}")


def upstream_failed(name: str, error: str) -> Answer:
    """The service is ready but no endpoint took the request (HTTP/1 proxying)."""
    return Answer(502, "upstream_failed", GRPC_UNAVAILABLE,
                  f"service {name!r} is ready but the request could not be forwarded: {error}")


def internal_error(error: str) -> Answer:
    """A bug in the activator: the stream is answered rather than left hanging."""
    return Answer(500, "internal_error", GRPC_INTERNAL, f"activator error: {error}")
