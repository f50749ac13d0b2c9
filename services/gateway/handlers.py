"""REST routes: accept work, wait for or look up its outcome. Status codes are decided here only."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from nats.aio.subscription import Subscription

from services.gateway.api import ErrorBody, ExecuteRequest
from shared import metrics
from shared.bus import publish
from shared.errors import PlanError
from shared.execution import new_execution
from shared.schemas import Execution, ExecutionCompleted, ExecutionDeadline, ExecutionRequested, check_plan, now
from shared.service import Runtime

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api", tags=["executions"])
EXECUTION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PLAN_WAIT_S = 2.0  # a 202 waits this long for the plan so it can list the tasks


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    if rt.store is None or rt.nc is None or not rt.nc.is_connected:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "not connected to NATS yet; retry shortly")
    return rt


RuntimeDep = Annotated[Runtime, Depends(runtime)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (404, 413, 422, 503)}


@router.post(
    "/execute-parallel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Execution,
    responses={200: {"model": Execution, "description": "terminal (wait=true)"}, **ERRORS},
)
async def execute_parallel(body: ExecuteRequest, rt: RuntimeDep, response: Response) -> Execution:
    """Accept a request; 202 with the planned execution, or 200 with the terminal one when ``wait``."""
    pe = rt.pe
    if body.tasks is not None:
        try:
            check_plan(body.tasks, pe.max_tasks_per_execution)
        except PlanError as e:
            raise HTTPException(422, {"field": "tasks", "message": str(e)}) from None
    wait_s = body.timeout_s if body.timeout_s is not None else pe.gateway.default_wait_s
    if wait_s > pe.gateway.max_wait_s:
        raise HTTPException(422, {"field": "timeout_s", "message": f"at most {pe.gateway.max_wait_s:g} seconds"})

    requested = now()
    req = ExecutionRequested(
        execution_id=uuid.uuid4().hex,
        message=body.message,
        session_key=body.session_key,
        project=body.project,
        force_parallel=body.force_parallel,
        tasks=body.tasks,
        mode=body.mode,
        requested_at=requested,
        deadline_at=requested + timedelta(seconds=pe.execution_timeout_s),
    )
    eid, names = req.execution_id, rt.names
    await rt.executions.create(new_execution(req))
    # Subscribe before publishing, so the plan or the final event cannot slip past us.
    sub = await rt.nc.subscribe(names.events(eid, "*"))  # type: ignore[union-attr]
    try:
        await publish(rt.jetstream, names.execution_requested, req, msg_id=eid)
        # The aggregator's deadline check: held by the broker until then, so no execution waits forever.
        await publish(rt.jetstream, names.execution_deadline,
                      ExecutionDeadline(execution_id=eid, deadline_at=req.deadline_at), msg_id=f"{eid}:deadline")
        log.info("accepted execution", extra={"execution_id": eid})
        final = await _wait_for(sub, "completed" if body.wait else "planned", wait_s if body.wait else PLAN_WAIT_S)
    finally:
        await sub.unsubscribe()
    if final is not None:
        response.status_code = status.HTTP_200_OK
        return final
    current = await rt.executions.get(eid)
    if current is None:  # pragma: no cover - we created it above
        raise HTTPException(500, "execution vanished")
    ex = current[0]
    if ex.terminal:
        response.status_code = status.HTTP_200_OK if body.wait else status.HTTP_202_ACCEPTED
    return ex


async def _wait_for(sub: Subscription, kind: str, within: float) -> Execution | None:
    """Wait for the execution's ``kind`` event (or completion); the terminal execution if completed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (left := deadline - loop.time()) > 0:
        try:
            msg = await sub.next_msg(timeout=left)
        except TimeoutError:
            return None
        if msg.subject.endswith(".completed"):
            return ExecutionCompleted.model_validate_json(msg.data).execution
        if msg.subject.endswith(f".{kind}"):
            return None
    return None


@router.get("/execution/{execution_id}", response_model=Execution, responses=ERRORS)
async def get_execution(execution_id: str, rt: RuntimeDep) -> Execution:
    """Status, per-task state, cost and — once terminal — the final response."""
    current = await rt.executions.get(execution_id) if EXECUTION_ID.match(execution_id) else None
    if current is None:
        raise HTTPException(404, {"field": "execution_id", "message": f"no execution with id {execution_id!r}"})
    return current[0]


def count_request(route: str, code: int) -> None:
    metrics.REQUESTS.labels(route, str(code)).inc()
