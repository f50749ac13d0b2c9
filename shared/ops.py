"""The HTTP side every service has: /healthz, /readyz, /metrics (and the gateway adds its API)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.errors import ConfigError

ReadyCheck = Callable[[], Awaitable[str | None]]
HTTP_GRACE_S = 10  # on stop, open HTTP requests get this long to finish (the gateway's waits end at once)
# An idle client connection is kept this long: longer than a proxy keeps its idle upstream connections (ingress-nginx:
# 60 s), so that the proxy closes one, never the service as the proxy sends a request on it (a 502 for a POST, which
# nginx does not retry). uvicorn's default is 5 s.
KEEP_ALIVE_S = 75


def add_ops_routes(app: FastAPI, service: str, ready: ReadyCheck) -> None:
    """Mount health, readiness (``ready`` returns None when ready, else why not) and metrics."""

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        reason = await ready()
        if reason is None:
            return JSONResponse({"ready": True, "service": service})
        return JSONResponse({"ready": False, "service": service, "reason": reason}, status_code=503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class _Server(uvicorn.Server):
    """uvicorn without its signal capture: the service owns SIGTERM/SIGINT and stops us itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(app: FastAPI, host: str, port: int,
                sock: socket.socket | None = None) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """Run uvicorn inside the current loop (on ``sock`` when the parent handed one over, else binding
    ``host:port``); the caller sets ``server.should_exit`` to stop it."""
    if sock is None:  # bound here, not by uvicorn, whose failure to bind ends the process with a traceback
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot serve HTTP on {host}:{port}: {e.strerror or e}; set OPENCLAW_PORT to a free "
                              "port (OPENCLAW_HOST to an address of this machine)") from None
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                            http="httptools", timeout_graceful_shutdown=HTTP_GRACE_S, timeout_keep_alive=KEEP_ALIVE_S)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn offers no started event
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    return server, task
