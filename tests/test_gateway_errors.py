"""A failure inside the gateway is a 500 with a request id and nothing of its internals."""

from __future__ import annotations

import logging

import httpx
import pytest

from services.gateway.service import create_app
from shared.natsserver import free_port
from shared.ops import serve
from shared.settings import load_settings


async def test_an_unhandled_error_is_a_500_with_a_request_id_and_no_internals(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(load_settings())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail: password=hunter2")

    port = free_port()
    server, task = await serve(app, "127.0.0.1", port)
    try:
        with caplog.at_level(logging.ERROR):
            async with httpx.AsyncClient() as client:
                r = await client.get(f"http://127.0.0.1:{port}/boom")
    finally:
        server.should_exit = True
        await task
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal" and len(body["request_id"]) == 32
    assert "hunter2" not in r.text and "RuntimeError" not in r.text
    assert body["request_id"] in caplog.text and "hunter2" in caplog.text  # the log has what the client must not
