"""A failure inside the gateway is a 500 with a request id and nothing of its internals."""

from __future__ import annotations

import logging

import httpx
import pytest

from services.gateway.service import create_app
from shared.natsserver import free_port
from shared.ops import serve
from shared.service import Runtime
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


async def test_a_gateway_not_yet_connected_to_nats_checks_the_key_first_and_says_when_to_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "acme-key-0123456789abcdef"
    monkeypatch.setenv("OPENCLAW_API_KEYS", f"acme={key}")
    settings = load_settings()
    app = create_app(settings)
    app.state.runtime = Runtime("gateway", settings)  # never connected: no NATS at all
    port = free_port()
    server, task = await serve(app, "127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for method, path, body in (("POST", "/api/execute-parallel", {"message": "m"}),
                                       ("POST", "/api/chat", {"message": "m"}),
                                       ("GET", "/api/execution/abc", None), ("GET", "/api/execution/abc/events", None),
                                       ("DELETE", "/api/execution/abc", None)):
                anonymous = await client.request(method, path, json=body)
                assert anonymous.status_code == 401, (method, path, anonymous.text)  # whoever asks learns nothing
                keyed = await client.request(method, path, json=body, headers={"X-API-Key": key})
                assert keyed.status_code == 503 and "not connected to NATS" in keyed.json()["message"]
                assert keyed.headers["retry-after"] == "1", (method, path)
    finally:
        server.should_exit = True
        await task
