"""HTTP edges of the gateway: the request body size limit, and per-request metrics.

The body size limit is enforced before the body is read into memory.

FastAPI's own ``max_body_size`` answers a declared oversize body with a plain-text 413 written
past the app's exception handlers; this keeps every error in the API's JSON shape.
"""

from __future__ import annotations

import json
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import metrics


def _message(max_bytes: int) -> str:
    return f"request body exceeds {max_bytes} bytes (parallel_execution.gateway.max_body_bytes)"


class BodyTooLarge(HTTPException):
    """Raised while reading a streamed body; FastAPI lets HTTPExceptions through to the error handlers."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _message(max_bytes))


class BodySizeLimit:
    """413 for a body over ``max_bytes``, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({
            "error": "payload_too_large",
            "message": _message(self.max_bytes),
            "errors": [],
        }).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Count every API request by route template, method and status, and time it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        began = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = _template(scope)
            metrics.REQUESTS.labels(route, scope["method"], str(status)).inc()
            metrics.REQUEST_DURATION.labels(route, scope["method"]).observe(time.perf_counter() - began)


def _template(scope: Scope) -> str:
    """The path template of the route that answered (one label per route, not per id), or "unmatched". FastAPI
    names its own routes in the scope; Starlette's (the docs, the OpenAPI document) leave only the endpoint."""
    route = scope.get("route")
    if route is None and (endpoint := scope.get("endpoint")) is not None:
        route = next((r for r in scope["app"].routes if getattr(r, "endpoint", None) is endpoint), None)
    return getattr(route, "path", None) or "unmatched"
