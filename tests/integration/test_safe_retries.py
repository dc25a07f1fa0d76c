"""Envoy replays a request after an upstream reset only where running it twice is safe.

A real Envoy, programmed by the in-process xDS server, fronts services whose upstreams are
A, which reads each request whole, logs it and resets the connection unanswered (a replica,
or an activator replica, killed while running or holding it), and B, which logs and answers.
Every request carries a call id, so the two logs say how many times each call ran:
- a POST to an active service that reached A ran once (A's log) and its client got a 503;
  it was not replayed on B: never executed twice;
- a GET (idempotent) that reached A is replayed on B and answered;
- a service that opts in (`retry_non_idempotent`) has its POSTs replayed too, as every
  request held by a dying activator replica was before;
- a POST held by a dying activator replica for a service that did not opt in is not
  replayed either: the activator may have started proxying it to a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from tests.support.aborting import CALL_ID, AbortingUpstream, EchoUpstream
from tests.support.envoy import Envoy
from tests.support.xds import XdsHarness, hibernated, svc
from xds_server.resources import RoutedService

pytestmark = pytest.mark.envoy

CALLS = 40


@contextlib.asynccontextmanager
async def gateway(envoys: Callable[[int, str], Envoy], a: AbortingUpstream, b: EchoUpstream,
                  ) -> AsyncIterator[tuple[str, Envoy]]:
    """Envoy in front of: `active` and `optin` (replicas A and B; optin replays every
    method), and hibernated `asleep` and `asleep-optin` (activator replicas A and B)."""
    harness = XdsHarness(a.endpoint, b.endpoint, route_timeout=20.0)
    table = [
        svc("active", a.endpoint, b.endpoint),
        RoutedService("optin", "optin.test", (a.endpoint, b.endpoint),
                      retry_non_idempotent=True),
        hibernated(harness, "asleep"),
        RoutedService("asleep-optin", "asleep-optin.test",
                      harness.builder.activator_targets(False), retry_non_idempotent=True),
    ]
    try:
        await harness.start(table)
        envoy = envoys(harness.xds_port, "safe-retries")
        await envoy.wait_ready()
        yield f"http://127.0.0.1:{harness.listen_port}/predict", envoy
    finally:
        await harness.stop()


async def call_all(url: str, host: str, method: str) -> dict[str, int]:
    """CALLS concurrent calls, each with its own call id: call id -> status."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(call: str) -> tuple[str, int]:
            headers = {"Host": host, CALL_ID: call}
            async with session.request(method, url, data=b"x" * 1000, headers=headers) as r:
                await r.read()
                return call, r.status

        calls = [f"{host}-{method}-{uuid.uuid4().hex[:8]}" for _ in range(CALLS)]
        return dict(await asyncio.gather(*(one(c) for c in calls)))


def runs(a: AbortingUpstream, b: EchoUpstream, answers: dict[str, int]) -> tuple[
        Counter[str], Counter[str]]:
    """How often each of these calls reached A, and B."""
    return (Counter(c for _, c in a.log if c in answers),
            Counter(c for _, c in b.log if c in answers))


@pytest.mark.parametrize("host", ["active.test", "asleep.test"])
async def test_a_post_reset_mid_request_is_not_run_twice(
    envoys: Callable[[int, str], Envoy], replica_a: AbortingUpstream,
    replica_b: EchoUpstream, host: str,
) -> None:
    async with gateway(envoys, replica_a, replica_b) as (url, envoy):
        answers = await call_all(url, host, "POST")
        retries = await envoy.stat(f"cluster.{host.removesuffix('.test')}.upstream_rq_retry")
    at_a, at_b = runs(replica_a, replica_b, answers)
    print(f"{host}: A ran {sum(at_a.values())}, B ran {sum(at_b.values())}, "
          f"retries {retries}, statuses {Counter(answers.values())}")
    assert at_a, "round robin sent no call to A: the test proves nothing"
    assert not set(at_a) & set(at_b), "a POST that reached A was run again on B"
    assert all(n == 1 for n in (at_a + at_b).values())
    assert set(at_a) | set(at_b) == set(answers)
    assert {answers[c] for c in at_a} == {503}  # the reset, told to the client
    assert {answers[c] for c in at_b} == {200}
    assert retries == 0


@pytest.mark.parametrize("host", ["active.test", "optin.test", "asleep-optin.test"])
async def test_idempotent_calls_and_opted_in_posts_are_replayed_after_a_reset(
    envoys: Callable[[int, str], Envoy], replica_a: AbortingUpstream,
    replica_b: EchoUpstream, host: str,
) -> None:
    method = "GET" if host == "active.test" else "POST"
    async with gateway(envoys, replica_a, replica_b) as (url, envoy):
        answers = await call_all(url, host, method)
        retries = await envoy.stat(f"cluster.{host.removesuffix('.test')}.upstream_rq_retry")
    at_a, at_b = runs(replica_a, replica_b, answers)
    print(f"{host} {method}: A ran {sum(at_a.values())}, B ran {sum(at_b.values())}, "
          f"retries {retries}")
    assert at_a, "round robin sent no call to A: the test proves nothing"
    assert set(answers.values()) == {200}
    assert set(at_b) == set(answers)  # every call answered by B, A's ones replayed there
    assert retries == sum(at_a.values())
