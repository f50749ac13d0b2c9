"""State transitions of the execution document: pure functions, safe to re-run under compare-and-set.

Each ``apply_*`` returns whether it changed the document; a duplicated or late message changes
nothing, which is what makes redelivery and racing aggregator replicas harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.schemas import (
    TERMINAL_TASK,
    Attempt,
    Execution,
    ExecutionRequested,
    ModelCall,
    RunTask,
    TaskCompleted,
    TaskFailed,
    TaskSpec,
    TaskStarted,
    TaskState,
    TaskStatus,
    now,
)

BLOCKING = frozenset({"failed", "skipped", "cancelled"})


def new_execution(req: ExecutionRequested) -> Execution:
    return Execution(
        execution_id=req.execution_id,
        message=req.message,
        project=req.project,
        session_key=req.session_key,
        created_at=req.requested_at,
        updated_at=req.requested_at,
        deadline_at=req.deadline_at,
    )


def apply_plan(ex: Execution, specs: list[TaskSpec], planner: str, calls: Sequence[ModelCall] = ()) -> bool:
    """Install the plan (with the calls that made it) and queue the tasks with no dependencies; only once."""
    if ex.status not in ("queued", "planning"):
        return False
    ex.calls.extend(calls)
    ex.tasks = [
        TaskState(
            id=s.id,
            pool=s.pool,
            description=s.description,
            context=s.context,
            depends_on=s.depends_on,
            status="pending" if s.depends_on else "queued",
        )
        for s in specs
    ]
    ex.planner = planner  # type: ignore[assignment]
    ex.status = "running"
    ex.updated_at = now()
    return True


def run_command(ex: Execution, task: TaskState) -> RunTask:
    """The RunTask for ``task``, carrying its dependencies' outputs in ``context.upstream``."""
    upstream = {}
    for dep_id in task.depends_on:
        dep = ex.task(dep_id)
        if dep is not None and dep.output is not None:
            upstream[dep_id] = dep.output.model_dump(exclude_defaults=True)
    spec = task.spec(upstream=upstream) if upstream else task.spec()
    return RunTask(execution_id=ex.execution_id, task=spec, deadline_at=ex.deadline_at)


def run_msg_id(execution_id: str, task_id: str) -> str:
    return f"{execution_id}:{task_id}:run"


def queued(ex: Execution) -> list[TaskState]:
    """Tasks released but not yet started: (re)publishing them is harmless thanks to msg-id dedup."""
    return [t for t in ex.tasks if t.status == "queued"]


def apply_result(ex: Execution, r: TaskStarted | TaskCompleted | TaskFailed) -> bool:
    """Record one attempt's news; returns False for anything already known or too late."""
    task = ex.task(r.task_id)
    if task is None or ex.terminal or task.status in TERMINAL_TASK:
        return False
    att = task.attempt(r.attempt)
    if att is None:
        att = Attempt(n=r.attempt, worker=r.worker, started_at=r.started_at)
        task.attempts.append(att)
        task.attempts.sort(key=lambda a: a.n)
    elif isinstance(r, TaskStarted) or att.outcome != "running":
        return False

    if isinstance(r, TaskCompleted):
        att.outcome, att.finished_at = "completed", r.finished_at
        att.model, att.provider, att.usage, att.cost_usd = r.model, r.provider, r.usage, r.cost_usd
        task.status, task.output, task.error = "completed", r.output, None
    elif isinstance(r, TaskFailed):
        att.outcome, att.finished_at, att.error = "failed", r.finished_at, r.error
        att.model, att.provider, att.usage, att.cost_usd = r.model, r.provider, r.usage, r.cost_usd
        task.error = r.error
        task.status = "failed" if r.final else _live_status(task)
    else:
        task.status = _live_status(task)
    _propagate(ex)
    ex.updated_at = now()
    return True


def _live_status(task: TaskState) -> TaskStatus:
    latest = task.attempts[-1]
    return "running" if latest.outcome == "running" else "retrying"


def _propagate(ex: Execution) -> None:
    """Release tasks whose dependencies all completed; skip those blocked by a failure, transitively."""
    changed = True
    while changed:
        changed = False
        for t in ex.tasks:
            if t.status != "pending":
                continue
            deps = [ex.task(d) for d in t.depends_on]
            blocker = next((d for d in deps if d is not None and d.status in BLOCKING), None)
            if blocker is not None:
                t.status, t.error = "skipped", f"blocked by {blocker.id}"
                changed = True
            elif all(d is not None and d.status == "completed" for d in deps):
                t.status = "queued"
                changed = True


def all_tasks_terminal(ex: Execution) -> bool:
    return bool(ex.tasks) and all(t.status in TERMINAL_TASK for t in ex.tasks)


def outcome(ex: Execution) -> str:
    """The terminal status the tasks add up to."""
    done = sum(t.status == "completed" for t in ex.tasks)
    if done == len(ex.tasks):
        return "completed"
    return "failed" if done == 0 else "partial"
