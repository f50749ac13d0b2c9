"""REST routes: accept work, follow it, cancel it, chat. Status codes are decided here only."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any, NoReturn, get_args

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy, PubAck
from nats.js.errors import KeyWrongLastSequenceError
from pydantic import BaseModel

from services.gateway.access import LOCAL_TENANT, Caller, OpenLimit
from services.gateway.api import ChatRequest, ChatResponse, ErrorBody, ExecuteRequest
from shared import metrics
from shared.bus import publish, schedule
from shared.consumer import UNAVAILABLE
from shared.distributor import should_use_parallel_execution
from shared.errors import PlanError
from shared.execution import UNPLANNED, new_execution, plannable
from shared.schemas import (
    TERMINAL_EXECUTION,
    CancelExecution,
    Execution,
    ExecutionCompleted,
    ExecutionDeadline,
    ExecutionRequested,
    ExecutionStatus,
    PlanTask,
    Simulate,
    check_plan,
    now,
)
from shared.service import Runtime

log = logging.getLogger(__name__)


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not a JSON value (a JSON number is finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text if len(text) <= 40 else text[:40] + '…'} is out of range (a number here must be "
                         "finite)")
    return value


# An escape of half a surrogate pair: \ud800-\udfff. Paired, the parser joins the two into one character.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _text(data: Any) -> None:
    """Refuse a string that holds half a surrogate pair: no character, it could be neither stored nor sent on."""
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        half = ascii(e.object[e.start])[1:-1]
        raise ValueError(f"{half} is half of a surrogate pair, not a character: strings must be Unicode text") from None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose names are unique: Python's parser keeps the last of two, and the client's other value is lost."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        twice = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"{twice!r} is given twice in one object: which value is meant is unknown")
    return obj


class _JSONRequest(Request):
    """A request whose JSON body is JSON: UTF-8 (Python's parser also guesses UTF-16 and UTF-32, and takes escaped
    halves of surrogate pairs), without NaN and Infinity, without 1e999 read as infinity, which a client's own data
    would then lose (stored, they come back as null), and without a name given twice in an object."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                text = (await self.body()).decode("utf-8-sig")  # a byte order mark JSON may be read past (RFC 8259)
            except UnicodeDecodeError as e:
                byte = e.object[e.start]
                raise ValueError(f"the body is not UTF-8: byte {e.start} ({byte:#04x}): {e.reason}") from None
            data = json.loads(text, parse_constant=_not_json, parse_float=_finite, object_pairs_hook=_object)
            if SURROGATE_ESCAPE.search(text):
                _text(data)
            self._json = data
        return self._json


class _Route(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handle(_JSONRequest(request.scope, request.receive))

        return route


router = APIRouter(prefix="/api", tags=["executions"], route_class=_Route)
EXECUTION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: "$" would let a final newline through
PLAN_WAIT_S = 2.0  # a 202 waits this long for the plan so it can list the tasks
KEEPALIVE_S = 15.0  # an idle event stream sends a comment this often, so proxies keep it open
EVENTS_HEARTBEAT_S = 2.0  # the server's heartbeat on an event stream's consumer
REPLAY_IDLE_S = 2.0  # an ended execution's replay that brings nothing for this long has nothing more to bring


async def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    if rt.store is None or rt.nc is None or not rt.nc.is_connected:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "not connected to NATS yet; retry shortly",
                            headers={"Retry-After": "1"})
    return rt


def identify(request: Request, authorization: str | None, x_api_key: str | None) -> Caller:
    """The tenant whose API key the request carries (local mode: the one tenant); 401 without a valid one."""
    keys = request.app.state.api_keys
    if keys.local_mode:
        return Caller(LOCAL_TENANT)
    key = x_api_key or (authorization[7:].strip() if authorization and authorization[:7].lower() == "bearer " else None)
    if not key:
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
                            + _sent(authorization), headers={"WWW-Authenticate": "Bearer"})
    who = keys.identify(key)
    if who is None:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return who


# Schemes a client may send by mistake, named back to it; anything else in the header is not repeated (it may be the
# key itself, sent without its scheme).
KNOWN_SCHEMES = ("basic", "digest", "negotiate", "ntlm", "token", "apikey", "api-key", "oauth", "hoba", "mutual")


def _sent(authorization: str | None) -> str:
    """What is wrong with an Authorization header that carries no key, without repeating what it carries."""
    if not authorization:
        return ""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and not credentials.strip():
        return " (the Authorization header has no key after 'Bearer')"
    if scheme.lower() in KNOWN_SCHEMES:
        return f" (the Authorization header's scheme is {scheme!r}, not Bearer)"
    return " (the Authorization header does not start with 'Bearer ')"


async def caller(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    """The calling tenant (API key → tenant; local mode without keys), within its rate limit."""
    who = identify(request, authorization, x_api_key)
    if who.key_id is None:
        return who
    limiter = request.app.state.rate_limiter
    wait = limiter.take(who.key_id)
    if wait is not None:
        raise HTTPException(429, f"rate limit of {limiter.per_minute}/min for this key exceeded; retry in {wait:g}s",
                            headers={"Retry-After": str(int(wait))})
    return who


@contextlib.contextmanager
def held(request: Request, who: Caller, holds: bool = True) -> Iterator[None]:
    """While the block runs, one of the requests the caller's key holds open (an event stream, a wait); 429 when it
    holds ``gateway.max_open_per_key`` on this replica already. Nothing is counted in local mode, or when ``holds``
    is false (a request that does not wait)."""
    limit: OpenLimit = request.app.state.open_limit
    key = who.key_id if holds else None
    if key is not None and not limit.open(key):
        raise HTTPException(429, f"this key holds {limit.per_key} event streams and waiting requests open on this "
                                 "gateway already (gateway.max_open_per_key): close one first, or poll "
                                 "GET /api/execution/{id} instead of waiting")
    if holds:
        metrics.OPEN_REQUESTS.inc()
    try:
        yield
    finally:
        if holds:
            metrics.OPEN_REQUESTS.dec()
        if key is not None:
            limit.close(key)


RuntimeDep = Annotated[Runtime, Depends(runtime)]
CallerDep = Annotated[Caller, Depends(caller)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 413, 422, 429, 503)}
# The same, for a route whose own answers are not JSON (FastAPI would give these its media type): errors still are.
JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}} for code in ERRORS}


async def owned(rt: Runtime, who: Caller, execution_id: str) -> Execution:
    """The caller's execution, or 404 — another tenant's execution does not exist for them."""
    return Execution.model_validate_json(await owned_document(execution_id, who, rt))


class _Head(BaseModel):
    """The fields of a stored execution document that the gateway looks at without parsing the rest: whose it
    is (a read), and how far it got (a waiting request)."""

    tenant: str
    status: str


async def owned_document(execution_id: str, who: CallerDep, rt: RuntimeDep) -> bytes:
    """The caller's execution as stored, or 404; only its tenant is parsed."""
    stored = await rt.executions.read(execution_id) if EXECUTION_ID.fullmatch(execution_id) else None
    if stored is None or _Head.model_validate_json(stored[0]).tenant != who.tenant:
        raise HTTPException(404, {"field": "execution_id", "message": f"no execution with id {execution_id!r}"})
    return stored[0]


async def owned_execution(execution_id: str, who: CallerDep, rt: RuntimeDep) -> Execution:
    return await owned(rt, who, execution_id)


ExecutionDep = Annotated[Execution, Depends(owned_execution)]


def _execution_id(who: Caller, idempotency_key: str | None) -> str:
    """A fresh id, or one derived from the tenant and the Idempotency-Key: the same key, the same execution."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    return hashlib.sha256(f"{who.tenant}\0{idempotency_key}".encode()).hexdigest()[:32]


def _fingerprint(body: ExecuteRequest) -> str:
    """What makes two requests "the same" for idempotency (waiting is not part of the request; the order of
    keys in a JSON object is not either)."""
    canonical = json.dumps(body.model_dump(mode="json", exclude={"wait", "timeout_s"}), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _submit(rt: Runtime, who: Caller, body: ExecuteRequest, idempotency_key: str | None, request: Request,
                  routing: dict[str, Any] | None = None) -> tuple[Execution | bytes, bool]:
    """Store and publish a request (once per Idempotency-Key); return it and whether it is terminal. A
    version that came as the bucket republished it stays bytes, as stored."""
    pe = rt.pe
    if body.tasks is not None:
        try:
            check_plan(body.tasks, pe.max_tasks_per_execution)
        except PlanError as e:
            raise HTTPException(422, {"field": "tasks", "message": str(e)}) from None
        if not pe.simulated.faults:
            for i, t in enumerate(body.tasks):
                sim = Simulate.model_validate(t.context.get("simulate") or {})
                asked, timeout = sim.faults(), pe.worker_pools.get(t.pool).timeout
                if sim.latency_s is not None and sim.latency_s >= timeout:  # a hang by another name
                    asked.append(f"latency_s {sim.latency_s:g} (the pool times out at {timeout:g} s)")
                if asked:
                    raise HTTPException(422, {"field": f"tasks[{i}].context", "message": (
                        f"context.simulate: {', '.join(asked)} not allowed here (parallel_execution.simulated.faults "
                        "is off)")})
    if body.timeout_s is not None and body.timeout_s > pe.gateway.max_wait_s:
        raise HTTPException(422, {"field": "timeout_s", "message": f"at most {pe.gateway.max_wait_s:g} seconds"})
    wait_s = body.timeout_s if body.timeout_s is not None else pe.gateway.default_wait_s

    requested = now()
    req = ExecutionRequested(
        execution_id=_execution_id(who, idempotency_key),
        message=body.message,
        session_key=body.session_key,
        project=body.project,
        force_parallel=body.force_parallel,
        tasks=body.tasks,
        mode=body.mode if pe.enabled else "serial",  # disabled: every plan runs one task at a time
        tenant=who.tenant,
        requested_at=requested,
        deadline_at=requested + timedelta(seconds=pe.execution_timeout_s),
        request_hash=_fingerprint(body),
        routing=routing,
    )
    eid, names = req.execution_id, rt.names
    # The execution lives in one NATS message (its document) from now on, and the agents' outputs and the final
    # answer join it: a request may take a quarter of the server's max_payload.
    size, budget = len(req.to_bytes()), rt.nats.max_payload // 4
    if size > budget:
        raise HTTPException(413, f"the request takes {size} bytes as a message, more than the {budget} it may (a "
                                 f"quarter of the NATS server's max_payload, {rt.nats.max_payload}): send a shorter "
                                 "message, or less context")
    ex = new_execution(req)
    replay = False

    def check(at: datetime, msg_id: str) -> Awaitable[PubAck]:
        """The aggregator's deadline check, scheduled in the stream for ``at``, so no execution waits forever."""
        return schedule(rt.jetstream, names.execution_deadline_schedule(eid), names.execution_deadline, at,
                        ExecutionDeadline(execution_id=eid, deadline_at=at), msg_id)

    # Scheduled before the document is stored: a stored execution always has a check that ends it, even if this
    # gateway dies, or the request cannot be published, before the PM hears of it.
    scheduled = await check(req.deadline_at, f"{eid}:deadline")
    try:
        req.revision = await rt.executions.create(ex)
        fresh = True
        if scheduled.duplicate:  # an earlier try of this key stored its check, then not the execution: this deadline
            await check(req.deadline_at, f"{eid}:deadline:{req.deadline_at.timestamp()}")
    except KeyWrongLastSequenceError:
        replay = True
        existing = await owned(rt, who, eid)
        if not existing.terminal:  # a replay past the duplicate window replaced its check: the first deadline holds
            await check(existing.deadline_at, f"{eid}:deadline:{existing.deadline_at.timestamp()}")
        if existing.request_hash != ex.request_hash:
            raise HTTPException(422, {"field": "Idempotency-Key",
                                      "message": "this key was used with a different request"}) from None
        # Never planned, nor being planned (`planning`: a PM has it): publishing again is harmless.
        ex, fresh = existing, existing.status == "queued"
        req.deadline_at = existing.deadline_at  # the deadline set when it was accepted, not one from now
        log.info("idempotent replay", extra={"execution_id": eid, "tenant": who.tenant})
    # Subscribe before publishing, so the version waited for cannot slip past: the bucket republishes every
    # version it stores (never one that lost its compare-and-set), so the answer needs no event and no read.
    sub = await rt.nats.subscribe(names.document(eid))
    try:
        if replay:  # read again, now that no later version can slip past unseen (it may have ended meanwhile)
            ex = await owned(rt, who, eid)
        if not ex.terminal:
            if fresh:
                await publish(rt.jetstream, names.execution_requested, req, msg_id=eid)
                log.info("accepted execution", extra={"execution_id": eid, "tenant": who.tenant})
        if ex.terminal or not (body.wait or plannable(ex)):  # a replay: what was waited for is there already
            return ex, ex.terminal
        until = TERMINAL_EXECUTION if body.wait else PLANNED
        stored = await _stored(rt, sub, until, wait_s if body.wait else PLAN_WAIT_S, request)
    finally:
        await sub.unsubscribe()
    if stored is not None:
        return stored
    current = await _current(rt, ex)
    return current, current.terminal


async def _current(rt: Runtime, known: Execution) -> Execution:
    """The execution as stored now, or ``known`` (a version this request read or wrote) when NATS cannot be read:
    the request was taken, so it is not answered 503 (which tells a client to send it again, and a request sent
    again without its Idempotency-Key would run twice)."""
    why = "not connected"  # a read now would wait out its timeout in nats-py's buffer
    if rt.nats.is_connected:
        try:
            current = await rt.executions.get(known.execution_id)
            return current[0] if current is not None else known  # never deleted, but an operator may purge
        except UNAVAILABLE as e:
            why = type(e).__name__
    log.warning("accepted, but NATS could not be read for the answer (%s): answering with the version known", why,
                extra={"execution_id": known.execution_id})
    return known


PLANNED = frozenset(get_args(ExecutionStatus)) - UNPLANNED  # planned, or ended without a plan


async def _next(rt: Runtime, sub: Subscription, timeout: float, gone: asyncio.Future[None] | None = None
                ) -> Msg | None:
    """The subscription's next message; None once the service is stopping (a wait ends then, answered from the
    store, rather than being cut off) or the client is ``gone``; TimeoutError when ``timeout`` passes first."""
    stopping = rt.stopping()
    if stopping.done() or (gone is not None and gone.done()):
        return None
    nxt = asyncio.ensure_future(sub.next_msg(timeout=timeout))
    ends: list[asyncio.Future[Any]] = [nxt, stopping] if gone is None else [nxt, stopping, gone]
    try:
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # an event stream whose client went: its wait goes with it, not on to a timeout
        if not nxt.cancel() and not nxt.cancelled():
            nxt.exception()  # done meanwhile: seen, so not reported as never retrieved
        raise
    if not nxt.done():
        nxt.cancel()
        return None
    return nxt.result()


async def _gone(request: Request) -> None:
    """Until the client has closed its connection (what it still sends of a body is passed over). A body that
    breaks the size limit on the way ends the wait too."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass


async def _stored(rt: Runtime, sub: Subscription, until: frozenset[str], within: float,
                  request: Request) -> tuple[bytes, bool] | None:
    """The first version of the execution's document stored with a status in ``until``, byte for byte as the
    bucket republished it, and whether it is terminal; None when none came ``within`` seconds, the service
    is stopping, or the client of ``request`` has gone (nobody is waiting any more)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    gone = asyncio.ensure_future(_gone(request))
    try:
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await _next(rt, sub, left, gone)
            except TimeoutError:
                return None
            if msg is None:
                return None
            if not msg.data:  # a delete or purge marker: executions are never deleted, but an operator may purge
                continue
            status = _Head.model_validate_json(msg.data).status
            if status in until:
                return msg.data, status in TERMINAL_EXECUTION
        return None
    finally:
        gone.cancel()


@router.post(
    "/execute-parallel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Execution,
    responses={200: {"model": Execution, "description": "terminal (wait=true)"}, **ERRORS},
)
async def execute_parallel(
    body: ExecuteRequest,
    who: CallerDep,
    rt: RuntimeDep,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> Execution | Response:
    """Accept a request; 202 with the planned execution, or 200 with the terminal one when ``wait``."""
    with held(request, who, body.wait):
        ex, final = await _submit(rt, who, body, idempotency_key, request)
    code = status.HTTP_200_OK if final else status.HTTP_202_ACCEPTED
    if isinstance(ex, bytes):  # the stored document is the response: no need to parse and re-serialise it
        return Response(ex, code, media_type="application/json")
    response.status_code = code
    return ex


@router.post("/chat", response_model=ChatResponse, responses={202: {"model": ChatResponse}, **ERRORS},
             tags=["chat"])
async def chat(
    body: ChatRequest,
    who: CallerDep,
    rt: RuntimeDep,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> ChatResponse:
    """The single-agent chat endpoint: routed to parallel execution when it pays, else one specialist."""
    r = should_use_parallel_execution(body.message, enabled=rt.pe.enabled, force_parallel=body.force_parallel,
                                      project=body.project)
    metrics.ROUTING_SECONDS.observe(r.decision_ms / 1000)
    routing = {"parallel": r.parallel, "reason": r.reason, "pools": r.pools, "decision_ms": r.decision_ms}
    if r.parallel:
        req = ExecuteRequest(message=body.message, session_key=body.session_key, project=body.project,
                             force_parallel=body.force_parallel, wait=body.wait, timeout_s=body.timeout_s)
    else:
        # The backward-compatible path: one agent — the pool the router picked — answers the whole message.
        req = ExecuteRequest(message=body.message, session_key=body.session_key, project=body.project,
                             tasks=[PlanTask.for_request("chat", r.pool, "", body.message)], mode="serial",
                             wait=body.wait, timeout_s=body.timeout_s)
    with held(request, who, req.wait):
        submitted, final = await _submit(rt, who, req, idempotency_key, request, routing)
    ex = Execution.model_validate_json(submitted) if isinstance(submitted, bytes) else submitted
    response.status_code = status.HTTP_200_OK if final else status.HTTP_202_ACCEPTED
    return ChatResponse(execution_id=ex.execution_id, status=ex.status, mode=ex.mode, routing=routing,
                        response=ex.final_response, cost_usd=ex.cost.total_usd)


@router.get("/execution/{execution_id}", response_model=Execution, responses=ERRORS)
async def get_execution(document: Annotated[bytes, Depends(owned_document)]) -> Response:
    """Status, per-task state, cost and — once terminal — the final response (the document as stored)."""
    return Response(document, media_type="application/json")


@router.delete("/execution/{execution_id}", response_model=Execution,
               responses={202: {"model": Execution, "description": "cancel requested, not yet done"},
                          409: {"model": ErrorBody}, **ERRORS})
async def cancel_execution(
    ex: ExecutionDep,
    who: CallerDep,
    rt: RuntimeDep,
    request: Request,
    response: Response,
    wait_s: Annotated[float, Query(ge=0, le=60, allow_inf_nan=False,
                                   description="how long to wait for the cancellation")] = 10,
) -> Execution | Response:
    """Cancel: queued tasks never run, running ones are abandoned at their next heartbeat; the execution
    ends ``cancelled`` with the cost spent so far."""
    execution_id = ex.execution_id
    with held(request, who, wait_s > 0):
        answer = await _cancel(rt, who, execution_id, wait_s, request)
    if isinstance(answer, bytes):
        return Response(answer, status.HTTP_200_OK, media_type="application/json")
    response.status_code = status.HTTP_202_ACCEPTED
    return answer


async def _cancel(rt: Runtime, who: Caller, execution_id: str, wait_s: float, request: Request
                  ) -> bytes | Execution:
    """Publish the cancel; the terminal version of the document if one is stored within ``wait_s``, else the
    version stored now."""
    sub = await rt.nats.subscribe(rt.names.document(execution_id))
    try:
        # Read again, now that no later version can slip past: had it ended after the read that found it, the
        # cancel would change nothing, no version would come, and the wait would run out on an execution that
        # is over.
        ex = await owned(rt, who, execution_id)
        if ex.terminal:
            raise HTTPException(409, {"field": "execution_id", "message": f"execution already {ex.status}"})
        await publish(rt.jetstream, rt.names.execution_cancel, CancelExecution(execution_id=execution_id),
                      msg_id=f"{execution_id}:cancel")
        log.info("cancel requested", extra={"execution_id": execution_id, "tenant": who.tenant})
        final = await _stored(rt, sub, TERMINAL_EXECUTION, wait_s, request) if wait_s else None
    finally:
        await sub.unsubscribe()
    return final[0] if final is not None else await _current(rt, ex)


async def event_subscription(
    ex: ExecutionDep,
    who: CallerDep,
    rt: RuntimeDep,
    request: Request,
    last_event_id: Annotated[str | None, Header(description="resume after this event id")] = None,
) -> AsyncIterator[tuple[Subscription, int]]:
    """The execution's events from the start (or after ``Last-Event-ID``), subscribed before the response starts,
    so NATS being unavailable is a 503 rather than a stream cut off after its 200; closed after the response, which
    holds one of the key's open requests (``held``) until then."""
    # Ours are small ordinals: ASCII digits ("²", a latin-1 byte, passes isdigit() but not int()), not too many of
    # them (int() refuses over 4300). Anything else replays from the start.
    given = last_event_id or ""
    after = int(given) if len(given) <= 18 and given.isascii() and given.isdigit() else 0
    with held(request, who):
        # With the server's heartbeats, nats-py notices a consumer that a NATS restart took away (two missed) and
        # makes it again after the last event it delivered; without them the stream went quiet for good.
        sub = await rt.jetstream.subscribe(rt.names.events(ex.execution_id, "*"), stream=rt.names.events_stream,
                                           ordered_consumer=True, idle_heartbeat=EVENTS_HEARTBEAT_S,
                                           config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        try:
            yield sub, after
        finally:
            await sub.unsubscribe()


@router.get("/execution/{execution_id}/events", response_class=EventSourceResponse, responses=JSON_ERRORS)
async def execution_events(
    ex: ExecutionDep,
    rt: RuntimeDep,
    events: Annotated[tuple[Subscription, int], Depends(event_subscription)],
) -> AsyncIterator[ServerSentEvent]:
    """Every lifecycle event of the execution as Server-Sent Events, replayed from the start (or after
    ``Last-Event-ID``), live until the terminal ``completed`` event, which closes the stream. A gateway that
    is stopping closes it too: the client reconnects with ``Last-Event-ID`` to another replica."""
    (sub, after), eid = events, ex.execution_id
    # An event's id is its place among the execution's own events (1, 2, …), not the shared stream's sequence, which
    # would tell a client how many events other executions (other tenants') had in between. Resuming replays the
    # execution's events from its first and sends those after ``after``; an ordered consumer that NATS lost (a
    # restart) is made again after the last one it delivered, so the count holds.
    n = 0
    # Ended already: its events are all in the stream, and replay brings them at once. A pause then means there is
    # nothing after the resume point (it was the final event): the stored state closes the stream, without waiting
    # out a keep-alive.
    idle_s = REPLAY_IDLE_S if ex.terminal else KEEPALIVE_S
    while True:
        try:
            msg = await _next(rt, sub, idle_s)
        except TimeoutError:
            try:
                current = await rt.executions.get(eid)
            except UNAVAILABLE:  # NATS away for now: the subscription carries on once it is back
                current = None
            if current is not None and current[0].terminal:
                # Idle, and over: its events aged out of the stream, the stored state says how it ended.
                yield ServerSentEvent(event="completed",
                                      raw_data=ExecutionCompleted(execution=current[0]).model_dump_json())
                return
            yield ServerSentEvent(comment="keep-alive")
            continue
        if msg is None:
            return
        n += 1
        kind = msg.subject.rsplit(".", 1)[-1]
        if n <= after:  # the client has it
            if kind == "completed":  # or says it has it (resuming at or past the end): told again how it ended
                yield ServerSentEvent(event=kind, raw_data=msg.data.decode())
                return
            continue
        yield ServerSentEvent(event=kind, id=str(n), raw_data=msg.data.decode())
        if kind == "completed":
            return
