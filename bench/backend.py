"""A tiny aiohttp backend for bench/wake.py: slow to "load", then answers at once.

    python bench/backend.py --port N [--load-seconds S] [--load-jitter J] [--backlog B]

It prints these lines to stdout (which `torpor up` sends to the replica's log file,
`torpor-logs/<service>-<port>.log`), each with a `time.time()` stamp, so that the bench can
split a cold start into its parts:

    bench-backend: started at <unix time> ...       (the first thing the script does)
    bench-backend: listening at <unix time> ...     (listen() has returned)
    bench-backend: first healthz at <unix time> ... (the first readiness probe it answered)
    bench-backend: first work at <unix time> ...    (the first /work request arrived)

Between the first two it sleeps `--load-seconds` plus a uniform random 0..`--load-jitter`,
like a model server loading weights, with nothing listening, so a readiness probe fails
until then. (The jitter spreads the moment it starts listening over the prober's interval;
without it, a fixed load time lands at the same phase of the probe loop on every wake.)
Routes:

- `GET /healthz` -> 200 "ok" (the readiness probe)
- `GET|POST /work` -> 200 "ok" (a small answer; `?ms=N` waits N ms first)

SIGTERM/SIGINT stop it at once. Loopback only by default. It stands alone: it imports
aiohttp, not torpor.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports below: they are part of a replica's start

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from aiohttp import web  # noqa: E402

_FIRST: set[str] = set()  # routes whose first request was stamped


def stamp_first(what: str) -> None:
    if what not in _FIRST:
        _FIRST.add(what)
        print(f"bench-backend: first {what} at {time.time():.6f} pid {os.getpid()}", flush=True)


async def healthz(request: web.Request) -> web.Response:
    stamp_first("healthz")
    return web.Response(text="ok")


async def work(request: web.Request) -> web.Response:
    stamp_first("work")
    if request.can_read_body:
        await request.read()
    delay_ms = request.query.get("ms")
    if delay_ms:
        await asyncio.sleep(min(float(delay_ms), 60_000.0) / 1000)
    return web.Response(text="ok")


async def serve(host: str, port: int, load_seconds: float, backlog: int) -> None:
    """Sleep `load_seconds` (nothing listening), then serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pid = os.getpid()
    print(f"bench-backend: started at {STARTED:.6f} pid {pid} port {port}", flush=True)
    if load_seconds > 0:
        try:
            await asyncio.wait_for(stop.wait(), load_seconds)
            return  # stopped while "loading"
        except TimeoutError:
            pass
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/work", work)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=backlog).start()
        print(f"bench-backend: listening at {time.time():.6f} pid {pid} port {port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--load-seconds", type=float, default=0.0,
                        help="sleep this long before listening (default 0)")
    parser.add_argument("--load-jitter", type=float, default=0.0,
                        help="add a uniform random 0..J seconds to the load (default 0)")
    parser.add_argument("--backlog", type=int, default=4096,
                        help="listen backlog (default 4096; the kernel caps it at somaxconn)")
    args = parser.parse_args(argv)
    load = args.load_seconds + random.uniform(0.0, max(0.0, args.load_jitter))
    asyncio.run(serve(args.host, args.port, load, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
