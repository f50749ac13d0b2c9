"""The gateway app: routes, error shapes, body limit; served by the shared service lifecycle."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from services.gateway.access import LOCAL_TENANT, ApiKeys, OpenLimit, RateLimiter
from services.gateway.handlers import identify, router
from services.gateway.limits import BodySizeLimit, RequestMetrics
from shared import metrics
from shared.consumer import UNAVAILABLE
from shared.errors import ConfigError, said
from shared.service import Runtime, Workers, run_service
from shared.settings import Settings

log = logging.getLogger(__name__)
ERROR_NAMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 409: "conflict",
               405: "method_not_allowed", 413: "payload_too_large",
               422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


def _field(loc: tuple[object, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _error(e: Mapping[str, Any]) -> dict[str, str]:
    if e["type"] == "json_invalid":  # its location is the character where decoding failed, not a field
        where = e["loc"][-1]
        return {"field": "body", "message": f"not valid JSON (at character {where}): {e.get('ctx', {}).get('error')}"}
    if e["loc"][0] == "header":  # as HTTP spells it, not as the ASGI scope lower-cases it
        return {"field": "-".join(w.capitalize() for w in str(e["loc"][-1]).split("-")), "message": said(e)}
    return {"field": _field(tuple(e["loc"])), "message": said(e)}


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="OpenClaw Parallel Execution",
        version="0.1.0",
        description="Submit software work; specialist agent pools run it in parallel over NATS JetStream.",
    )
    app.include_router(router)
    # Every API route's 5xx series exported at 0 from the start: the error-rate alert's rate() would not see a new
    # replica's first 503 (during a rollout, say), as a series that first appears at 1.
    metrics.prime(metrics.REQUESTS, [(r.path, method, code) for r in router.routes if isinstance(r, APIRoute)
                                     for method in r.methods or () for code in ("500", "503")])
    if settings.api_keys is None and os.environ.get("OPENCLAW_API_KEY"):
        # One letter short: without this the gateway would run open, in local mode.
        raise ConfigError("OPENCLAW_API_KEY is set and OPENCLAW_API_KEYS is not: the gateway reads its tenants' keys "
                          "from OPENCLAW_API_KEYS (tenant=key,tenant=key); OPENCLAW_API_KEY is the command line's "
                          "key. Set OPENCLAW_API_KEYS, or unset OPENCLAW_API_KEY for local mode")
    app.state.api_keys = ApiKeys(settings.api_keys.get_secret_value() if settings.api_keys is not None else None)
    gw = settings.pe.gateway
    app.state.rate_limiter = RateLimiter(gw.rate_limit_per_minute, gw.rate_limit_burst)
    app.state.open_limit = OpenLimit(gw.max_open_per_key)
    if app.state.api_keys.local_mode:
        log.warning("no API keys configured (OPENCLAW_API_KEYS): local mode, every caller is tenant %r and "
                    "unlimited", LOCAL_TENANT)
    app.add_middleware(BodySizeLimit, max_bytes=settings.pe.gateway.max_body_bytes)
    app.add_middleware(RequestMetrics)

    async def key_first(request: Request) -> JSONResponse | None:
        """FastAPI decodes the body before it runs any dependency, so a body that does not decode is answered
        only after the key is checked here: a caller without a valid one hears 401 whatever it sent."""
        if not request.url.path.startswith(router.prefix):
            return None
        try:
            identify(request, request.headers.get("authorization"), request.headers.get("x-api-key"))
        except StarletteHTTPException as e:
            return await http_error(request, e)
        return None

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(e["type"] == "json_invalid" for e in exc.errors()) and (refused := await key_first(request)):
            return refused
        errors = [_error(e) for e in exc.errors()]
        # FastAPI reads the body as JSON only when the request says it is (application/json or application/*+json).
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        main, _, sub = ctype.lower().partition("/")
        if not (main == "application" and (sub == "json" or sub.endswith("+json"))):
            sent = f"not {ctype}" if ctype else "the request has none"
            for error, e in zip(errors, exc.errors(), strict=True):
                if tuple(e["loc"]) == ("body",):
                    error["message"] = f"send a JSON object with Content-Type: application/json ({sent})"
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"error": "invalid_request", "message": summary, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:  # FastAPI's "error parsing the body" says no more
            if refused := await key_first(request):
                return refused
            # Python's own advice on its limits (sys.set_int_max_str_digits) is not the client's to follow.
            why = "nested too deeply" if isinstance(cause, RecursionError) else str(cause).partition("; use sys.")[0]
            exc = HTTPException(422, {"field": "body", "message": f"not valid JSON: {why}"})
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names the methods of the first route on the path; a resource has all
            allowed = sorted({m for route in (*router.routes, *request.app.router.routes) if isinstance(route, Route)
                              and route.matches(request.scope)[0] is not Match.NONE for m in route.methods or ()})
            if allowed:
                exc = HTTPException(405, f"{request.method} is not allowed here: use {', '.join(allowed)}")
                headers = {"Allow": ", ".join(allowed)}
        detail = exc.detail
        errors: list[object] = []
        if isinstance(detail, dict):
            errors = [detail]
            detail = f"{detail['field']}: {detail['message']}"
        body = {"error": ERROR_NAMES.get(exc.status_code, "error"), "message": str(detail), "errors": errors}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # A stream without quorum, a reconnect under way: the request may be sent again. With its Idempotency-Key that
        # is safe, and starts an execution stored before its request could be published (see _submit).
        message = f"NATS cannot take the request now ({type(exc).__name__}); retry shortly"
        return JSONResponse({"error": "unavailable", "message": message, "errors": []}, status_code=503,
                            headers={"Retry-After": "1"})

    for error in UNAVAILABLE:
        app.add_exception_handler(error, unavailable)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex
        log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
        return JSONResponse(
            {"error": "internal", "message": "internal error; quote the request id when reporting it",
             "request_id": request_id, "errors": []},
            status_code=500,
        )

    return app


async def start(rt: Runtime) -> Workers:
    return []  # the gateway consumes no stream; it answers HTTP until stopped


def main() -> None:
    run_service("gateway", start, create_app, models=False)  # it calls no model: it needs no ANTHROPIC_API_KEY
