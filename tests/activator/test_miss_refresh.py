"""MissRefresh: what a request for an unknown host costs the catalog's source. A burst of
misses shares one refresh, none runs again within MISS_REFRESH_MIN_INTERVAL, and every
caller returns only once the refresh it waited for is done (the host is then known)."""

from __future__ import annotations

import asyncio

from activator.catalog_mirror import MISS_REFRESH_MIN_INTERVAL, MissRefresh


async def test_a_burst_of_misses_shares_one_refresh_and_sees_its_result() -> None:
    known: set[str] = set()
    calls = 0
    release = asyncio.Event()

    async def refresh() -> None:
        nonlocal calls
        calls += 1
        await release.wait()
        known.add("new.localhost")

    on_miss = MissRefresh(refresh)
    waiting = [asyncio.create_task(on_miss()) for _ in range(20)]
    await asyncio.sleep(0.01)
    assert calls == 1 and not any(t.done() for t in waiting)
    release.set()
    await asyncio.gather(*waiting)
    assert calls == 1 and known == {"new.localhost"}
    await on_miss()  # right after: no second call to the source
    assert calls == 1
    await on_miss.stop()


async def test_a_periodic_refresh_counts_and_a_later_miss_refreshes_again() -> None:
    calls = 0

    async def refresh() -> None:
        nonlocal calls
        calls += 1

    on_miss = MissRefresh(refresh)
    on_miss.ran()  # the periodic refresh just ran
    await on_miss()
    assert calls == 0
    await asyncio.sleep(MISS_REFRESH_MIN_INTERVAL + 0.05)
    await on_miss()
    assert calls == 1
    await on_miss.stop()
