"""A tiny aiohttp backend for bench/wake.py: slow to "load", then answers at once.

    python bench/backend.py --port N [--load-seconds S] [--backlog B]

It prints two lines to stdout (which `torpor up` sends to the replica's log file,
`torpor-logs/<service>-<port>.log`), each with a `time.time()` stamp, so that the bench can
split a cold start into its parts:

    bench-backend: started at <unix time> pid <pid> port <port>      (first thing it does)
    bench-backend: listening at <unix time> pid <pid> port <port>    (listen() has returned)

Between the two it sleeps `--load-seconds`, like a model server loading weights, with
nothing listening, so a readiness probe fails until then. Routes:

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
import signal  # noqa: E402
import sys  # noqa: E402

from aiohttp import web  # noqa: E402


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def work(request: web.Request) -> web.Response:
    if request.can_read_body:
        await request.read()
    delay_ms = request.query.get("ms")
    if delay_ms:
        await asyncio.sleep(min(float(delay_ms), 60_000.0) / 1000)
    return web.Response(text="ok")


async def serve(host: str, port: int, load_seconds: float, backlog: int) -> None:
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
    parser.add_argument("--backlog", type=int, default=4096,
                        help="listen backlog (default 4096; the kernel caps it at somaxconn)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.load_seconds, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
