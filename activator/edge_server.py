"""The activator's HTTP/1 server at the edge limits (torpor/edge.py).

Owns: aiohttp's request parser limits (the same as Envoy's, so a request that reaches an
awake service can wake a sleeping one), the answer to a request aiohttp could not parse
(a fixed JSON body that never echoes request bytes: aiohttp's own quotes the offending
line), and the `Server` header (`torpor`, no Python/aiohttp version banner). Must not hold,
wake or proxy (handler.py).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from torpor.edge import SERVER_NAME, EdgeLimits


def _unparsable(status: int, exc: BaseException | None) -> web.Response:
    """What a request aiohttp could not parse gets: 431 for a line over the limit, else
    its status (400), with a body that names the problem and nothing of the request."""
    if isinstance(exc, LineTooLong):
        status, code, message = 431, "headers_too_large", "request line or headers too large"
    elif status == 500:
        code, message = "internal_error", "internal error"
    else:
        code, message = "bad_request", "malformed request"
    body = json.dumps({"error": code, "message": message})
    response = web.Response(status=status, text=body, content_type="application/json",
                            headers={"Server": SERVER_NAME})
    response.force_close()
    return response


class _EdgeRequestHandler(RequestHandler):
    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        base = super().handle_error(request, status, exc, message)  # logs; may raise
        del base
        return _unparsable(status, exc)


class _EdgeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _EdgeRequestHandler(self, loop=self._loop, **self._kwargs)


class EdgeAppRunner(web.AppRunner):
    """An AppRunner whose connections parse at `limits` and answer parse errors without
    echoing the request."""

    def __init__(self, app: web.Application, limits: EdgeLimits, **kwargs: Any) -> None:
        app.on_response_prepare.append(_server_header)
        handler_args: dict[str, Any] = {**kwargs, **limits.aiohttp_handler_args()}
        super().__init__(app, **handler_args)

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return _EdgeServer(base.request_handler, request_factory=base.request_factory,
                           handler_cancellation=base.handler_cancellation,
                           loop=base._loop, **base._kwargs)


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """`Server: torpor` where aiohttp put its version banner (it fills the header in just
    before this hook); a proxied answer keeps the service's own."""
    if response.headers.get("Server", SERVER_SOFTWARE) == SERVER_SOFTWARE:
        response.headers["Server"] = SERVER_NAME
