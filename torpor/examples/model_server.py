"""A small model server for demos and tests: slow to load, then classifies text.

`python -m torpor.examples.model_server --port N [--host 127.0.0.1] [--load-seconds S]
[--name NAME]`

It sleeps `--load-seconds` *before* it listens, the way a real model server spends minutes
loading weights, so a readiness probe fails until the "model" is loaded and a wake has
something to wait for. Then it answers:

- `GET /healthz` → 200 "ok"
- `POST /predict` (body: text, or JSON {"text": ...}) or `GET /predict?text=...` → JSON with
  the label of a tiny lexicon-based sentiment classifier, plus the pid and port that
  answered, so tests can tell replicas apart
- `POST /echo` → the request body streamed back unchanged
- `GET /ws` → a WebSocket that sends every text or binary message back unchanged

Every response carries `x-served-by: NAME:PORT`. SIGTERM/SIGINT stop it gracefully.
Must stay pure Python with no downloads: tests start many of these.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler

# --------------------------------------------------------------------------------------
# The "model": a lexicon-based sentiment scorer (VADER's idea, at toy scale)
# --------------------------------------------------------------------------------------

_LEXICON: Mapping[str, float] = {
    # positive
    "good": 1.9, "great": 3.1, "excellent": 3.2, "amazing": 2.8, "awesome": 3.1,
    "love": 3.2, "loved": 2.9, "like": 1.5, "nice": 1.8, "happy": 2.7, "best": 3.2,
    "fantastic": 2.6, "wonderful": 2.7, "perfect": 2.7, "fast": 1.2, "helpful": 1.8,
    "pleasant": 2.3, "enjoy": 2.2, "enjoyed": 2.3, "brilliant": 2.8, "fine": 0.8,
    "reliable": 1.7, "recommend": 1.5, "thanks": 1.9, "win": 2.8, "smooth": 1.2,
    # negative
    "bad": -2.5, "terrible": -2.1, "awful": -2.0, "horrible": -2.5, "hate": -2.7,
    "hated": -3.2, "worst": -3.1, "poor": -2.1, "sad": -2.1, "slow": -1.0,
    "broken": -2.1, "useless": -1.8, "disappointing": -2.2, "disappointed": -1.9,
    "angry": -2.3, "boring": -1.3, "fail": -2.5, "failed": -2.3, "bug": -1.0,
    "crash": -1.7, "ugly": -2.3, "annoying": -1.7, "wrong": -2.1, "error": -1.4,
}  # fmt: skip
_NEGATIONS = frozenset({"not", "no", "never", "none", "nobody", "nothing", "without", "hardly"})
_BOOSTERS: Mapping[str, float] = {"very": 0.3, "really": 0.3, "extremely": 0.5, "so": 0.2}
_NEGATION_SPAN = 3  # a negation flips the sentiment of the next few words
_TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NEUTRAL_BAND = 0.05


@dataclasses.dataclass(frozen=True)
class Prediction:
    label: str  # "positive" | "negative" | "neutral"
    score: float  # in [-1, 1]; > 0 is positive
    tokens: int


def tokenize(text: str) -> list[str]:
    """Lowercased words; "n't" counts as a negation word ("isn't" → "isn", "not")."""
    words: list[str] = []
    for token in _TOKEN_RE.findall(text.lower()):
        if token.endswith("n't"):
            words.extend((token[:-3], "not"))
        else:
            words.append(token)
    return words


def classify(text: str) -> Prediction:
    """Sum the lexicon weights of the words, flipped after a negation and scaled by boosters,
    then squash the sum into [-1, 1] (x / sqrt(x² + 15), as VADER does)."""
    words = tokenize(text)
    total = 0.0
    negated_for = 0
    boost = 0.0
    for word in words:
        if word in _NEGATIONS:
            negated_for = _NEGATION_SPAN
            continue
        if word in _BOOSTERS:
            boost += _BOOSTERS[word]
            continue
        weight = _LEXICON.get(word, 0.0)
        if weight:
            weight += math.copysign(boost, weight)
            total += -0.75 * weight if negated_for else weight
        boost = 0.0
        negated_for = max(0, negated_for - 1)
    score = total / math.sqrt(total * total + 15.0)
    if score > _NEUTRAL_BAND:
        label = "positive"
    elif score < -_NEUTRAL_BAND:
        label = "negative"
    else:
        label = "neutral"
    return Prediction(label=label, score=round(score, 4), tokens=len(words))


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------

_MAX_LINE = 64 * 1024
_NAME = web.AppKey("name", str)
_PORT = web.AppKey("port", int)


def _text_of(body: bytes, content_type: str) -> str:
    """The text to classify: JSON {"text": ...} when the body is such an object, else the body."""
    decoded = body.decode("utf-8", errors="replace")
    if content_type == "application/json" or decoded.lstrip().startswith("{"):
        try:
            parsed = json.loads(decoded)
        except ValueError:
            return decoded
        if isinstance(parsed, dict) and isinstance(parsed.get("text"), str):
            return str(parsed["text"])
    return decoded


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _predict(request: web.Request) -> web.Response:
    body = await request.read()
    if request.method == "GET":
        text = request.query.get("text", "")
    else:
        text = _text_of(body, request.content_type)
    prediction = classify(text)
    return web.json_response(
        {
            "model": request.app[_NAME],
            "label": prediction.label,
            "score": prediction.score,
            "tokens": prediction.tokens,
            "pid": os.getpid(),
            "port": request.app[_PORT],
            "echo_bytes": len(body),
        }
    )


async def _echo(request: web.Request) -> web.StreamResponse:
    """Stream the body back chunk by chunk: large bodies never sit in memory whole."""
    response = web.StreamResponse()
    response.headers["x-model-server"] = request.app[_NAME]
    response.content_type = request.content_type
    if request.content_length is not None:
        response.content_length = request.content_length
    await response.prepare(request)
    async for chunk in request.content.iter_chunked(64 * 1024):
        await response.write(chunk)
    await response.write_eof()
    return response


async def _ws_echo(request: web.Request) -> web.WebSocketResponse:
    """Every text or binary message back unchanged, until the client closes."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == web.WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == web.WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def _served_by(request: web.Request, response: web.StreamResponse) -> None:
    """Tag every response, errors included, with the replica that produced it."""
    response.headers["x-served-by"] = f"{request.app[_NAME]}:{request.app[_PORT]}"


def make_app(name: str, port: int, log_requests: bool = False) -> web.Application:
    app = web.Application(middlewares=[_request_logger] if log_requests else [])
    app[_NAME] = name
    app[_PORT] = port
    app.on_response_prepare.append(_served_by)
    app.router.add_get("/healthz", _healthz)
    app.router.add_post("/predict", _predict)
    app.router.add_get("/predict", _predict)
    app.router.add_post("/echo", _echo)
    app.router.add_get("/ws", _ws_echo)
    return app


@web.middleware
async def _request_logger(request: web.Request, handler: Handler) -> web.StreamResponse:
    """--log-requests: one line per request other than probes (tests check who was served)."""
    if request.path != "/healthz":
        _log(request.app[_NAME], f"request {request.method} {request.path_qs}")
    return await handler(request)


def _log(name: str, message: str) -> None:
    print(f"model_server {name} pid={os.getpid()}: {message}", file=sys.stderr, flush=True)


async def serve(host: str, port: int, name: str, load_seconds: float,
                log_requests: bool = False) -> None:
    """Load (sleep), listen, and run until SIGTERM/SIGINT; then close connections gracefully.

    A signal during the load stops it too, so a hibernation that races a slow start does
    not have to wait for the load to finish.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _log(name, f"loading model ({load_seconds:g}s)")
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=load_seconds)
    if stop.is_set():
        _log(name, "stopped while loading")
        return
    # Bind the socket ourselves: with --port 0 the app must know the port it reports.
    sock = socket.create_server((host, port))
    bound_port = int(sock.getsockname()[1])
    # Headers and URLs up to 64 KB, like a real model server behind torpor's edge limits
    # (60 KB, torpor/edge.py); aiohttp's default is 8 KB.
    runner = web.AppRunner(make_app(name, bound_port, log_requests), access_log=None,
                           max_line_size=_MAX_LINE, max_field_size=_MAX_LINE)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        loaded_in = time.monotonic() - started
        _log(name, f"loaded in {loaded_in:.2f}s, listening on http://{host}:{bound_port}")
        await stop.wait()
        _log(name, "stopping")
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m torpor.examples.model_server",
        description="A small example model server that is slow to load.",
    )
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--load-seconds", type=float, default=0.0, help="simulated model load")
    parser.add_argument("--name", default="model", help="reported in responses and headers")
    parser.add_argument("--log-requests", action="store_true",
                        help="log every request but readiness probes to stderr")
    args = parser.parse_args(argv)
    if args.load_seconds < 0:
        parser.error("--load-seconds must be ≥ 0")
    asyncio.run(serve(args.host, args.port, args.name, args.load_seconds, args.log_requests))


if __name__ == "__main__":
    main()
