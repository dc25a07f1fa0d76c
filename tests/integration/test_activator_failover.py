"""Fleet mode, Envoy's side: a request held by an activator replica that dies is replayed on
another replica, never lost (idempotent methods, PUT here; a POST only where the service
opted in: tests/integration/test_safe_retries.py).

A real Envoy, programmed by the in-process xDS server, fronts a hibernated service `svc`
whose endpoints are every activator replica (`activator_targets`). Replica A reads the
whole request and then drops the connection unanswered, as a replica killed with -9 while
holding it would (both ways the kernel may close: FIN, and RST). Replica B answers. Envoy's
`reset` retry with the previous_hosts predicate must move A's requests to B, body and all,
as long as the body fit the retry buffer; a bigger body must fail fast, not hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.support.aborting import AbortingUpstream, EchoUpstream
from tests.support.envoy import Envoy
from tests.support.net import free_port, wait_until
from tests.support.xds import XdsHarness, hibernated
from torpor.model import Endpoint

pytestmark = pytest.mark.envoy

REQUESTS = 40
BODY = b"x" * 100_000
ROUTE_TIMEOUT = 20.0  # short, so that "failed fast rather than hung" means something


@contextlib.asynccontextmanager
async def gateway(envoys: Callable[[int, str], Envoy], *activators: Endpoint,
                  **settings: Any) -> AsyncIterator[tuple[str, Envoy]]:
    """An Envoy in front of hibernated `svc` (→ every activator); yields its URL."""
    harness = XdsHarness(*activators, route_timeout=ROUTE_TIMEOUT, **settings)
    try:
        await harness.start([hibernated(harness, "svc")])
        envoy = envoys(harness.xds_port, "failover")
        await envoy.wait_ready()
        yield f"http://127.0.0.1:{harness.listen_port}/predict", envoy
    finally:
        await harness.stop()


async def send_all(url: str, host: str, body: bytes, n: int = REQUESTS,
                   method: str = "PUT") -> list[tuple[int, str, float]]:
    """n concurrent requests with a body: (status, body, seconds) each. PUT by default: an
    idempotent method, which Envoy replays after a reset (a POST only where the service
    opted in: tests/integration/test_safe_retries.py)."""
    timeout = aiohttp.ClientTimeout(total=ROUTE_TIMEOUT + 10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> tuple[int, str, float]:
            started = time.monotonic()
            async with session.request(method, url, data=body, headers={"Host": host}) as r:
                return r.status, await r.text(), time.monotonic() - started

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_requests_dropped_by_a_dying_activator_are_replayed_on_another(
    envoys: Callable[[int, str], Envoy], replica_a: AbortingUpstream,
    replica_b: EchoUpstream,
) -> None:
    async with gateway(envoys, replica_a.endpoint, replica_b.endpoint) as (url, envoy):
        # A hibernated service (its own cluster), and an unknown host (the catch-all's
        # activator cluster): both point at every replica.
        results = {host: await send_all(url, host, BODY) for host in ("svc.test", "nobody.test")}
        retries = {c: await envoy.stat(f"cluster.{c}.upstream_rq_retry")
                   for c in ("svc", "torpor_activator")}
        # The retry buffer is set with a field Envoy 1.40 does not deprecate.
        deprecated = await envoy.stat("runtime.deprecated_feature_use")
    seen_by_a = {h: sum(1 for host, _ in replica_a.received if host == h) for h in results}
    print(f"A dropped {seen_by_a} (body bytes read {sorted({n for _, n in replica_a.received})}),"
          f" B answered {replica_b.requests}; Envoy retries {retries}")
    for host, answers in results.items():
        assert [(status, text) for status, text, _ in answers] == (
            [(200, f"B {len(BODY)}")] * REQUESTS), host
        # Not round-robin luck: A really held (and dropped) some of them, whole.
        assert seen_by_a[host] >= 1, host
    assert {n for _, n in replica_a.received} == {len(BODY)}
    assert deprecated == 0
    assert replica_b.requests == 2 * REQUESTS
    assert retries == {"svc": seen_by_a["svc.test"], "torpor_activator": seen_by_a["nobody.test"]}


async def test_a_body_beyond_the_retry_buffer_fails_fast_instead_of_being_replayed(
    envoys: Callable[[int, str], Envoy], replica_a: AbortingUpstream,
    replica_b: EchoUpstream,
) -> None:
    """Envoy stops buffering (and gives up retrying) a body larger than the limit, streams
    it on, and answers the reset with a 503: the client learns of the loss at once."""
    limit = 65_536
    big = b"y" * 200_000
    async with gateway(envoys, replica_a.endpoint, replica_b.endpoint,
                       retry_buffer_bytes=limit) as (url, envoy):
        answers = await send_all(url, "svc.test", big, n=10)
        abandoned = await envoy.stat("cluster.svc.retry_or_shadow_abandoned")
        retries = await envoy.stat("cluster.svc.upstream_rq_retry")
    failed = [(status, text) for status, text, _ in answers if status != 200]
    slowest = max(seconds for _, _, seconds in answers)
    print(f"A dropped {len(replica_a.received)}, B answered {replica_b.requests}; "
          f"failed {failed[:1]} x{len(failed)}; slowest {slowest * 1000:.0f} ms; "
          f"retries {retries}, retry_or_shadow_abandoned {abandoned}")
    assert len(replica_a.received) >= 1
    # Each request reached exactly one replica: A's were not replayed on B...
    assert len(replica_a.received) + replica_b.requests == 10
    assert retries == 0
    assert abandoned >= len(replica_a.received)
    # ...and their clients got a 503 (reset before headers), not a hang to the timeout.
    assert len(failed) == len(replica_a.received)
    assert {status for status, _ in failed} == {503}
    assert all("reset" in text or "termination" in text for _, text in failed), failed
    assert slowest < ROUTE_TIMEOUT
    assert all(text == f"B {len(big)}" for status, text, _ in answers if status == 200)


async def test_every_request_a_killed_activator_held_is_replayed(
    envoys: Callable[[int, str], Envoy], replica_b: EchoUpstream,
) -> None:
    """The real failure: a replica holding many requests (waiting for a wake) dies, and all
    of them reset in the same instant. Envoy must replay every one: with max_requests 100,
    Envoy's parallel-retry ceiling (max_retries) must not turn the excess into 503s."""
    n = 60
    holder = await AbortingUpstream("A", reset=False, hold=True).start()
    try:
        async with gateway(envoys, holder.endpoint, replica_b.endpoint,
                           max_requests=100) as (url, envoy):
            sending = asyncio.create_task(send_all(url, "svc.test", BODY, n=n))
            await wait_until(lambda: len(holder.held) + replica_b.requests == n, 10,
                             "every request held by A or answered by B")
            held = len(holder.held)
            await holder.kill()
            answers = await asyncio.wait_for(sending, ROUTE_TIMEOUT + 10)
            overflow = await envoy.stat("cluster.svc.upstream_rq_retry_overflow")
            retries = await envoy.stat("cluster.svc.upstream_rq_retry")
    finally:
        await holder.stop()
    print(f"A held {held} then died; B answered {replica_b.requests}; "
          f"retries {retries}, retry overflow {overflow}")
    assert held >= 10  # more than a tenth of max_requests: all retrying at once
    assert [(status, text) for status, text, _ in answers] == [(200, f"B {len(BODY)}")] * n
    assert retries == held
    assert overflow == 0


async def test_an_activator_nobody_listens_on_is_skipped(
    envoys: Callable[[int, str], Envoy], replica_b: EchoUpstream,
) -> None:
    dead = Endpoint("127.0.0.1", free_port())  # nothing listens: connect refused
    async with gateway(envoys, dead, replica_b.endpoint) as (url, envoy):
        answers = await send_all(url, "svc.test", BODY)
        connect_failures = await envoy.stat("cluster.svc.upstream_cx_connect_fail")
        retries = await envoy.stat("cluster.svc.upstream_rq_retry")
    print(f"connect failures {connect_failures}, retries {retries}, "
          f"B answered {replica_b.requests}")
    assert [(status, text) for status, text, _ in answers] == (
        [(200, f"B {len(BODY)}")] * REQUESTS)
    assert connect_failures >= 1  # the dead replica was tried, and the retry went to B
    assert retries >= 1
