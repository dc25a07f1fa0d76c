"""Per-service rate and concurrency limits, enforced by Envoy (configured over xDS) through
`torpor up`: a 10 requests/s limit under 50 requests/s of load lets 10 ± 2 a second
through and answers the rest 429 with Retry-After, while another service takes all of the
same load; a service's `max_concurrent` (N sent at once, N more queued in Envoy) answers
the requests beyond it 429 at once, even while it sleeps (they would otherwise be held)."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.up import UpRuns
from torpor import admin_client
from torpor.config import load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy

RATE = 10
LOAD = 50  # requests per second sent to each service
SECONDS = 4


def _limited(name: str, lines: str) -> str:
    return model_service(name, 1) + "".join(f"    {line}\n" for line in lines.splitlines())


async def _load(session: aiohttp.ClientSession, gateway: str, host: str
                ) -> list[tuple[float, int, str | None]]:
    """LOAD requests a second for SECONDS: (seconds since the start, status, Retry-After)."""
    started = time.monotonic()

    async def one(at: float) -> tuple[float, int, str | None]:
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        async with session.get(f"http://{gateway}/healthz", headers={"Host": host}) as r:
            await r.read()
            return at, r.status, r.headers.get("Retry-After")

    return await asyncio.gather(*(one(i / LOAD) for i in range(LOAD * SECONDS)))


async def test_a_rate_limit_lets_its_rate_through_and_answers_the_rest_429(
        tmp_path: Path) -> None:
    services = _limited("limited", f"rate_limit: {{requests_per_second: {RATE}}}") + \
        model_service("free", 1)
    path = write_config(tmp_path, services)
    gateway = str(load_config(path).gateway.listen)
    runs = UpRuns()
    try:
        await runs.start(path)
        async with aiohttp.ClientSession() as session:
            limited, free = await asyncio.gather(
                _load(session, gateway, "limited.localhost"),
                _load(session, gateway, "free.localhost"))
        per_second = collections.Counter(int(at) for at, status, _ in limited if status == 200)
        print(f"\n200s per second under {LOAD} req/s with a {RATE}/s limit: "
              f"{[per_second[s] for s in range(SECONDS)]}")
        assert {status for _, status, _ in limited} == {200, 429}
        assert all(after == "1" for _, status, after in limited if status == 429)
        # The first second includes the burst (a full bucket of RATE); then RATE a second.
        for second in range(1, SECONDS):
            assert RATE - 2 <= per_second[second] <= RATE + 2, per_second
        assert [status for _, status, _ in free] == [200] * (LOAD * SECONDS)
    finally:
        await runs.stop_all()


async def test_requests_beyond_max_concurrent_are_answered_429_even_while_asleep(
        tmp_path: Path) -> None:
    path = write_config(tmp_path, _limited("narrow", "max_concurrent: 2"))
    config = load_config(path)
    gateway = str(config.gateway.listen)
    runs = UpRuns()
    try:
        await runs.start(path)
        await asyncio.to_thread(admin_client.hibernate, admin_target(config), "narrow")
        async with aiohttp.ClientSession() as session:

            async def call() -> tuple[int, float]:
                started = time.monotonic()
                async with session.post(f"http://{gateway}/echo", data=b"x",
                                        headers={"Host": "narrow.localhost"}) as r:
                    await r.read()
                    return r.status, time.monotonic() - started

            answers = await asyncio.gather(*(call() for _ in range(8)))
        statuses = sorted(status for status, _ in answers)
        print(f"\n8 requests to a sleeping service with max_concurrent 2: {answers}")
        # Two sent at once, at most two queued by Envoy (held, then answered); the rest 429.
        assert 2 <= statuses.count(200) <= 4 and set(statuses) == {200, 429}, answers
        # The refused ones were not held for the wake.
        assert all(took < 1.0 for status, took in answers if status == 429)
    finally:
        await runs.stop_all()
