"""State transitions of the execution document: pure functions, safe to re-run under compare-and-set.

Each ``apply_*`` returns whether it changed the document; a duplicated or late message changes
nothing, which is what makes redelivery and racing aggregator replicas harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from shared import metrics
from shared.failures import DEGRADATION, ON_EXHAUSTED
from shared.schemas import (
    TERMINAL_TASK,
    Attempt,
    Execution,
    ExecutionRequested,
    LifecycleEvent,
    ModelCall,
    RunTask,
    TaskCompleted,
    TaskFailed,
    TaskOutput,
    TaskSpec,
    TaskStarted,
    TaskState,
    TaskStatus,
    now,
    same_run,
)
from shared.sizes import fit, text_slots

log = logging.getLogger(__name__)

BLOCKING = frozenset({"failed", "skipped", "cancelled"})
LOST_UNANNOUNCED = "worker lost before it reported (and before its start was announced); redelivered"
REPORTED_LATE = "known only from a report that came after its task had ended"
RUN_AGAIN = "another run of the task: its message came twice (see `run`)"


def new_execution(req: ExecutionRequested) -> Execution:
    return Execution(
        execution_id=req.execution_id,
        mode=req.mode,
        tenant=req.tenant,
        message=req.message,
        project=req.project,
        session_key=req.session_key,
        created_at=req.requested_at,
        updated_at=req.requested_at,
        deadline_at=req.deadline_at,
        request_hash=req.request_hash,
        routing=req.routing,
    )


UNPLANNED: frozenset[str] = frozenset({"queued", "planning"})  # no plan stored yet, and not ended


def plannable(ex: Execution) -> bool:
    """No plan is stored yet, and the execution has not ended."""
    return ex.status in UNPLANNED


def start_planning(ex: Execution, request: int) -> bool:
    """``queued`` → ``planning`` by the delivery of the request message ``request`` (its stream sequence): shown
    while the decomposition model plans (a minute, with thinking). A request the gateway takes again meanwhile is
    not published again, and another copy of it already in the stream is not planned again: either would pay for
    a second plan."""
    if ex.status != "queued":
        return False
    ex.status, ex.planning_request, ex.updated_at = "planning", request, now()
    return True


def record_calls(ex: Execution, calls: Sequence[ModelCall]) -> bool:
    """Add the model calls ``ex`` does not hold yet (by id: a write tried again holds them already); whether any was."""
    recorded = {c.id for c in ex.calls}
    new = [c for c in calls if c.id not in recorded]
    ex.calls.extend(new)
    return bool(new)


def apply_plan(ex: Execution, specs: list[TaskSpec], planner: str, calls: Sequence[ModelCall] = ()) -> bool:
    """Install the plan (with the calls that made it) and queue what can start (in serial mode: only the
    first task); only once. A plan that comes too late (the execution ended, or another plan was stored
    first) changes nothing but the record of the calls that made it: they were billed all the same. A call
    already recorded (this plan's own write, tried again after its acknowledgement was lost) is not added again."""
    if not plannable(ex):
        unused = f"unused: the execution was {ex.status} first"
        return record_calls(ex, [c.model_copy(update={"error": c.error or unused}) for c in calls])
    record_calls(ex, calls)
    ex.tasks = [
        TaskState(id=s.id, pool=s.pool, description=s.description, context=s.context, depends_on=s.depends_on)
        for s in _in_dependency_order(specs)
    ]
    ex.planner = planner  # type: ignore[assignment]
    ex.status = "running"
    ex.updated_at = now()
    _propagate(ex)
    return True


def _in_dependency_order(specs: list[TaskSpec]) -> list[TaskSpec]:
    """The plan's order, except that a task never comes before what it depends on (plans are acyclic)."""
    done: set[str] = set()
    ordered: list[TaskSpec] = []
    pending = list(specs)
    while pending:
        ready = next(s for s in pending if all(d in done for d in s.depends_on))
        ordered.append(ready)
        done.add(ready.id)
        pending.remove(ready)
    return ordered


def run_command(ex: Execution, task: TaskState, outputs: dict[str, TaskOutput] | None = None) -> RunTask:
    """The RunTask for ``task``, carrying its dependencies' outputs (or ``outputs``) in ``context.upstream``, and
    the client's whole request in ``context.request`` when its description had to cut it short."""
    if outputs is None:
        outputs = {d: dep.output for d in task.depends_on if (dep := ex.task(d)) is not None and dep.output}
    spec = task.spec()
    added: dict[str, Any] = {}
    if outputs:
        added["upstream"] = {d: o.model_dump(exclude_defaults=True) for d, o in outputs.items()}
    if spec.needs_request():
        added["request"] = ex.message.strip()
    if added:
        spec = task.spec(**added)
    return RunTask(execution_id=ex.execution_id, task=spec, deadline_at=ex.deadline_at)


def run_bytes(ex: Execution, task: TaskState, limit: int) -> bytes:
    """``run_command``'s message, its dependencies' longest texts cut (in a copy) when it exceeds ``limit``."""
    data = run_command(ex, task).to_bytes()
    if len(data) <= limit:
        return data
    outputs = {d: dep.output.model_copy(deep=True)
               for d in task.depends_on if (dep := ex.task(d)) is not None and dep.output}
    slots = [[s for o in outputs.values() for s in text_slots(o)]]
    data, cut = fit(lambda: run_command(ex, task, outputs).to_bytes(), slots, limit, "a task's message")
    metrics.TEXTS_CUT.labels("task").inc()
    log.warning("task %s's message over %d bytes: %d characters of its dependencies' output cut to fit", task.id,
                limit, cut, extra={"execution_id": ex.execution_id})
    return data


def run_msg_id(execution_id: str, task_id: str) -> str:
    return f"{execution_id}:{task_id}:run"


def queued(ex: Execution) -> list[TaskState]:
    """Tasks released but not yet started: (re)publishing them is harmless thanks to msg-id dedup."""
    return [t for t in ex.tasks if t.status == "queued"]


def apply_result(ex: Execution, r: TaskStarted | TaskCompleted | TaskFailed) -> bool:
    """Record one attempt's news; returns False for anything already known or too late."""
    task = ex.task(r.task_id)
    if task is None:
        return False
    if ex.terminal or task.status in TERMINAL_TASK:
        return _late_cost(task, r)
    att = task.attempt(r.attempt, r.run)
    if att is not None and att.error == LOST_UNANNOUNCED:  # it reported after all, after a later delivery's
        task.attempts.remove(att)
        att = None
    if att is None:
        att = Attempt(n=r.attempt, run=r.run, worker=r.worker, started_at=r.started_at, upstream=r.upstream)
        seen = {a.n for a in task.attempts if same_run(a, r.run)}
        # Attempt numbers are delivery counts of the run's message: a missing one is a delivery whose worker
        # was lost before it reported, quicker than its start is announced. Only its existence is known.
        task.attempts.extend(Attempt(n=n, run=r.run, worker="unknown", started_at=r.started_at,
                                     finished_at=r.started_at, outcome="lost", error=LOST_UNANNOUNCED)
                             for n in range(1, r.attempt) if n not in seen)
        task.attempts.append(att)
        task.attempts.sort(key=lambda a: a.n)
        # A later delivery means every earlier one of its message still "running" lost its worker (crash, kill).
        for earlier in task.attempts:
            if same_run(earlier, r.run) and earlier.n < r.attempt and earlier.outcome == "running":
                earlier.outcome, earlier.finished_at = "lost", r.started_at
                earlier.error = "worker lost before reporting; redelivered after ack_wait"
    elif isinstance(r, TaskStarted) or att.outcome != "running":
        return _late_cost(task, r)

    if isinstance(r, TaskCompleted):
        att.outcome, att.finished_at = "completed", r.finished_at
        att.model, att.provider, att.usage, att.cost_usd = r.model, r.provider, r.usage, r.cost_usd
        task.status, task.output, task.error = "completed", r.output, None
        for later in task.attempts:  # an earlier delivery that reported after all beat a redelivery still running:
            if later.outcome == "running":  # that one's worker abandons it, or reports late (its cost is counted)
                later.outcome, later.finished_at = "lost", r.finished_at
                run = "" if same_run(later, r.run) else f" of run {r.run} (the task's message came twice)"
                later.error = f"superseded: attempt {r.attempt}{run} completed the task first"
    elif isinstance(r, TaskFailed):
        att.outcome, att.finished_at, att.error, att.error_kind = "failed", r.finished_at, r.error, r.error_kind
        att.model, att.provider, att.usage, att.cost_usd = r.model, r.provider, r.usage, r.cost_usd
        att.strategy = r.strategy
        task.error = r.error
        # Given up on: the task fails, unless another run of it is still running (see ``run``).
        if r.final and not any(a.outcome == "running" and not same_run(a, r.run) for a in _latest(task)):
            _give_up(task, r.error)
        else:
            task.status = _live_status(task)
    else:
        task.status = _live_status(task)
    _propagate(ex)
    ex.updated_at = now()
    return True


def _late_cost(task: TaskState, r: TaskStarted | TaskCompleted | TaskFailed) -> bool:
    """A report too late to change anything (its attempt was given up as lost or dead-lettered, or its task
    or execution ended meanwhile) still says what its model call cost: that goes on its attempt, once, so the
    execution's cost stays the sum of every call made for it. Statuses, and so events, stay as they are."""
    if isinstance(r, TaskStarted) or not r.cost_usd:
        return False
    att = task.attempt(r.attempt, r.run)
    late = f"it reported later, at a cost of ${r.cost_usd:.4f}"
    if att is None:  # never heard of (ended before its start was announced): recorded now, for its cost only
        again = any(not same_run(a, r.run) for a in task.attempts)
        att = Attempt(n=r.attempt, run=r.run, worker=r.worker, started_at=r.started_at, finished_at=r.finished_at,
                      outcome="lost", error=f"{REPORTED_LATE}: {late}" + (f"; {RUN_AGAIN}" if again else ""))
        task.attempts.append(att)
        task.attempts.sort(key=lambda a: a.n)
    elif not att.model and (att.outcome == "lost" or att.error_kind == "dead_letter"):  # a worker given up on
        att.error = "; ".join(filter(None, [att.error, late]))
    else:
        return False
    att.model, att.provider, att.usage, att.cost_usd = r.model, r.provider, r.usage, r.cost_usd
    return True


def _live_status(task: TaskState) -> TaskStatus:
    # A second run of the task (see ``run``) may be running beside the first: the latest attempt of each counts.
    return "running" if any(a.outcome == "running" for a in _latest(task)) else "retrying"


def _give_up(task: TaskState, error: str, status: TaskStatus = "failed") -> None:
    """The task will not complete: the pool's exhaustion strategy and degradation label apply."""
    task.status, task.error = status, error
    task.resolution = ON_EXHAUSTED[task.pool].value
    task.degradation = DEGRADATION[task.pool]
    for a in task.attempts:
        if a.outcome == "running":
            a.outcome, a.finished_at, a.error = "lost", now(), error


def expire(ex: Execution, reason: str) -> bool:
    """At the deadline: every task still open fails with ``reason``; returns whether any did."""
    if ex.terminal:
        return False
    open_tasks = [t for t in ex.tasks if t.status not in TERMINAL_TASK]
    for t in open_tasks:
        _give_up(t, reason)
    ex.updated_at = now()
    return bool(open_tasks) or all_tasks_terminal(ex)


def _propagate(ex: Execution) -> None:
    """Release tasks whose dependencies all completed; skip those blocked by a failure, transitively.

    In serial mode a task is released only when nothing else is queued or running, in plan order.
    """
    changed = True
    while changed:
        changed = False
        busy = any(t.status in ("queued", "running", "retrying") for t in ex.tasks)
        for t in ex.tasks:
            if t.status != "pending":
                continue
            deps = [ex.task(d) for d in t.depends_on]
            blocker = next((d for d in deps if d is not None and d.status in BLOCKING), None)
            if blocker is not None:
                _give_up(t, f"blocked by {blocker.id}", "skipped")
                changed = True
            elif all(d is not None and d.status == "completed" for d in deps):
                if ex.mode == "serial" and busy:
                    continue
                t.status = "queued"
                busy = changed = True


def cancel(ex: Execution, reason: str) -> bool:
    """Every open task is cancelled (running attempts abandoned); the execution then finishes cancelled. With
    every task ended already (the last result came in the same write), it finishes as they did, without the
    cancel's reason as its error."""
    if ex.terminal:
        return False
    if all_tasks_terminal(ex):
        return True  # nothing left to cancel, but the execution is to be finished, as at its deadline
    for t in ex.tasks:
        if t.status not in TERMINAL_TASK:
            # What the client gets without it, as for work given up on (a cancelled review: unaudited).
            t.status, t.error, t.degradation = "cancelled", reason, DEGRADATION[t.pool]
            for a in t.attempts:
                if a.outcome == "running":
                    a.outcome, a.finished_at, a.error = "lost", now(), f"abandoned: {reason}"
    ex.error = reason
    ex.updated_at = now()
    if not ex.tasks:  # cancelled before it was planned: nothing to aggregate
        ex.status, ex.finished_at = "cancelled", ex.updated_at
    return True


def fail_execution(ex: Execution, error: str) -> bool:
    """End an execution that cannot run at all (no valid plan, never planned)."""
    if ex.terminal:
        return False
    ex.status, ex.error = "failed", error
    ex.finished_at = ex.updated_at = now()
    return True


TaskMarks = dict[str, tuple[str, dict[int | None, int]]]
EVENT_KIND = {"queued": "released", "running": "started", "retrying": "retrying", "completed": "task_completed",
              "failed": "task_failed", "skipped": "skipped", "cancelled": "task_cancelled"}


def marks(ex: Execution) -> TaskMarks:
    """Each task's status and latest attempt of each run: what lifecycle events are derived from."""
    return {t.id: (t.status, {a.run: a.n for a in _latest(t)}) for t in ex.tasks}


def _latest(task: TaskState) -> list[Attempt]:
    """The latest attempt of each run of the task (normally one run: its latest attempt)."""
    latest: dict[int | None, Attempt] = {}
    for a in task.attempts:
        if a.run not in latest or a.n > latest[a.run].n:
            latest[a.run] = a
    return list(latest.values())


def lifecycle_events(before: TaskMarks, ex: Execution) -> list[LifecycleEvent]:
    """What happened to each task since ``before``: a ``started`` event per attempt recorded since (also
    for one known only from its result), then one for the task's new status unless that is ``running``."""
    events = []
    for t in ex.tasks:
        status, last_n = before.get(t.id, ("", {}))
        new = [a for a in t.attempts
               if a.n > last_n.get(a.run, 0) and not (a.error or "").startswith(REPORTED_LATE)]
        for a in new:
            if a.error == LOST_UNANNOUNCED:
                continue
            events.append(LifecycleEvent(kind="started", execution_id=ex.execution_id, at=a.started_at, task_id=t.id,
                                         pool=t.pool, status="running", attempt=a.n, run=a.run, worker=a.worker))
        if t.status == "running" or (t.status == status and not new):
            continue
        last = t.attempts[-1] if t.attempts else None
        if t.status == "completed":  # the attempt that completed it, not a redelivery it superseded
            last = next((a for a in reversed(t.attempts) if a.outcome == "completed"), last)
        elif t.status in ("retrying", "failed"):  # the attempt that failed, not another run's (see ``run``)
            last = max((a for a in _latest(t) if a.outcome == "failed"), key=lambda a: a.finished_at or a.started_at,
                       default=last)
        events.append(LifecycleEvent(
            kind=EVENT_KIND.get(t.status, t.status), execution_id=ex.execution_id, at=ex.updated_at,
            task_id=t.id, pool=t.pool, status=t.status, attempt=last.n if last else None,
            run=last.run if last else None, worker=last.worker if last else None, model=last.model if last else None,
            error=t.error if t.status != "completed" else None, cost_usd=t.cost_usd,
            data={k: v for k, v in (("degradation", t.degradation), ("resolution", t.resolution),
                                    ("strategy", last.strategy if last else None)) if v},
        ))
    return events


def all_tasks_terminal(ex: Execution) -> bool:
    return bool(ex.tasks) and all(t.status in TERMINAL_TASK for t in ex.tasks)


def outcome(ex: Execution) -> str:
    """The terminal status the tasks add up to."""
    if any(t.status == "cancelled" for t in ex.tasks):
        return "cancelled"
    done = sum(t.status == "completed" for t in ex.tasks)
    if done == len(ex.tasks):
        return "completed"
    return "failed" if done == 0 else "partial"
