"""Synthesis: the persona's answer from the model (or the template), priced once even when replicas race."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.aggregator.aggregate import aggregate
from services.aggregator.handlers import SUPERSEDED, AggregatorHandlers
from services.aggregator.synthesis import cost_line, write_answer
from shared.config import ParallelExecutionConfig
from shared.costs import CUT_BY_STOP, model_call
from shared.execution import apply_plan, apply_result, cancel, expire, new_execution
from shared.names import Names
from shared.providers import AnthropicProvider, SimulatedProvider
from shared.schemas import (
    CancelExecution,
    CostIncurred,
    Execution,
    ExecutionDeadline,
    ExecutionRequested,
    TaskCompleted,
    TaskFailed,
    TaskOutput,
    TaskSpec,
    TaskStarted,
    Usage,
    now,
)
from shared.service import Runtime
from tests.conftest import Watched, answered_past_ack_wait, delivered, service_runtime, stopped, stream_holds, until
from tests.fake_anthropic import FakeAnthropic

KEY = "sk-ant-test"
SYNTHESIS_ON_SONNET = (3300 * 3 + 610 * 15 + 800 * 0.3) / 1e6  # the fake's synthesis usage × claude-sonnet-4-6
PLAN_ON_OPUS = (1850 * 5 + 2600 * 25 + 1320 * 6.25) / 1e6
TASK_COST = 0.021975
PERSONA = {"name": "Ada", "signature": "— Ada, delivery lead", "tone": "brisk and precise", "emoji": False}
T0 = now()


def config(fake: FakeAnthropic, **extra: Any) -> dict[str, Any]:
    return {"provider": "anthropic", "anthropic": {"base_url": fake.url, "timeout_s": 5},
            "pm_coordinator": PERSONA, **extra}


def result(eid: str, task: str, pool: Any, kind: str = "completed") -> TaskStarted | TaskCompleted:
    base = {"execution_id": eid, "task_id": task, "pool": pool, "attempt": 1, "worker": "w", "started_at": T0}
    if kind == "started":
        return TaskStarted(**base)
    return TaskCompleted(**base, finished_at=T0 + timedelta(seconds=2), model="claude-sonnet-4-6",
                         provider="anthropic", cost_usd=TASK_COST,
                         usage=Usage(input_tokens=2100, output_tokens=940, cache_read_tokens=1500,
                                     cache_write_tokens=300),
                         output=TaskOutput(summary=f"{task} done"))


def execution(pe: ParallelExecutionConfig, eid: str = "e1", last_done: bool = True) -> Execution:
    """Two tasks planned by the model (its call recorded); the second still running unless ``last_done``."""
    ex = new_execution(ExecutionRequested(execution_id=eid, message="Build a shop", requested_at=T0,
                                          deadline_at=T0 + timedelta(hours=1)))
    plan_usage = Usage(input_tokens=1850, output_tokens=2600, cache_write_tokens=1320)
    apply_plan(ex, [TaskSpec(id="api", pool="codegen", description="API"),
                    TaskSpec(id="audit", pool="security", description="audit")], "llm",
               [model_call(pe, "decomposition", "claude-opus-4-6", "anthropic", plan_usage)])
    for r in (result(eid, "api", "codegen", "started"), result(eid, "api", "codegen"),
              result(eid, "audit", "security", "started")):
        apply_result(ex, r)
    if last_done:
        apply_result(ex, result(eid, "audit", "security"))
    return ex


async def anthropic_runtime(nc: NATS, names: Names, tmp_path: Path, fake: FakeAnthropic,
                            monkeypatch: pytest.MonkeyPatch) -> Runtime:
    """An aggregator's runtime on the anthropic provider, pointed at ``fake``."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return await service_runtime(nc, names, tmp_path, config(fake))


@contextlib.asynccontextmanager
async def replicas(rt: Runtime) -> AsyncIterator[tuple[AggregatorHandlers, AggregatorHandlers]]:
    """Two aggregator replicas on the anthropic provider (each its own client), closed on the way out."""
    providers = [AnthropicProvider(rt.settings.pe, KEY) for _ in range(2)]
    try:
        yield AggregatorHandlers(rt, providers[0]), AggregatorHandlers(rt, providers[1])
    finally:
        for p in providers:
            await p.aclose()


async def test_the_model_writes_in_the_persona_and_the_exact_cost_line_and_signature_follow(
    fake_anthropic: FakeAnthropic,
) -> None:
    pe = ParallelExecutionConfig.model_validate(config(fake_anthropic))
    ex = execution(pe)
    provider = AnthropicProvider(pe, KEY)
    try:
        text, call = await write_answer(ex, aggregate(ex), "completed", pe, provider)
    finally:
        await provider.aclose()

    [body] = fake_anthropic.of("synthesis")
    assert body["model"] == "claude-sonnet-4-6"
    [system] = body["system"]
    assert system["cache_control"] == {"type": "ephemeral"}
    assert "You are Ada" in system["text"] and "Tone: brisk and precise." in system["text"]
    assert "Do not use emoji." in system["text"]
    assert '"summary": "api done"' in body["messages"][0]["content"]

    assert call is not None and call.phase == "synthesis" and call.error is None
    assert call.cost_usd == pytest.approx(SYNTHESIS_ON_SONNET, abs=1e-12)
    total = PLAN_ON_OPUS + 2 * TASK_COST + SYNTHESIS_ON_SONNET
    answer, cost, signature = text.split("\n\n")
    assert answer == f"{fake_anthropic.synthesis_text} (answer #1)"
    # $0.14574 in all: planning $0.0825, agents $0.04395 ($0.021975 each), this summary $0.01929; the parts add up
    # to the whole as shown (the largest remainders, the summary's and then codegen's, round up).
    assert total == pytest.approx(0.14574)
    assert cost == ("Cost: $0.1457 — planning $0.0825; agents $0.0439 (codegen $0.0220, security $0.0219); "
                    "this summary $0.0193.")
    assert signature == "— Ada, delivery lead"


def test_the_figures_of_the_cost_line_add_up() -> None:
    # Three pools at $0.00735 each, on their own each $0.0074 or $0.0073 to four places: the line states the whole
    # and parts that make it, with the largest remainders rounded up.
    pe = ParallelExecutionConfig()
    ex = new_execution(ExecutionRequested(execution_id="e1", message="Build a shop", requested_at=T0,
                                          deadline_at=T0 + timedelta(hours=1)))
    pools = {"schema": "database", "api": "codegen", "audit": "security"}
    apply_plan(ex, [TaskSpec(id=t, pool=p, description=t) for t, p in pools.items()], "llm",  # type: ignore[arg-type]
               [model_call(pe, "decomposition", "claude-opus-4-6", "anthropic",
                           Usage(input_tokens=1850, output_tokens=2600, cache_write_tokens=1320))])
    usage = Usage(input_tokens=2100, output_tokens=1050)
    for t, p in pools.items():
        apply_result(ex, TaskCompleted(execution_id="e1", task_id=t, pool=p, attempt=1,  # type: ignore[arg-type]
                                       worker="w", started_at=T0, finished_at=T0, model="claude-haiku-4-5",
                                       provider="anthropic", usage=usage, output=TaskOutput(summary=t),
                                       cost_usd=pe.price("claude-haiku-4-5").usd(2100, 1050)))
    ex.calls.append(model_call(pe, "synthesis", "claude-sonnet-4-6", "anthropic",
                               Usage(input_tokens=3300, output_tokens=610, cache_read_tokens=800)))
    assert ex.cost.by_pool["codegen"] == pytest.approx(0.00735)
    line = cost_line(ex)
    total, planning, agents, *by_pool, summary = [round(float(x) * 1e4) for x in re.findall(r"\$(\d+\.\d+)", line)]
    assert total == round(ex.cost.total_usd * 1e4)  # the whole as it is, to the hundredth of a cent
    assert sum(by_pool) == agents and planning + agents + summary == total, line
    assert sorted(by_pool) == [73, 73, 74]  # each part within its rounding of the exact figure
    # One task at $0.00735, half a unit: the line states it as the refund line and the CLI do ($0.0073 by :.4f).
    one = ex.model_copy(deep=True)
    one.calls, one.tasks = [], one.tasks[1:2]
    assert one.cost.total_usd == pytest.approx(0.00735)
    expected = f"${one.cost.total_usd:.4f}"
    assert cost_line(one) == f"Cost: {expected} — agents {expected} (codegen {expected})."


async def test_the_refund_due_follows_the_models_answer_as_it_follows_the_templates(
    fake_anthropic: FakeAnthropic,
) -> None:
    pe = ParallelExecutionConfig.model_validate(config(fake_anthropic))
    ex = execution(pe, last_done=False)
    apply_result(ex, TaskFailed(execution_id="e1", task_id="audit", pool="security", attempt=1, worker="w",
                                started_at=T0, finished_at=T0 + timedelta(seconds=1), error="cut off",
                                error_kind="truncated", final=True, model="claude-sonnet-4-6", provider="anthropic",
                                usage=Usage(input_tokens=1000, output_tokens=1000), cost_usd=0.018))
    refund = "Refund due: $0.0180 for work that failed, was skipped or was cancelled."
    provider = AnthropicProvider(pe, KEY)
    try:
        text, call = await write_answer(ex, aggregate(ex), "partial", pe, provider)
    finally:
        await provider.aclose()
    assert call is not None and call.error is None
    answer, money, signature = text.split("\n\n")
    assert money.splitlines()[1] == refund and signature == "— Ada, delivery lead"
    template, _ = await write_answer(ex, aggregate(ex), "partial", pe, SimulatedProvider(pe))
    assert refund in template.splitlines()


async def test_an_execution_that_ended_with_nothing_done_is_answered_without_a_model_call(
    fake_anthropic: FakeAnthropic,
) -> None:
    pe = ParallelExecutionConfig.model_validate(config(fake_anthropic))
    ex = new_execution(ExecutionRequested(execution_id="none", message="Build a shop", requested_at=T0,
                                          deadline_at=T0 + timedelta(hours=1)))
    apply_plan(ex, [TaskSpec(id="api", pool="codegen", description="API")], "client")
    apply_result(ex, result("none", "api", "codegen", "started"))
    assert cancel(ex, "client cancelled")
    provider = AnthropicProvider(pe, KEY)
    try:
        text, call = await write_answer(ex, aggregate(ex), "cancelled", pe, provider)
    finally:
        await provider.aclose()
    assert fake_anthropic.of("synthesis") == [] and call is None  # nothing to summarise: nothing paid for it
    assert text.startswith("Hi! Ada here. This execution was cancelled.") and "api: cancelled" in text


async def test_a_failed_synthesis_call_falls_back_to_the_template_and_is_recorded(
    fake_anthropic: FakeAnthropic,
) -> None:
    pe = ParallelExecutionConfig.model_validate(config(fake_anthropic))
    ex = execution(pe)
    provider = AnthropicProvider(pe, KEY)
    fake_anthropic.next("synthesis", "529", "no_tool")
    try:
        text, call = await write_answer(ex, aggregate(ex), "completed", pe, provider)
        text2, call2 = await write_answer(ex, aggregate(ex), "completed", pe, provider)
    finally:
        await provider.aclose()
    assert text.startswith("Hi! Ada here. All done!") and text.endswith("— Ada, delivery lead")  # no emoji
    assert call is not None and call.error is not None and call.error.startswith("overloaded") and call.cost_usd == 0
    # An empty answer was still billed: the template's cost line includes it.
    assert call2 is not None and call2.error is not None and call2.error.startswith("invalid_output")
    assert call2.cost_usd == pytest.approx(SYNTHESIS_ON_SONNET, abs=1e-12)
    assert f"this summary ${SYNTHESIS_ON_SONNET:.4f}" in text2


async def test_the_simulated_provider_keeps_the_deterministic_template() -> None:
    pe = ParallelExecutionConfig()
    ex = execution(pe)
    text, call = await write_answer(ex, aggregate(ex), "completed", pe, SimulatedProvider(pe))
    assert call is None
    again, _ = await write_answer(ex, aggregate(ex), "completed", pe, SimulatedProvider(pe))
    assert text == again and text.startswith("Hi! Pixel here. ✅ All done!")


async def test_an_answer_cut_off_by_a_stop_is_paid_and_recorded_and_the_redelivery_writes_it_again(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await anthropic_runtime(nc, names, tmp_path, fake_anthropic, monkeypatch)
    await rt.executions.create(execution(rt.settings.pe, "stop", last_done=False))
    last = result("stop", "audit", "security")
    fake_anthropic.next("synthesis", "stall")  # the model starts (its input billed), writes a little, then nothing
    provider = Watched(rt.pe, KEY)
    try:
        msg = await delivered(rt, names.results("stop"), last.to_bytes(), names.results_stream)
        writing = asyncio.create_task(AggregatorHandlers(rt, provider).on_result(last, msg))
        await until(provider.started, 10, "the model to start the answer")
        await stopped(writing)  # the aggregator stopped, its grace run out: the result goes back
        stored = await rt.executions.get("stop")
        assert stored is not None and not stored[0].terminal  # the result's write waited for the answer
        [cut] = [c for c in stored[0].calls if c.phase == "synthesis"]
        assert cut.error == CUT_BY_STOP and cut.usage.input_tokens == 3300 and cut.usage.estimated
        assert cut.cost_usd > (3300 * 3 + 800 * 0.3) / 1e6  # the input, and the output it had written so far
        fake_anthropic.release.set()
        # The restarted aggregator takes the result again and writes the answer: a second call, and both are paid.
        await AggregatorHandlers(rt, provider).on_result(last, await delivered(
            rt, names.results("stop"), last.to_bytes(), names.results_stream))
    finally:
        await provider.aclose()

    stored = await rt.executions.get("stop")
    assert stored is not None
    done = stored[0]
    assert done.status == "completed" and len(fake_anthropic.of("synthesis")) == 2
    assert [c.error for c in done.calls if c.phase == "synthesis"] == [CUT_BY_STOP, None]
    assert done.cost.by_phase["synthesis"] == pytest.approx(cut.cost_usd + SYNTHESIS_ON_SONNET, abs=1e-12)
    assert cost_line(done) in (done.final_response or "")  # the answer's cost line counts both
    # Their events went out with the final one (the plan's call was stored without one here): one each.
    await stream_holds(rt.jetstream, names.events_stream, names.cost_event("stop"), {names.cost_event("stop"): 2})


async def answered_while(rt: Runtime, fake: FakeAnthropic, last: TaskCompleted,
                         meanwhile: Callable[[], Awaitable[object]]) -> Execution:
    """``last`` reaches an aggregator replica, whose model is asked for the answer and holds it until ``meanwhile``
    (another write) has run; the execution as stored then."""
    eid, names = last.execution_id, rt.names
    fake.next("synthesis", "slow")  # the answer comes when released
    async with replicas(rt) as (a, _):
        msg = await delivered(rt, names.results(eid), last.to_bytes(), names.results_stream)
        writing = asyncio.create_task(a.on_result(last, msg))
        await until(lambda: len(fake.of("synthesis")) == 1, 10, "the model to be asked for the answer")
        await meanwhile()
        fake.release.set()
        await writing
    stored = await rt.executions.get(eid)
    assert stored is not None
    return stored[0]


async def test_a_call_recorded_while_the_answer_is_written_changes_its_cost_line_not_its_text(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another replica records a call its stop cut off (or a late report its cost) while this one's model writes the
    # answer: the answer's write loses its compare-and-set. The version read again differs in its cost alone, and the
    # answer was written again: a second synthesis call, paid for a cost line.
    rt = await anthropic_runtime(nc, names, tmp_path, fake_anthropic, monkeypatch)
    eid = "costonly"
    await rt.executions.create(execution(rt.settings.pe, eid, last_done=False))
    last = result(eid, "audit", "security")
    cut = model_call(rt.settings.pe, "decomposition", "claude-opus-4-6", "anthropic", Usage(input_tokens=1850),
                     CUT_BY_STOP)
    done = await answered_while(rt, fake_anthropic, last, lambda: rt.record_call(eid, cut))
    assert done.status == "completed" and len(fake_anthropic.of("synthesis")) == 1
    assert [c.error for c in done.calls] == [None, CUT_BY_STOP, None]  # the plan's, the cut one, the answer's
    assert done.final_response is not None and done.final_response.startswith(fake_anthropic.synthesis_text)
    assert cost_line(done) in done.final_response  # the stored version's cost, the recorded call included


async def test_an_answer_is_written_again_when_another_run_of_a_task_completed_it_meanwhile(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The audit's message came twice (runs 4 and 9). Run 9's report ends the execution here, and its answer is being
    # written when another write stores run 4's completion. The tasks' statuses and attempts are the same, but the
    # output the answer sums up is run 4's now: the answer is written again from it, not kept.
    rt = await anthropic_runtime(nc, names, tmp_path, fake_anthropic, monkeypatch)
    eid = "tworuns"
    ex = execution(rt.settings.pe, eid, last_done=False)
    audit = ex.task("audit")
    assert audit is not None
    audit.attempts[0].run = 4
    assert apply_result(ex, result(eid, "audit", "security", "started").model_copy(update={"run": 9}))
    await rt.executions.create(ex)
    mine = result(eid, "audit", "security").model_copy(update={"run": 9, "output": TaskOutput(summary="run 9 says")})
    other = result(eid, "audit", "security").model_copy(update={"run": 4, "output": TaskOutput(summary="run 4 says")})
    done = await answered_while(rt, fake_anthropic, mine,
                                lambda: rt.executions.mutate(eid, lambda e: apply_result(e, other)))
    first, second = (body["messages"][0]["content"] for body in fake_anthropic.of("synthesis"))
    assert "run 9 says" in first and "run 4 says" in second
    assert done.task("audit").output.summary == "run 4 says"  # type: ignore[union-attr]
    assert done.aggregated == aggregate(done, rt.settings.pe.result_aggregation.conflict_resolution)
    assert [c.error for c in done.calls if c.phase == "synthesis"] == [SUPERSEDED, None]  # both paid, both counted


async def test_two_replicas_finishing_at_once_store_one_answer_and_count_its_cost_once(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await anthropic_runtime(nc, names, tmp_path, fake_anthropic, monkeypatch)
    settings = rt.settings
    ex = execution(settings.pe, "race1", last_done=False)
    await rt.executions.create(ex)

    # The last result reaches two replicas (a redelivery while the first is still at work).
    last = result("race1", "audit", "security")
    await rt.jetstream.publish(names.results("race1"), last.to_bytes())
    msgs = []
    for durable in ("replica1", "replica2"):
        sub = await rt.jetstream.pull_subscribe(names.results("race1"), durable=durable, stream=names.results_stream)
        msgs += await sub.fetch(1, timeout=5)
    fake_anthropic.hold("synthesis", 2)  # neither answer comes back before both replicas have asked
    async with replicas(rt) as handlers:
        await asyncio.gather(*(h.on_result(last, m) for h, m in zip(handlers, msgs, strict=True)))

    assert len(fake_anthropic.of("synthesis")) == 2  # both paid for an answer ...
    stored = await rt.executions.get("race1")
    assert stored is not None
    done = stored[0]
    assert done.status == "completed"
    # ... one answer is kept; both calls are counted, the other's as superseded
    kept, lost = [c for c in done.calls if c.phase == "synthesis"]
    assert (kept.error, lost.error) == (None, SUPERSEDED)
    assert done.final_response is not None
    assert done.final_response.startswith(fake_anthropic.synthesis_text)
    assert done.cost.by_phase == pytest.approx(
        {"tasks": 2 * TASK_COST, "decomposition": PLAN_ON_OPUS, "synthesis": 2 * SYNTHESIS_ON_SONNET}, abs=1e-12)
    assert done.cost.total_usd == pytest.approx(2 * TASK_COST + PLAN_ON_OPUS + 2 * SYNTHESIS_ON_SONNET, abs=1e-8)

    # One of each although both replicas applied the last result (msg-ids made the repeats no-ops); a cost event
    # for each synthesis call.
    await stream_holds(rt.jetstream, names.events_stream, names.events("race1", "*"), {
        names.completed_event("race1"): 1, names.cost_event("race1"): 2, names.events("race1", "task_completed"): 1})
    sub = await rt.jetstream.pull_subscribe(names.cost_event("race1"), durable="costs", stream=names.events_stream)
    events = [CostIncurred.model_validate_json(e.data) for e in await sub.fetch(2, timeout=5)]
    assert [(e.phase, e.attempt, e.cost_usd) for e in events] == [
        ("synthesis", 1, kept.cost_usd), ("synthesis", 2, lost.cost_usd)]


async def test_a_slow_answer_keeps_the_result_it_waits_on_from_being_redelivered(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The model writes for longer than ack_wait: the heartbeat keeps the broker from handing the last result to
    # another replica meanwhile (which would pay for a second answer).
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    cfg = config(fake_anthropic, ack_wait_s=1)
    cfg["anthropic"]["timeout_s"] = 20
    rt = await service_runtime(nc, names, tmp_path, cfg)
    await rt.executions.create(execution(rt.pe, "slow1", last_done=False))
    last = result("slow1", "audit", "security")
    provider = AnthropicProvider(rt.pe, KEY)
    aggregator = AggregatorHandlers(rt, provider)
    try:
        await answered_past_ack_wait(rt, names.results("slow1"), last.to_bytes(), names.results_stream,
                                     fake_anthropic, "synthesis", lambda msg: aggregator.on_result(last, msg))
    finally:
        await provider.aclose()
    stored = await rt.executions.get("slow1")
    assert stored is not None and stored[0].status == "completed"


async def a_stale_b_moved_on(rt: Runtime, eid: str, a: AggregatorHandlers, b: AggregatorHandlers,
                             done: bool = False) -> None:
    """Two tasks running; replica A keeps the version it read, then replica B stores the first one completed.
    ``done``: a third task had completed before (so that every version has an output to answer on)."""
    ex = new_execution(ExecutionRequested(execution_id=eid, message="Build a shop", requested_at=T0,
                                          deadline_at=T0 + timedelta(hours=1)))
    specs = [TaskSpec(id="api", pool="codegen", description="API"),
             TaskSpec(id="audit", pool="security", description="audit")]
    apply_plan(ex, specs + ([TaskSpec(id="docs", pool="codegen", description="docs")] if done else []), "rules", [])
    for r in (result(eid, "api", "codegen", "started"), result(eid, "audit", "security", "started")):
        apply_result(ex, r)
    if done:
        apply_result(ex, result(eid, "docs", "codegen"))
    await rt.executions.create(ex)
    names = rt.names
    again = result(eid, "api", "codegen", "started")  # changes nothing: A keeps the version it read
    await a.on_result(again, await delivered(rt, names.results(eid), again.to_bytes(), names.results_stream))
    done = result(eid, "api", "codegen")
    await b.on_result(done, await delivered(rt, names.results(eid), done.to_bytes(), names.results_stream))


@pytest.mark.parametrize("start", ["deadline check", "stale version"])
async def test_an_answer_computed_on_a_version_another_replica_moved_past_is_not_stored(
    nc: NATS, names: Names, tmp_path: Path, start: str,
) -> None:
    rt = await service_runtime(nc, names, tmp_path)
    eid = "moved" + start[:5]
    a = AggregatorHandlers(rt, SimulatedProvider(rt.settings.pe))
    await a_stale_b_moved_on(rt, eid, a, AggregatorHandlers(rt, SimulatedProvider(rt.settings.pe)))

    check = ExecutionDeadline(execution_id=eid, deadline_at=T0)
    msg = await delivered(rt, names.execution_deadline, check.to_bytes(), names.executions_stream)
    if start == "deadline check":  # reads afresh before ending every open task
        await a.on_deadline(check, msg)
    else:  # from the version A last saw: the answer computed on it loses the compare-and-set
        await a._apply(eid, lambda ex: expire(ex, "execution deadline exceeded"), msg)

    stored = await rt.executions.get(eid)
    assert stored is not None
    final = stored[0]
    assert [t.status for t in final.tasks] == ["completed", "failed"]
    assert final.status == "partial"
    assert final.aggregated is not None and [o.task_id for o in final.aggregated.outputs["codegen"]] == ["api"]
    assert final.final_response is not None and "1 of 2" in final.aggregated.summary


@pytest.mark.parametrize("announced", [True, False])
async def test_a_redelivery_announces_an_execution_finished_long_ago_only_if_its_final_event_is_missing(
    nc: NATS, names: Names, tmp_path: Path, announced: bool,
) -> None:
    # An hour on, a repeat of the final event is past the events stream's duplicate window: it would be stored.
    rt = await service_runtime(nc, names, tmp_path)
    eid = f"old{announced}"
    ex = execution(rt.settings.pe, eid)
    ex.status, ex.finished_at = "completed", now() - timedelta(hours=1)
    await rt.executions.create(ex)
    if announced:
        await rt.announce_completed(ex)
    published: list[str] = []

    async def seen(msg: Msg) -> None:
        published.append(msg.subject)

    await nc.subscribe(names.events(eid, "*"), cb=seen)  # core: sees a publish even if the stream drops it
    check = ExecutionDeadline(execution_id=eid, deadline_at=T0)
    msg = await delivered(rt, names.execution_deadline, check.to_bytes(), names.executions_stream, times=2)
    assert msg.metadata.num_delivered == 2
    await AggregatorHandlers(rt, SimulatedProvider(rt.settings.pe)).on_deadline(check, msg)
    await nc.flush()
    assert published == ([] if announced else [names.completed_event(eid)])


async def both_answers_counted(rt: Runtime, eid: str, status: str) -> list[str | None]:
    """The execution ended ``status`` with two synthesis calls in its cost, each with its cost event; returns the
    calls' errors, in the document's order."""
    stored = await rt.executions.get(eid)
    assert stored is not None
    final = stored[0]
    assert final.status == status
    assert final.cost.by_phase["synthesis"] == pytest.approx(2 * SYNTHESIS_ON_SONNET, abs=1e-12)
    names = rt.names
    await stream_holds(rt.jetstream, names.events_stream, names.cost_event(eid), {names.cost_event(eid): 2})
    return [c.error for c in final.calls if c.phase == "synthesis"]


async def test_the_model_call_behind_an_answer_that_lost_its_write_is_still_counted(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await anthropic_runtime(nc, names, tmp_path, fake_anthropic, monkeypatch)
    eid = "superseded"
    async with replicas(rt) as (a, b):
        await a_stale_b_moved_on(rt, eid, a, b, done=True)
        msg = await delivered(rt, names.execution_deadline, b"{}", names.executions_stream)
        await a._apply(eid, lambda ex: expire(ex, "execution deadline exceeded"), msg)  # from A's stale version

    assert len(fake_anthropic.of("synthesis")) == 2  # one answer per version: the stale one's lost its write
    assert await both_answers_counted(rt, eid, "partial") == [SUPERSEDED, None]
    stored = await rt.executions.get(eid)
    assert stored is not None
    final = stored[0]
    # Both calls were made before the answer stored was written: its cost line counts them both.
    line = re.search(r"Cost: \$([0-9.]+)", final.final_response or "")
    assert line is not None and line.group(1) == f"{final.cost.total_usd:.4f}", final.final_response


async def a_answers_after_b_cancelled(rt: Runtime, eid: str, cancelled: Callable[[], None] = lambda: None) -> None:
    """Replica A reads the execution (its audit still running), replica B cancels it (then ``cancelled`` runs), then
    the audit's result reaches A, whose version says it ends the execution: A pays for an answer to a version B has
    ended."""
    names = rt.names
    async with replicas(rt) as (a, b):
        again = result(eid, "audit", "security", "started")  # changes nothing: A keeps the version it read
        await a.on_result(again, await delivered(rt, names.results(eid), again.to_bytes(), names.results_stream))
        stop = CancelExecution(execution_id=eid)
        await b.on_cancel(stop, await delivered(rt, names.execution_cancel, stop.to_bytes(), names.executions_stream))
        cancelled()
        last = result(eid, "audit", "security")
        await a.on_result(last, await delivered(rt, names.results(eid), last.to_bytes(), names.results_stream))


async def test_the_replica_whose_answer_came_too_late_sends_the_cost_event_of_its_own_call_only(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It sent the other replica's too: a repeat the events stream drops within its duplicate window (600 s), and
    # stores as a second event after it, for anyone adding them up.
    from services.aggregator import handlers

    rt = await anthropic_runtime(nc, names, tmp_path, fake_anthropic, monkeypatch)
    eid = "latecall"
    await rt.executions.create(execution(rt.settings.pe, eid, last_done=False))
    sent: list[CostIncurred] = []
    publish_cost = handlers.publish_cost

    async def spied(nc: NATS, names: Names, event: CostIncurred) -> None:
        sent.append(event)
        await publish_cost(nc, names, event)

    monkeypatch.setattr(handlers, "publish_cost", spied)

    def b_announced() -> None:
        assert [(e.phase, e.attempt) for e in sent] == [("synthesis", 1)]  # B's answer, with its announcement
        sent.clear()

    await a_answers_after_b_cancelled(rt, eid, b_announced)
    assert [(e.phase, e.attempt) for e in sent] == [("synthesis", 2)]  # A's call, recorded after B's


async def test_the_model_call_behind_an_answer_to_an_execution_another_replica_ended_is_still_counted(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Replica A last stored "api done, audit running"; replica B then cancels the execution. The audit's result
    # reaches A, whose version says it ends the execution: A pays for an answer, and its write loses to a
    # version that has already ended.
    rt = await anthropic_runtime(nc, names, tmp_path, fake_anthropic, monkeypatch)
    eid = "endedelsewhere"
    ex = execution(rt.settings.pe, eid, last_done=False)
    api = ex.task("api")
    assert api is not None and api.status == "completed"
    await rt.executions.create(ex)
    await a_answers_after_b_cancelled(rt, eid)

    assert len(fake_anthropic.of("synthesis")) == 2  # B's answer to the cancel, and A's that lost its write
    assert sorted(e or "" for e in await both_answers_counted(rt, eid, "cancelled")) == ["", SUPERSEDED]


async def test_an_answer_whose_write_was_stored_but_not_acknowledged_counts_its_call_once(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The final write reaches the store, but its acknowledgement is lost on the way back (here the client raises
    # the timeout it would raise): the try after it reads the finished version, which already has the answer's call.
    rt = await anthropic_runtime(nc, names, tmp_path, fake_anthropic, monkeypatch)
    eid = "unacked"
    await rt.executions.create(execution(rt.settings.pe, eid, last_done=False))
    lost = stored_then_lost(rt, monkeypatch, when=lambda value: b'"final_response":null' not in value)
    last = result(eid, "audit", "security")
    async with replicas(rt) as (a, _):
        await a.on_result(last, await delivered(rt, names.results(eid), last.to_bytes(), names.results_stream))
    assert lost and len(fake_anthropic.of("synthesis")) == 1
    stored = await rt.executions.get(eid)
    assert stored is not None and stored[1] == lost[0]  # nothing written after the lost acknowledgement
    done = stored[0]
    assert done.status == "completed" and [c.error for c in done.calls if c.phase == "synthesis"] == [None]
    assert done.cost.by_phase["synthesis"] == pytest.approx(SYNTHESIS_ON_SONNET, abs=1e-12)
    # What that write was to announce went out all the same: the task's ending, the answer's cost, the final event.
    await stream_holds(rt.jetstream, names.events_stream, names.events(eid, "*"), {
        names.events(eid, "task_completed"): 1, names.cost_event(eid): 1, names.completed_event(eid): 1})


def stored_then_lost(rt: Runtime, monkeypatch: pytest.MonkeyPatch, when: Any = lambda value: True,
                     meanwhile: Any = None) -> list[int]:
    """The execution bucket's first write for which ``when(value)`` holds is stored, but its acknowledgement is lost
    (the client raises the timeout it would raise), after ``meanwhile()`` (another writer) has run; the revisions of
    the writes lost so."""
    kv, lost = rt.executions.kv, []
    update = kv.update

    async def stored_then_timed_out(key: str, value: bytes, last: int | None = None) -> int:
        revision = await update(key, value, last=last)
        if not lost and when(value):
            lost.append(revision)
            if meanwhile is not None:
                await meanwhile()
            raise nats.errors.TimeoutError
        return revision

    monkeypatch.setattr(kv, "update", stored_then_timed_out)
    return lost


def two_running(eid: str, audit_after_api: bool = False) -> Execution:
    ex = new_execution(ExecutionRequested(execution_id=eid, message="m", requested_at=T0,
                                          deadline_at=T0 + timedelta(hours=1)))
    apply_plan(ex, [TaskSpec(id="api", pool="codegen", description="API"),
                    TaskSpec(id="audit", pool="security", description="audit",
                             depends_on=["api"] if audit_after_api else [])], "rules", [])
    apply_result(ex, result(eid, "api", "codegen", "started"))
    if not audit_after_api:
        apply_result(ex, result(eid, "audit", "security", "started"))
    return ex


async def test_what_an_unacknowledged_write_announces_goes_out_when_another_replica_wrote_on_top_of_it(
    nc: NATS, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await service_runtime(nc, names, tmp_path)
    eid = "written-over"
    await rt.executions.create(two_running(eid))
    other = TaskFailed(execution_id=eid, task_id="audit", pool="security", attempt=1, worker="w2", started_at=T0,
                       finished_at=T0 + timedelta(seconds=1), error="boom", error_kind="server", final=False,
                       strategy="retry", retry_in_s=1)
    lost = stored_then_lost(rt, monkeypatch, meanwhile=lambda: rt.executions.mutate(
        eid, lambda ex: apply_result(ex, other)))  # another replica stores the other task's failure meanwhile
    done = result(eid, "api", "codegen")
    aggregator = AggregatorHandlers(rt, SimulatedProvider(rt.settings.pe))
    await aggregator.on_result(done, await delivered(rt, names.results(eid), done.to_bytes(), names.results_stream))
    stored = await rt.executions.get(eid)
    assert lost and stored is not None and stored[0].task("api").status == "completed"  # type: ignore[union-attr]
    await stream_holds(rt.jetstream, names.events_stream, names.events(eid, "task_completed"),
                       {names.events(eid, "task_completed"): 1})


async def test_what_an_unacknowledged_write_announces_outlives_a_next_try_that_had_nothing_to_write(
    nc: NATS, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The try after the lost acknowledgement finds nothing to change, and the task it releases cannot be sent
    # either (NATS still coming back): the try after that must still announce the first one's events.
    import services.aggregator.handlers as handlers

    rt = await service_runtime(nc, names, tmp_path)
    eid = "nothing-to-write"
    await rt.executions.create(two_running(eid, audit_after_api=True))
    lost = stored_then_lost(rt, monkeypatch)
    sent: list[str] = []
    publish = handlers.publish

    async def second_send_fails(*args: Any, **kwargs: Any) -> Any:
        sent.append(args[1])
        if len(sent) == 2:
            raise nats.errors.TimeoutError
        return await publish(*args, **kwargs)

    monkeypatch.setattr(handlers, "publish", second_send_fails)
    done = result(eid, "api", "codegen")
    aggregator = AggregatorHandlers(rt, SimulatedProvider(rt.settings.pe))
    await aggregator.on_result(done, await delivered(rt, names.results(eid), done.to_bytes(), names.results_stream))
    assert lost and len(sent) == 3, sent
    await stream_holds(rt.jetstream, names.events_stream, names.events(eid, "*"),
                       {names.events(eid, "task_completed"): 1, names.events(eid, "released"): 1})


async def test_the_calls_an_unacknowledged_write_records_as_superseded_get_their_cost_events(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await anthropic_runtime(nc, names, tmp_path, fake_anthropic, monkeypatch)
    eid = "superseded-unacked"
    await rt.executions.create(execution(rt.settings.pe, eid, last_done=False))
    lost = stored_then_lost(rt, monkeypatch, when=lambda value: SUPERSEDED.encode() in value)
    await a_answers_after_b_cancelled(rt, eid)
    assert lost
    assert sorted(e or "" for e in await both_answers_counted(rt, eid, "cancelled")) == ["", SUPERSEDED]


@pytest.mark.parametrize("end", ["cancel", "deadline"])
async def test_an_execution_ended_before_its_plan_is_counted_once_as_it_ended(
    nc: NATS, names: Names, tmp_path: Path, end: str,
) -> None:
    from prometheus_client import REGISTRY

    rt = await service_runtime(nc, names, tmp_path)
    eid = f"unplanned{end}"
    await rt.executions.create(new_execution(ExecutionRequested(execution_id=eid, message="m", requested_at=T0,
                                                                deadline_at=T0)))
    status = "cancelled" if end == "cancel" else "failed"

    def counted() -> float:
        return REGISTRY.get_sample_value("openclaw_executions_total", {"mode": "parallel", "status": status}) or 0.0

    before = counted()
    h = AggregatorHandlers(rt, SimulatedProvider(rt.settings.pe))
    for times in (1, 2):  # the second delivery finds it ended: not counted again
        if end == "cancel":
            stop = CancelExecution(execution_id=eid, reason="changed my mind")
            await h.on_cancel(stop, await delivered(rt, names.execution_cancel, stop.to_bytes(),
                                                    names.executions_stream, times=times))
        else:
            check = ExecutionDeadline(execution_id=eid, deadline_at=T0)
            await h.on_deadline(check, await delivered(rt, names.execution_deadline, check.to_bytes(),
                                                       names.executions_stream, times=times))
        stored = await rt.executions.get(eid)
        assert stored is not None and stored[0].status == status
        assert counted() == before + 1
