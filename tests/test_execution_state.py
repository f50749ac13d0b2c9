"""State transitions of an execution: duplicates and late messages change nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from nats.aio.client import Client as NATS

from services.aggregator.handlers import AggregatorHandlers
from shared import metrics
from shared.cli import task_lines
from shared.costs import attempt_event
from shared.execution import (
    LOST_UNANNOUNCED,
    RUN_AGAIN,
    all_tasks_terminal,
    apply_plan,
    apply_result,
    cancel,
    lifecycle_events,
    marks,
    new_execution,
    outcome,
    queued,
)
from shared.names import Names
from shared.providers import SimulatedProvider
from shared.schemas import (
    ConsumerAdvisory,
    CostIncurred,
    Execution,
    ExecutionCompleted,
    ExecutionRequested,
    LifecycleEvent,
    ModelCall,
    TaskCompleted,
    TaskFailed,
    TaskOutput,
    TaskSpec,
    TaskStarted,
    Usage,
    now,
)
from tests.conftest import delivered, service_runtime

T0 = now()


def execution():  # type: ignore[no-untyped-def]
    req = ExecutionRequested(execution_id="e1", message="m", requested_at=T0, deadline_at=T0 + timedelta(hours=1))
    ex = new_execution(req)
    specs = [
        TaskSpec(id="api", pool="codegen", description="api"),
        TaskSpec(id="ui", pool="codegen", description="ui", depends_on=["api"]),
        TaskSpec(id="e2e", pool="security", description="review", depends_on=["ui"]),
        TaskSpec(id="db", pool="database", description="db"),
    ]
    assert apply_plan(ex, specs, "client")
    return ex


def started(task: str, n: int = 1) -> TaskStarted:
    return TaskStarted(execution_id="e1", task_id=task, pool="codegen", attempt=n, worker="w", started_at=T0)


def completed(task: str, n: int = 1, cost: float = 0.5) -> TaskCompleted:
    return TaskCompleted(execution_id="e1", task_id=task, pool="codegen", attempt=n, worker="w", started_at=T0,
                         finished_at=T0 + timedelta(seconds=1), model="m", provider="simulated", cost_usd=cost,
                         output=TaskOutput(summary=f"{task} done"))


def failed(task: str, n: int, final: bool) -> TaskFailed:
    return TaskFailed(execution_id="e1", task_id=task, pool="codegen", attempt=n, worker="w", started_at=T0,
                      finished_at=T0 + timedelta(seconds=1), error=f"boom {n}", final=final)


def test_plan_queues_roots_only_and_only_once() -> None:
    ex = execution()
    assert [t.id for t in queued(ex)] == ["api", "db"]
    assert not apply_plan(ex, [], "rules")


def test_completion_releases_dependents_and_duplicates_change_nothing() -> None:
    ex = execution()
    assert apply_result(ex, started("api"))
    assert not apply_result(ex, started("api"))
    assert apply_result(ex, completed("api"))
    assert ex.task("ui").status == "queued"  # type: ignore[union-attr]
    assert not apply_result(ex, completed("api"))
    assert not apply_result(ex, started("api", 2))  # a late redelivery of a finished task
    assert ex.task("api").cost_usd == 0.5  # type: ignore[union-attr]
    assert ex.cost.total_usd == 0.5


def test_out_of_order_started_after_completed_is_ignored() -> None:
    ex = execution()
    assert apply_result(ex, completed("db"))
    assert not apply_result(ex, started("db"))
    assert ex.task("db").status == "completed"  # type: ignore[union-attr]


def test_retry_then_final_failure_skips_dependents_transitively() -> None:
    ex = execution()
    apply_result(ex, started("api"))
    assert apply_result(ex, failed("api", 1, final=False))
    assert ex.task("api").status == "retrying"  # type: ignore[union-attr]
    apply_result(ex, started("api", 2))
    assert ex.task("api").status == "running"  # type: ignore[union-attr]
    assert apply_result(ex, failed("api", 2, final=True))
    assert ex.task("ui").status == "skipped" and ex.task("ui").error == "blocked by api"  # type: ignore[union-attr]
    assert ex.task("e2e").status == "skipped" and ex.task("e2e").error == "blocked by ui"  # type: ignore[union-attr]
    assert not all_tasks_terminal(ex)
    apply_result(ex, completed("db"))
    assert all_tasks_terminal(ex) and outcome(ex) == "partial"
    assert [a.outcome for a in ex.task("api").attempts] == ["failed", "failed"]  # type: ignore[union-attr]


def test_late_failure_of_an_earlier_attempt_keeps_the_running_one() -> None:
    ex = execution()
    apply_result(ex, started("api", 2))
    assert apply_result(ex, failed("api", 1, final=False))
    assert ex.task("api").status == "running"  # type: ignore[union-attr]


def test_an_earlier_attempt_that_completes_after_a_redelivery_started_leaves_nothing_running_or_unpaid() -> None:
    # Delivery 1's worker went quiet before it announced its start; after ack_wait delivery 2 started elsewhere.
    ex = execution()
    assert apply_result(ex, started("api", 2))
    before = marks(ex)
    assert apply_result(ex, completed("api", 1, cost=0.7))  # delivery 1 reports after all, and wins
    # Completed by attempt 1, not by the latest delivery.
    assert [(e.kind, e.attempt) for e in lifecycle_events(before, ex) if e.task_id == "api"] == [("task_completed", 1)]
    assert apply_result(ex, completed("api", 2, cost=0.5).model_copy(update={"worker": "w2", "model": "m2"}))
    api = ex.task("api")  # delivery 2 finished too: its call was paid for; the task names delivery 1's worker
    assert api is not None and (api.worker, api.model) == ("w", "m")
    assert api is not None and api.status == "completed"
    assert [(a.n, a.outcome, a.cost_usd) for a in api.attempts] == [(1, "completed", 0.7), (2, "lost", 0.5)]
    assert api.attempts[1].error is not None and api.attempts[1].error.startswith("superseded: attempt 1")
    assert ex.cost.total_usd == 1.2
    # `openclaw status` shows the attempt that completed it, and the task's whole cost.
    assert [" ".join(line.split()[-5:]) for line in task_lines(ex) if " api " in line] == [
        "api completed attempt 1 $1.2000"]


def test_the_attempts_of_a_second_message_for_a_task_are_its_own_and_each_is_paid_for() -> None:
    # A repeat of the task's message that the broker took as new (run 9): its deliveries are numbered from 1 again.
    ex = execution()
    assert apply_result(ex, started("api").model_copy(update={"run": 4}))
    assert apply_result(ex, failed("api", 2, final=False).model_copy(update={"run": 9}))
    api = ex.task("api")
    assert api is not None
    # Run 9's first delivery left no word: lost. Run 4's attempt 1 is no earlier delivery of run 9: still running.
    assert sorted((a.run, a.n, a.outcome) for a in api.attempts) == [(4, 1, "running"), (9, 1, "lost"),
                                                                    (9, 2, "failed")]
    assert api.status == "running"  # run 9 will retry, but run 4 runs meanwhile
    assert apply_result(ex, completed("api", 1, cost=0.7).model_copy(update={"run": 4}))
    assert apply_result(ex, completed("api", 3, cost=0.5).model_copy(update={"run": 9}))  # too late: its cost only
    assert not apply_result(ex, completed("api", 3, cost=0.5).model_copy(update={"run": 9}))  # once
    assert sorted((a.run, a.n, a.outcome, a.cost_usd) for a in api.attempts) == [
        (4, 1, "completed", 0.7), (9, 1, "lost", 0.0), (9, 2, "failed", 0.0), (9, 3, "lost", 0.5)]
    late = api.attempt(3, 9)
    assert late is not None and late.error is not None and late.error.endswith(RUN_AGAIN)
    assert ex.cost.total_usd == 1.2
    # A report that names no run (a pool from before runs were recorded) is any run's attempt of that number.
    assert api.attempt(1) is not None and api.attempt(2, None) is api.attempt(2, 9)
    # Each run's reports and cost events have msg-ids of their own.
    one, other = completed("api", 1).model_copy(update={"run": 4}), completed("api", 1).model_copy(update={"run": 9})
    assert len({one.msg_id(), other.msg_id(), completed("api", 1).msg_id()}) == 3
    assert attempt_event(one).msg_id() != attempt_event(other).msg_id()


def test_one_run_given_up_on_leaves_the_task_to_the_other_and_each_runs_events_are_its_own() -> None:
    ex = execution()
    before = marks(ex)
    assert apply_result(ex, started("api").model_copy(update={"run": 4}))
    assert apply_result(ex, started("api").model_copy(update={"run": 9}))
    assert [(e.kind, e.attempt, e.run) for e in lifecycle_events(before, ex)] == [("started", 1, 4), ("started", 1, 9)]
    # Run 4 fails for good (its retries ran out, or its message was dead-lettered) while run 9 still runs.
    before = marks(ex)
    assert apply_result(ex, failed("api", 1, final=True).model_copy(update={"run": 4}))
    api = ex.task("api")
    assert api is not None and api.status == "running" and ex.task("ui").status == "pending"  # type: ignore[union-attr]
    assert lifecycle_events(before, ex) == []
    before = marks(ex)
    assert apply_result(ex, completed("api").model_copy(update={"run": 9}))
    assert api.status == "completed" and ex.task("ui").status == "queued"  # type: ignore[union-attr]
    # The task's own fields describe the run that completed it.
    assert (api.worker, api.finished_at) == ("w", T0 + timedelta(seconds=1))
    done = [e for e in lifecycle_events(before, ex) if e.task_id == "api"]
    assert [(e.kind, e.attempt, e.run) for e in done] == [("task_completed", 1, 9)]
    # The same kind of event of each run goes out under a msg-id of its own.
    assert len({LifecycleEvent(kind="started", execution_id="e1", task_id="api", attempt=1, run=r).msg_id()
                for r in (4, 9, None)}) == 3


def test_a_late_start_of_a_delivery_handed_on_does_not_show_its_task_running() -> None:
    # Delivery 1's start, buffered while its worker was cut off, arrives after delivery 2 failed and will be retried.
    ex = execution()
    assert apply_result(ex, failed("api", 2, final=False))
    assert apply_result(ex, started("api", 1))
    assert ex.task("api").status == "retrying"  # type: ignore[union-attr]


def test_outcomes() -> None:
    ex = execution()
    for t in ("api", "ui", "e2e", "db"):
        apply_result(ex, completed(t))
    assert outcome(ex) == "completed"
    ex = execution()
    apply_result(ex, failed("api", 1, final=True))
    apply_result(ex, failed("db", 1, final=True))
    assert all_tasks_terminal(ex) and outcome(ex) == "failed"


def test_the_final_event_wraps_the_stored_document_as_if_serialised_again() -> None:
    ex = execution()
    assert apply_result(ex, started("api")) and apply_result(ex, completed("api"))
    stored = ex.model_dump_json().encode()
    event = ExecutionCompleted.model_validate_json(ExecutionCompleted.around(stored))
    assert event == ExecutionCompleted(execution=ex)
    assert event.execution.model_dump_json().encode() == stored


def test_an_attempt_known_only_from_its_result_gets_a_started_event_before_its_outcome() -> None:
    ex = execution()
    before = marks(ex)
    assert apply_result(ex, completed("api"))  # quicker than its start is announced: no TaskStarted
    events = [(e.kind, e.task_id, e.attempt) for e in lifecycle_events(before, ex)]
    assert events == [("started", "api", 1), ("task_completed", "api", 1), ("released", "ui", None)]
    att = ex.task("api").attempts[0]  # type: ignore[union-attr]
    assert (att.n, att.outcome, att.started_at) == (1, "completed", T0)


def test_a_delivery_lost_before_it_announced_its_start_is_recorded_from_the_gap_it_leaves() -> None:
    ex = execution()
    before = marks(ex)
    assert apply_result(ex, failed("api", 3, final=True))  # deliveries 1 and 2 died without a word
    api = ex.task("api")
    assert api is not None
    assert [(a.n, a.outcome) for a in api.attempts] == [(1, "lost"), (2, "lost"), (3, "failed")]
    assert api.attempts[0].error == api.attempts[1].error == LOST_UNANNOUNCED
    # Lost attempts get no started event; the one that reported does.
    assert [(e.kind, e.attempt) for e in lifecycle_events(before, ex) if e.task_id == "api"] == [
        ("started", 3), ("task_failed", 3)]
    # A lost one that reports late after all takes its own place.
    ex = execution()
    apply_result(ex, started("api", 2))
    assert apply_result(ex, failed("api", 1, final=False))
    api = ex.task("api")
    assert api is not None
    assert [(a.n, a.outcome) for a in api.attempts] == [(1, "failed"), (2, "running")]


def test_a_report_too_late_to_count_still_adds_its_cost_once_and_changes_nothing_else() -> None:
    # Its attempt was given up as lost when a later delivery of the task started (the worker was slow, not dead).
    ex = execution()
    apply_result(ex, started("api", 1))
    apply_result(ex, started("api", 2))
    before = marks(ex)
    assert apply_result(ex, completed("api", 1, cost=0.3))
    api = ex.task("api")
    assert api is not None and api.status == "running"
    assert [(a.n, a.outcome, a.cost_usd) for a in api.attempts] == [(1, "lost", 0.3), (2, "running", 0.0)]
    assert lifecycle_events(before, ex) == []
    assert not apply_result(ex, completed("api", 1, cost=0.3))  # a duplicate is not counted twice
    # Its execution was cancelled while the model answered: the call was made, so the cost stays in the record.
    ex = execution()
    apply_result(ex, started("db"))
    assert cancel(ex, "client cancelled")
    before = marks(ex)
    assert apply_result(ex, completed("db", cost=0.25))
    db = ex.task("db")
    assert db is not None and db.status == "cancelled" and db.output is None
    assert db.cost_usd == 0.25 and ex.cost.total_usd == 0.25 and ex.refund_usd == 0.25
    assert db.attempts[0].error == "abandoned: client cancelled; it reported later, at a cost of $0.2500"
    assert lifecycle_events(before, ex) == []
    assert not apply_result(ex, completed("db", cost=0.25))
    # Cancelled before its start was announced: the attempt is known from the late report alone.
    ex = execution()
    assert cancel(ex, "client cancelled")
    before = marks(ex)
    assert apply_result(ex, completed("api", cost=0.4))
    api = ex.task("api")
    assert api is not None and api.status == "cancelled"
    assert [(a.n, a.outcome, a.cost_usd) for a in api.attempts] == [(1, "lost", 0.4)]
    assert ex.cost.total_usd == 0.4 and lifecycle_events(before, ex) == []
    assert not apply_result(ex, completed("api", cost=0.4))
    # Its last delivery was dead-lettered (its heartbeats could not reach NATS for ack_wait), but the worker lived
    # and reports its paid call: the task stays failed, the call counts.
    ex = execution()
    apply_result(ex, started("api", 1))
    assert apply_result(ex, TaskFailed(execution_id="e1", task_id="api", pool="codegen", attempt=1,
                                       worker="dead-letter", started_at=T0, finished_at=T0, error="dead-lettered: …",
                                       error_kind="dead_letter", final=True))
    before = marks(ex)
    assert apply_result(ex, completed("api", cost=0.3))
    api = ex.task("api")
    assert api is not None and api.status == "failed" and api.output is None
    assert [(a.outcome, a.cost_usd) for a in api.attempts] == [("failed", 0.3)]
    assert ex.cost.total_usd == 0.3 and lifecycle_events(before, ex) == []
    assert not apply_result(ex, completed("api", cost=0.3))


def test_a_plan_too_late_to_run_still_records_the_calls_that_made_it() -> None:
    ex = execution()
    ex.tasks, ex.status = [], "cancelled"  # cancelled while the model was planning
    call = ModelCall(phase="decomposition", model="m", provider="anthropic", cost_usd=0.2)
    assert apply_plan(ex, [TaskSpec(id="x", pool="codegen", description="x")], "llm", [call])
    assert ex.status == "cancelled" and ex.tasks == [] and ex.cost.total_usd == 0.2
    assert ex.calls[-1].error == "unused: the execution was cancelled first"
    assert not apply_plan(ex, [TaskSpec(id="x", pool="codegen", description="x")], "rules")  # nothing to record


def test_a_plan_stored_once_already_records_its_call_once() -> None:
    # Its write was stored but the acknowledgement lost: the PM tries again on the version it reads back.
    ex = execution()
    ex.tasks, ex.status = [], "queued"
    call = ModelCall(phase="decomposition", model="m", provider="anthropic", cost_usd=0.2)
    plan = [TaskSpec(id="x", pool="codegen", description="x")]
    assert apply_plan(ex, plan, "llm", [call])
    assert not apply_plan(ex, plan, "llm", [call])
    assert [c.error for c in ex.calls] == [None] and ex.cost.total_usd == 0.2
    other = ModelCall(phase="decomposition", model="m", provider="anthropic", cost_usd=0.2)  # the same, billed again
    assert apply_plan(ex, plan, "llm", [other]) and ex.cost.total_usd == 0.4


async def test_the_tasks_a_write_releases_go_out_with_it_also_from_a_version_that_loses(
    nc: NATS, names: Names, tmp_path: Path,
) -> None:
    store = (await service_runtime(nc, names, tmp_path)).executions
    ex = execution()
    stale = (ex.model_copy(deep=True), await store.create(ex))
    await store.mutate("e1", lambda d: apply_result(d, started("api")))  # another writer moves it on
    sent: list[list[str]] = []

    async def send(d: Execution) -> None:
        sent.append([t.id for t in queued(d) if t.depends_on])

    def complete(d: Execution) -> bool:
        return apply_result(d, completed("api"))

    result = await store.mutate_from("e1", complete, stale, sends=lambda d: [send(d)])
    assert result is not None
    done, revision, written = result
    assert written is not None and done.task("api").attempts[0].worker == "w"  # type: ignore[union-attr]
    assert sent == [["ui"], ["ui"]]  # the lost version's own, then the stored one's (msg-ids make them one)
    stored = await store.get("e1")
    assert stored is not None and stored[1] == revision and stored[0].task("ui").status == "queued"  # type: ignore[union-attr]

    # A duplicate changes nothing and writes nothing, but sends again: the first delivery may have died
    # between its write and its sends.
    again = await store.mutate_from("e1", complete, stored, sends=lambda d: [send(d)])
    assert again is not None and again[2] is None and again[1] == revision
    assert sent == [["ui"], ["ui"], ["ui"]]


def test_the_cost_event_of_a_task_named_like_a_phase_is_not_taken_for_that_phases_call() -> None:
    # Events are deduplicated by msg-id: two calls sharing one would leave one of them out of the stream.
    task = {"execution_id": "e", "model": "m", "provider": "p", "cost_usd": 1.0, "pool": "codegen", "attempt": 1}
    phases = {CostIncurred(execution_id="e", phase=phase, attempt=1, model="m", provider="p", cost_usd=2.0).msg_id()
              for phase in ("decomposition", "synthesis")}
    tasks = {CostIncurred(**task, phase="task", task_id=tid).msg_id() for tid in ("decomposition", "synthesis")}
    assert len(phases | tasks) == 4


async def test_a_request_dead_lettered_after_its_plan_ends_what_is_open_and_still_counts_a_late_attempts_cost(
    nc: NATS, names: Names, tmp_path: Path,
) -> None:
    # The PM stored the plan and sent a task, then failed on every delivery (a TASKS stream without quorum). The
    # execution was failed with that task's attempt left running, and its paid report, coming later, was dropped.
    rt = await service_runtime(nc, names, tmp_path)
    h = AggregatorHandlers(rt, SimulatedProvider(rt.settings.pe))
    req = ExecutionRequested(execution_id="deadreq", message="m", requested_at=T0,
                             deadline_at=T0 + timedelta(hours=1))
    ex = new_execution(req)
    apply_plan(ex, [TaskSpec(id="api", pool="codegen", description="api"),
                    TaskSpec(id="db", pool="database", description="db")], "client")
    apply_result(ex, TaskStarted(execution_id=ex.execution_id, task_id="api", pool="codegen", attempt=1, worker="w",
                                 started_at=T0))
    await rt.executions.create(ex)
    ack = await rt.jetstream.publish(names.execution_requested, req.to_bytes())
    adv = {"type": "io.nats.jetstream.advisory.v1.max_deliver", "stream": names.executions_stream,
           "consumer": names.pm_consumer, "stream_seq": ack.seq, "deliveries": 5}
    subject = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{names.executions_stream}.{names.pm_consumer}"
    await h.on_advisory(ConsumerAdvisory.model_validate(adv),
                        await delivered(rt, subject, json.dumps(adv).encode(), names.advisories_stream))
    stored = (await rt.executions.get(ex.execution_id))[0]  # type: ignore[index]
    assert stored.status == "failed" and stored.final_response  # answered, from what was done (nothing here)
    assert {t.id: t.status for t in stored.tasks} == {"api": "failed", "db": "failed"}
    assert stored.tasks[0].attempts[0].outcome == "lost"
    assert "its request was given up after it was planned" in (stored.tasks[0].error or "")

    late = TaskCompleted(execution_id=ex.execution_id, task_id="api", pool="codegen", attempt=1, worker="w",
                         started_at=T0, finished_at=now(), model="claude-sonnet-4-6", provider="anthropic",
                         usage=Usage(input_tokens=50_000, output_tokens=10_000), cost_usd=0.30,
                         output=TaskOutput(summary="api done"))
    await h.on_result(late, await delivered(rt, names.results(ex.execution_id), late.to_bytes(), names.results_stream))
    stored = (await rt.executions.get(ex.execution_id))[0]  # type: ignore[index]
    assert stored.cost.total_usd == 0.30 and stored.tasks[0].status == "failed"


async def test_a_message_deleted_while_pending_is_no_dead_letter(nc: NATS, names: Names, tmp_path: Path) -> None:
    # After a crash a restarted server may advise "terminated" for a pending message it deleted (its acknowledgement
    # had not been stored): nothing to keep, no consumer gave up on it, and no alert should fire.
    rt = await service_runtime(nc, names, tmp_path)
    h = AggregatorHandlers(rt, SimulatedProvider(rt.settings.pe))
    adv = {"type": "io.nats.jetstream.advisory.v1.terminated", "stream": names.tasks_stream,
           "consumer": names.pool_consumer("security"), "stream_seq": 48, "deliveries": 1,
           "reason": ConsumerAdvisory.DELETED}
    subject = f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{names.tasks_stream}.{names.pool_consumer('security')}"
    counted = metrics.DEAD_LETTERS.labels(names.tasks_stream, names.pool_consumer("security"))._value.get()
    await h.on_advisory(ConsumerAdvisory.model_validate(adv),
                        await delivered(rt, subject, json.dumps(adv).encode(), names.advisories_stream))
    letters = await rt.jetstream.stream_info(names.dlq_stream)
    assert letters.state.messages == 0
    assert metrics.DEAD_LETTERS.labels(names.tasks_stream, names.pool_consumer("security"))._value.get() == counted

    # Terminated by its consumer for a reason of its own, it is one.
    adv["reason"] = "payload does not validate"
    await h.on_advisory(ConsumerAdvisory.model_validate(adv),
                        await delivered(rt, subject, json.dumps(adv).encode(), names.advisories_stream))
    assert (await rt.jetstream.stream_info(names.dlq_stream)).state.messages == 1


def test_a_cancel_stored_with_the_last_result_leaves_the_execution_to_finish_as_its_tasks_did() -> None:
    # The cancel and the result that ended the last open task came in one write: nothing was left to cancel, yet
    # the execution ended completed with "cancelled by the client" as its error.
    ex = execution()
    for task in ("api", "db", "ui", "e2e"):
        assert apply_result(ex, completed(task))
    assert all_tasks_terminal(ex) and not ex.terminal
    assert cancel(ex, "cancelled by the client")  # still to be finished, by the write it rides on
    assert ex.error is None and outcome(ex) == "completed"
    assert [t.status for t in ex.tasks] == ["completed"] * 4
