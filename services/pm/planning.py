"""Turning a request into a plan: the client's own plan, else the decomposition model's, else rules, else
one serial task.

The model's plan is checked like a client's (pools, ids, dependencies, cycles, task limit); a failed
call or a plan that does not pass falls back to the rules, and the call is recorded either way — it
was paid for.

The rule-based planner recognises a project ("build a … website/app/…") and lays out the usual
delivery: database schema, backend API, frontend (after the API) and a security audit — any web
project stores data and takes input from strangers. A request for a security review and nothing else ("audit
our shop before launch") becomes four independent reviews: access, input handling, data protection, secrets
and dependencies. Otherwise it creates one task per pool whose
keywords matched (only the strong ones unless ``force_parallel``). Nothing matched → a single
codegen task (planner "serial").
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from services.pm.prompts import format_prompt
from shared.config import ParallelExecutionConfig
from shared.costs import guarded_call, model_call
from shared.distributor import Distribution, rules_layout
from shared.errors import PlanError
from shared.names import Pool
from shared.providers import ModelProvider
from shared.schemas import ExecutionRequested, ModelCall, TaskSpec, check_plan

log = logging.getLogger(__name__)



def _routing(d: Distribution, pool: Pool) -> dict[str, Any]:
    """Why the task went to ``pool``: that pool's share of the keyword score and the terms that matched."""
    total = sum(d.scores.values())
    share = round(d.scores[pool] / total, 4) if total else 0.0
    return {"routing": {"pool": pool, "score_share": share, "matched": d.matched.get(pool, [])}}


def rules_plan(message: str, force_parallel: bool, project: str | None = None,
               max_tasks: int | None = None) -> tuple[list[TaskSpec], str]:
    """Plan by keywords (``rules_layout``); returns the tasks and the planner name ("rules" or "serial"). A
    layout with more tasks than ``max_tasks`` becomes one task for the whole request, in the layout's pool,
    rather than a plan with parts of the work dropped."""
    lay = rules_layout(message, force_parallel, project)

    def task(id: str, pool: Pool, lead: str, **fields: Any) -> TaskSpec:
        return TaskSpec.for_request(id, pool, lead, message, context=_routing(lay.d, pool), **fields)

    if lay.kind == "project":
        tasks = [
            task("schema", "database", "Design the database schema and migrations for: "),
            task("backend", "codegen", "Build the backend API for: "),
            task("frontend", "codegen", "Build the frontend (pages, forms, API client) for: ", depends_on=["backend"]),
            task("security-audit", "security", "Audit authentication, payments and data handling for: "),
        ]
    elif lay.kind == "audit":
        areas = [("auth-review", "authentication, sessions and access control (CSRF, password storage, roles)"),
                 ("input-review", "input handling for injection and XSS, every form and endpoint"),
                 ("data-review", "data protection: encryption, personal data, logging, payment flows"),
                 ("secrets-scan", "exposed secrets and vulnerable dependencies")]
        tasks = [task(i, "security", f"Review {what}, of: ") for i, what in areas]
    else:  # nothing matched: no pool's own task
        tasks = [] if lay.d.pool == "multi" else [task(f"{p}-1", p, "") for p in lay.pools]
    if not tasks or (max_tasks is not None and len(tasks) > max_tasks):
        return [task("task-1", lay.pool, "")], "serial"
    return tasks, "rules" if len(tasks) > 1 else "serial"


def make_plan(req: ExecutionRequested, max_tasks: int) -> tuple[list[TaskSpec], str]:
    """The plan to run and who made it; a client plan is re-validated, never trusted blindly."""
    if req.tasks is not None:
        check_plan(req.tasks, max_tasks)
        return req.tasks, "client"
    return rules_plan(req.message, req.force_parallel, req.project, max_tasks)


@dataclass(frozen=True)
class PlanOutcome:
    tasks: list[TaskSpec]
    planner: str
    calls: list[ModelCall] = field(default_factory=list)


async def plan_request(req: ExecutionRequested, pe: ParallelExecutionConfig, provider: ModelProvider,
                       on_cut: Callable[[ModelCall], Awaitable[None]] | None = None) -> PlanOutcome:
    """The client's plan; else the decomposition model's; else the rules'; else one serial task. A decomposition
    call cut off by a stop goes to ``on_cut`` (see ``guarded_call``)."""
    max_tasks = pe.max_tasks_per_execution
    if req.tasks is not None or not provider.writes:
        return PlanOutcome(*make_plan(req, max_tasks))
    pm = pe.pm_coordinator
    model, ctx = pm.decomposition_model, {"execution_id": req.execution_id}
    reply, failed = await guarded_call(
        pe, "decomposition", model, provider.name,
        lambda meter: provider.decompose(format_prompt(req, max_tasks), model, pm.reasoning_effort, meter), ctx, on_cut)
    if reply is not None:
        try:
            check_plan(reply.plan.tasks, max_tasks)
        except PlanError as e:
            failed = model_call(pe, "decomposition", reply.model, reply.provider, reply.usage, f"invalid plan: {e}")
        else:
            call = model_call(pe, "decomposition", reply.model, reply.provider, reply.usage)
            return PlanOutcome(list[TaskSpec](reply.plan.tasks), "llm", [call])
    assert failed is not None  # no reply comes with the failed call
    log.warning("decomposition not used (%s); planning by rules", failed.error, extra=ctx)
    try:
        return PlanOutcome(*make_plan(req, max_tasks), calls=[failed])
    except (PlanError, ValidationError) as e:  # the call was paid: it goes with the failure, into the execution's cost
        raise PlanError(str(e), calls=[failed]) from e
