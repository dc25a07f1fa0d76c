"""activator/answers.py: every way a held request can leave, and what each front says.

The table pins the one mapping both fronts share; the renderings pin the wire form of one
answer on each front; the HTTP/1 handler tests pin the JSON answers clients got before the
two holding paths were merged (status, body, Retry-After), through a real Holding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from activator.answers import (
    GRPC_DEADLINE_EXCEEDED,
    GRPC_INTERNAL,
    GRPC_NOT_FOUND,
    GRPC_UNAVAILABLE,
    READY,
    Answer,
    answer_for,
    internal_error,
    unknown_host,
    upstream_failed,
)
from activator.h2_holder import RETRY_HEADER, render
from activator.handler import ActivatorHandler, json_answer
from activator.holding import (
    DeadlinePassed,
    FlipUnconfirmed,
    HeldRequests,
    Holding,
    Outcome,
    QueueFull,
    Ready,
    ServiceLookup,
    UnknownService,
    WakeFailed,
)
from activator.proxy import Proxy
from torpor.config import ServiceConfig
from torpor.errors import UnknownServiceError, WakeFailedError
from torpor.model import Endpoint

# outcome → (HTTP status, code, gRPC status, retry_after, retry marker, message)
TABLE: list[tuple[Outcome, tuple[int, str, int, bool, bool, str]]] = [
    (Ready("svc", (Endpoint("127.0.0.1", 1),), 0.25),
     (503, "ready", GRPC_UNAVAILABLE, False, True, "waking")),
    (QueueFull("svc", "service 'svc' already has 3 requests waiting"),
     (503, "queue_full", GRPC_UNAVAILABLE, True, False,
      "service 'svc' already has 3 requests waiting")),
    (DeadlinePassed("svc", "wake", 0.05),
     (504, "wake_timeout", GRPC_DEADLINE_EXCEEDED, True, False,
      "service 'svc' did not become ready within 0.05s")),
    (DeadlinePassed("svc", "flip", 30.0),
     (504, "flip_timeout", GRPC_DEADLINE_EXCEEDED, True, False,
      "service 'svc' is ready but the gateway did not confirm its route within 30s")),
    (WakeFailed("svc", "timeout", "svc: not ready in 120s"),
     (504, "wake_timeout", GRPC_DEADLINE_EXCEEDED, True, False, "svc: not ready in 120s")),
    (WakeFailed("svc", "failed", "svc: lock busy"),
     (503, "wake_failed", GRPC_UNAVAILABLE, True, False, "svc: lock busy")),
    (UnknownService("svc", "unknown service 'svc'"),
     (404, "unknown_service", GRPC_NOT_FOUND, False, False, "unknown service 'svc'")),
    (FlipUnconfirmed("svc", "envoy-2 did not ACK"),
     (503, "flip_unconfirmed", GRPC_UNAVAILABLE, True, False,
      "service 'svc' is ready but the gateway did not confirm its route: envoy-2 did not ACK")),
]


@pytest.mark.parametrize(("outcome", "expected"), TABLE,
                         ids=[f"{type(o).__name__}-{i}" for i, (o, _) in enumerate(TABLE)])
def test_every_outcome_has_its_answer(outcome: Outcome,
                                      expected: tuple[int, str, int, bool, bool, str]) -> None:
    answer = answer_for(outcome)
    assert (answer.status, answer.code, answer.grpc_status, answer.retry_after, answer.retry,
            answer.message) == expected


def test_only_ready_carries_the_retry_marker() -> None:
    assert answer_for(Ready("svc", (), 0.0)) is READY
    assert [o for o, _ in TABLE if answer_for(o).retry] == [TABLE[0][0]]


def test_answers_outside_holding() -> None:
    assert unknown_host("nobody.localhost") == Answer(
        404, "unknown_host", GRPC_NOT_FOUND,
        "no torpor service is configured for host 'nobody.localhost'")
    assert upstream_failed("svc", "refused") == Answer(
        502, "upstream_failed", GRPC_UNAVAILABLE,
        "service 'svc' is ready but the request could not be forwarded: refused")
    assert internal_error("boom") == Answer(500, "internal_error", GRPC_INTERNAL,
                                            "activator error: boom")


def test_one_answer_on_both_fronts() -> None:
    answer = answer_for(WakeFailed("svc", "failed", "svc: lock busy (é)"))

    response = json_answer(answer, service="svc")
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert response.content_type == "application/json"
    assert isinstance(response.body, bytes)
    assert json.loads(response.body) == {"error": "wake_failed", "service": "svc",
                                         "message": "svc: lock busy (é)"}
    assert list(json.loads(response.body)) == ["error", "service", "message"]

    headers, body = render(answer, "application/grpc+proto")
    assert headers == [(":status", "503"), ("retry-after", "1"),
                       ("content-type", "application/grpc+proto"), ("grpc-status", "14"),
                       ("grpc-message", "svc: lock busy (%C3%A9)")]
    assert body == b""

    headers, body = render(answer, "application/json")
    assert headers == [(":status", "503"), ("retry-after", "1"),
                       ("content-type", "text/plain; charset=utf-8"),
                       ("content-length", str(len(body)))]
    assert body == "svc: lock busy (é)\n".encode()
    assert RETRY_HEADER not in dict(headers)


def test_ready_renders_as_the_retry_marker() -> None:
    headers, body = render(READY, "")
    assert headers == [(":status", "503"), (RETRY_HEADER, "1"), ("grpc-status", "14"),
                       ("grpc-message", "waking")]
    assert body == b""


# --- the HTTP/1 front's JSON answers, through a real Holding ---------------------------


class Waker:
    """wake() raises `error`, or never returns when there is none."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def wake(self, name: str, reason: str) -> tuple[Endpoint, ...]:
        if self.error is not None:
            raise self.error
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


SVC = ServiceConfig(name="svc", host="svc.localhost")


async def http1(waker: Waker, host: str = "svc.localhost", queue_full: bool = False
                ) -> tuple[int, dict[str, Any], str | None]:
    """Status, JSON body and Retry-After of a request for `host` (a stranger is unknown
    even after the refresh on a miss), with a 0.05s wake_timeout."""
    refreshed: list[str] = []

    async def on_miss() -> None:
        refreshed.append(host)

    held = HeldRequests(1)
    handler = ActivatorHandler(ServiceLookup(lambda host, path: {SVC.host: SVC}.get(host), on_miss),
                               Holding(held, waker, 0.05), Proxy())
    with held.slot("svc") if queue_full else contextlib.nullcontext():
        response = await handler.handle(
            make_mocked_request("GET", "/predict", headers={"Host": host}))
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    assert refreshed == ([] if host == SVC.host else [host])
    return response.status, json.loads(response.body), response.headers.get("Retry-After")


async def test_http1_unknown_host() -> None:
    assert await http1(Waker(), host="nobody.localhost") == (
        404, {"error": "unknown_host", "host": "nobody.localhost",
              "message": "no torpor service is configured for host 'nobody.localhost'"}, None)


async def test_http1_queue_full() -> None:
    status, body, retry_after = await http1(Waker(), queue_full=True)
    assert (status, body["error"], body["service"], retry_after) == (503, "queue_full", "svc",
                                                                     "1")


async def test_http1_deadline_answers_like_http2() -> None:
    """One mapping for both fronts: the deadline's 504 asks the client to retry shortly."""
    assert await http1(Waker()) == (
        504, {"error": "wake_timeout", "service": "svc",
              "message": "service 'svc' did not become ready within 0.05s"}, "1")


@pytest.mark.parametrize(("error", "expected"), [
    (WakeFailedError("svc: not ready in 120s", "timeout"),
     (504, {"error": "wake_timeout", "service": "svc", "message": "svc: not ready in 120s"},
      "1")),
    (WakeFailedError("svc: lock busy", "failed"),
     (503, {"error": "wake_failed", "service": "svc", "message": "svc: lock busy"}, "1")),
    (UnknownServiceError("unknown service 'svc'"),
     (404, {"error": "unknown_service", "service": "svc",
            "message": "unknown service 'svc'"}, None)),
])
async def test_http1_wake_errors(error: Exception,
                                 expected: tuple[int, dict[str, Any], str | None]) -> None:
    assert await http1(Waker(error)) == expected
