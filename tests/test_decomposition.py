"""PM decomposition: the model's plan when it is valid; else the rules; else one serial task — cost recorded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from services.pm.handlers import PMHandlers
from services.pm.planning import plan_request
from services.pm.prompts import SYSTEM
from shared import metrics
from shared.config import ParallelExecutionConfig
from shared.costs import CUT_BY_STOP
from shared.errors import PlanError
from shared.execution import cancel, fail_execution, new_execution
from shared.names import Names
from shared.providers import AnthropicProvider, SimulatedProvider
from shared.schemas import ExecutionCompleted, ExecutionRequested, TaskSpec, now
from shared.service import Runtime
from tests.conftest import Watched, answered_past_ack_wait, delivered, service_runtime, stopped, stream_holds, until
from tests.fake_anthropic import FakeAnthropic

KEY = "sk-ant-test"
PLAN_ON_OPUS = (1850 * 5 + 2600 * 25 + 1320 * 6.25) / 1e6  # the fake's plan usage × claude-opus-4-6 prices
PROJECT = "Build a restaurant website with online ordering"


def request(message: str = PROJECT, **kw: Any) -> ExecutionRequested:
    return ExecutionRequested(execution_id="e1", message=message, requested_at=now(), deadline_at=now(), **kw)


async def planned_once(rt: Runtime, req: ExecutionRequested) -> None:
    """One delivery of ``req`` to a PM on the anthropic provider (a client of its own, closed after)."""
    provider = AnthropicProvider(rt.settings.pe, KEY)
    try:
        msg = await delivered(rt, rt.names.execution_requested, req.to_bytes(), rt.names.executions_stream)
        await PMHandlers(rt, provider).on_requested(req, msg)
    finally:
        await provider.aclose()


@pytest.fixture
def pe(fake_anthropic: FakeAnthropic) -> ParallelExecutionConfig:
    return ParallelExecutionConfig.model_validate(
        {"provider": "anthropic", "anthropic": {"base_url": fake_anthropic.url, "timeout_s": 0.5},
         "pm_coordinator": {"reasoning_effort": "medium"}, "max_tasks_per_execution": 4}
    )


@pytest.fixture
async def provider(pe: ParallelExecutionConfig) -> AsyncIterator[AnthropicProvider]:
    p = AnthropicProvider(pe, KEY)
    yield p
    await p.aclose()


async def test_a_valid_model_plan_is_used_and_its_call_priced(
    pe: ParallelExecutionConfig, provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    out = await plan_request(request(project="trattoria", force_parallel=True), pe, provider)
    assert out.planner == "llm"
    assert [(t.id, t.pool, t.depends_on) for t in out.tasks] == [
        ("schema", "database", []), ("api", "codegen", ["schema"]), ("audit", "security", ["api"])]
    [call] = out.calls
    assert (call.phase, call.model, call.provider) == ("decomposition", "claude-opus-4-6", "anthropic")
    assert call.error is None
    assert call.usage.cache_write_tokens == 1320
    assert call.cost_usd == pytest.approx(PLAN_ON_OPUS, abs=1e-12)

    [body] = fake_anthropic.of("plan")
    assert body["model"] == "claude-opus-4-6"
    assert body["thinking"] == {"type": "adaptive"} and body["output_config"] == {"effort": "medium"}
    assert body["system"] == [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    user = body["messages"][0]["content"]
    assert PROJECT in user and "Project: trattoria" in user and "at most 4 task(s)" in user
    assert "involve every pool" in user


@pytest.mark.parametrize(
    ("plan", "says"),
    [
        ({"tasks": [{"id": "a", "pool": "codegen", "description": "a", "depends_on": ["b"]},
                    {"id": "b", "pool": "codegen", "description": "b", "depends_on": ["a"]}]},
         "invalid plan: dependency cycle: a -> b -> a"),
        ({"tasks": [{"id": "a", "pool": "codegen", "description": "a", "depends_on": ["zzz"]}]},
         "invalid plan: task 'a' depends on unknown task(s): zzz"),
        ({"tasks": [{"id": "a", "pool": "codegen", "description": "a"}, {"id": "a", "pool": "security",
                                                                         "description": "b"}]},
         "invalid plan: duplicate task id(s): a"),
        ({"tasks": [{"id": f"t{i}", "pool": "codegen", "description": "x"} for i in range(5)]},
         "invalid plan: the plan has 5 tasks; at most 4"),
        ({"tasks": []}, "invalid plan: the plan has no tasks"),
    ],
)
async def test_a_model_plan_that_does_not_check_out_falls_back_to_the_rules_and_still_costs(
    pe: ParallelExecutionConfig, provider: AnthropicProvider, fake_anthropic: FakeAnthropic,
    plan: dict[str, Any], says: str,
) -> None:
    fake_anthropic.plan = plan
    out = await plan_request(request(), pe, provider)
    assert out.planner == "rules" and [t.id for t in out.tasks] == ["schema", "backend", "frontend", "security-audit"]
    [call] = out.calls
    assert call.error is not None and call.error.startswith(says)
    assert call.cost_usd == pytest.approx(PLAN_ON_OPUS, abs=1e-12)  # paid for, even though unused


@pytest.mark.parametrize(
    ("behaviour", "says", "billed"),
    [
        ("bad_input", "invalid_output: invalid submit_plan input: tasks.0.pool", True),  # pool "frontend"
        ("no_tool", "invalid_output: the model did not call submit_plan", True),
        ("not_json", "invalid_output: claude-opus-4-6: malformed response", False),
        ("429", "rate_limit: claude-opus-4-6: HTTP 429", False),
        ("529", "overloaded: claude-opus-4-6: HTTP 529", False),
        ("500", "server: claude-opus-4-6: HTTP 500", False),
        ("slow", "timeout: claude-opus-4-6 did not answer within 0.5s", False),
    ],
)
async def test_a_failed_or_malformed_call_falls_back_to_the_rules_without_a_crash(
    pe: ParallelExecutionConfig, provider: AnthropicProvider, fake_anthropic: FakeAnthropic,
    behaviour: Any, says: str, billed: bool,
) -> None:
    fake_anthropic.next("plan", behaviour)
    out = await plan_request(request(), pe, provider)
    assert out.planner == "rules" and len(out.tasks) == 4
    [call] = out.calls
    assert call.error is not None and call.error.startswith(says), call.error
    assert call.cost_usd == (pytest.approx(PLAN_ON_OPUS, abs=1e-12) if billed else 0.0)
    assert len(fake_anthropic.of("plan")) == 1


async def test_when_the_rules_match_nothing_the_chain_ends_in_one_serial_task(
    pe: ParallelExecutionConfig, provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.next("plan", "529")
    out = await plan_request(request("Please make it nicer"), pe, provider)
    assert out.planner == "serial"
    assert [(t.id, t.pool) for t in out.tasks] == [("task-1", "codegen")]
    assert out.calls[0].error is not None and out.calls[0].error.startswith("overloaded")


async def test_a_client_plan_skips_decomposition(
    pe: ParallelExecutionConfig, provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    tasks = [TaskSpec(id="x", pool="security", description="audit")]
    out = await plan_request(request(tasks=tasks), pe, provider)
    assert (out.planner, out.tasks, out.calls) == ("client", tasks, [])
    bad = [TaskSpec(id="x", pool="security", description="a", depends_on=["x"])]
    with pytest.raises(PlanError, match="depends on itself"):
        await plan_request(request(tasks=bad), pe, provider)
    assert fake_anthropic.requests == []


async def test_the_simulated_provider_plans_by_rules_at_no_cost() -> None:
    pe = ParallelExecutionConfig()
    out = await plan_request(request(), pe, SimulatedProvider(pe))
    assert out.planner == "rules" and out.calls == []


async def pm_on(fake: FakeAnthropic, nc: NATS, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                timeout_s: float, **cfg: Any) -> Runtime:
    """A PM's runtime on the anthropic provider, pointed at ``fake``."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return await service_runtime(nc, names, tmp_path, service="pm", cfg={
        "provider": "anthropic", "anthropic": {"base_url": fake.url, "timeout_s": timeout_s}, **cfg})


async def stored_request(rt: Runtime, execution_id: str, deadline_in: timedelta = timedelta(hours=1)
                         ) -> ExecutionRequested:
    """A request whose execution the gateway has stored."""
    req = ExecutionRequested(execution_id=execution_id, message=PROJECT, requested_at=now(),
                             deadline_at=now() + deadline_in)
    req.revision = await rt.executions.create(new_execution(req))
    return req


@contextlib.asynccontextmanager
async def planning_cut_by_a_stop(rt: Runtime, fake: FakeAnthropic, req: ExecutionRequested) -> AsyncIterator[Watched]:
    """The PM's first delivery of ``req``, stopped (its grace run out) once the model has started planning, which
    then says nothing more; yields the provider, for the request's redelivery."""
    fake.next("plan", "stall")
    provider = Watched(rt.settings.pe, KEY)
    try:
        msg = await delivered(rt, rt.names.execution_requested, req.to_bytes(), rt.names.executions_stream)
        planning = asyncio.create_task(PMHandlers(rt, provider).on_requested(req, msg))
        await until(provider.started, 10, "the model to start planning")
        await stopped(planning)
        fake.release.set()
        yield provider
    finally:
        await provider.aclose()


async def test_a_plan_that_comes_after_a_cancel_keeps_its_call_in_the_cost_and_starts_nothing(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await pm_on(fake_anthropic, nc, names, tmp_path, monkeypatch, 5)
    req = await stored_request(rt, "late")
    fake_anthropic.next("plan", "slow")
    provider = AnthropicProvider(rt.settings.pe, KEY)
    try:
        msg = await delivered(rt, names.execution_requested, req.to_bytes(), names.executions_stream)
        planning = asyncio.create_task(PMHandlers(rt, provider).on_requested(req, msg))
        await until(lambda: len(fake_anthropic.of("plan")) == 1, 10, "the decomposition call")
        meanwhile = await rt.executions.get("late")  # shown while the model plans (it said `queued`)
        assert meanwhile is not None and meanwhile[0].status == "planning"
        # Cancelled while the model plans: the plan's write loses to the cancel.
        await rt.executions.mutate("late", lambda ex: cancel(ex, "client cancelled"))
        fake_anthropic.release.set()
        await planning
    finally:
        await provider.aclose()

    assert len(fake_anthropic.of("plan")) == 1
    stored = await rt.executions.get("late")
    assert stored is not None
    ex = stored[0]
    assert ex.status == "cancelled" and ex.tasks == []
    [call] = ex.calls
    assert call.error == "unused: the execution was cancelled first"
    assert ex.cost.total_usd == pytest.approx(PLAN_ON_OPUS, abs=1e-12)
    await stream_holds(rt.jetstream, names.events_stream, names.cost_event("late"), {names.cost_event("late"): 1})
    assert (await rt.jetstream.stream_info(names.tasks_stream)).state.messages == 0


async def test_a_plan_cut_off_by_a_stop_is_paid_and_recorded_and_the_redelivery_plans_again(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await pm_on(fake_anthropic, nc, names, tmp_path, monkeypatch, 30)
    req = await stored_request(rt, "stop")
    async with planning_cut_by_a_stop(rt, fake_anthropic, req) as provider:  # the request goes back
        stored = await rt.executions.get("stop")
        assert stored is not None
        [cut] = stored[0].calls
        assert cut.phase == "decomposition" and cut.error == CUT_BY_STOP
        assert cut.usage.input_tokens == 1850 and cut.usage.cache_write_tokens == 1320 and cut.usage.estimated
        assert cut.cost_usd > (1850 * 5 + 1320 * 6.25) / 1e6  # the input, and the output it had written so far
        # The restarted PM plans it again: a second call, paid, and both are in the cost.
        await PMHandlers(rt, provider).on_requested(req, await delivered(
            rt, names.execution_requested, req.to_bytes(), names.executions_stream))

    stored = await rt.executions.get("stop")
    assert stored is not None
    ex = stored[0]
    assert ex.status == "running" and ex.planner == "llm" and len(fake_anthropic.of("plan")) == 2
    assert [c.error for c in ex.calls] == [CUT_BY_STOP, None]
    assert ex.cost.total_usd == pytest.approx(cut.cost_usd + PLAN_ON_OPUS, abs=1e-12)
    # Their events went out with the plan: one each.
    await stream_holds(rt.jetstream, names.events_stream, names.cost_event("stop"), {names.cost_event("stop"): 2})


async def test_a_plan_cut_off_by_a_stop_is_announced_also_when_the_redelivery_comes_past_the_deadline(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await pm_on(fake_anthropic, nc, names, tmp_path, monkeypatch, 30)
    req = await stored_request(rt, "late2")
    async with planning_cut_by_a_stop(rt, fake_anthropic, req) as provider:
        # The redelivery comes after the deadline (a PM down for long): not planned, and the cut call's cost is sent.
        past = req.model_copy(update={"deadline_at": now() - timedelta(seconds=1), "revision": None})
        await PMHandlers(rt, provider).on_requested(past, await delivered(
            rt, names.execution_requested, past.to_bytes(), names.executions_stream))
    stored = await rt.executions.get("late2")
    assert stored is not None and stored[0].status == "failed" and len(fake_anthropic.of("plan")) == 1
    assert [c.error for c in stored[0].calls] == [CUT_BY_STOP]
    await stream_holds(rt.jetstream, names.events_stream, names.cost_event("late2"), {names.cost_event("late2"): 1})


@pytest.mark.parametrize("ended", ["cancelled", "past its deadline"])
async def test_a_request_that_ended_before_the_pm_took_it_costs_no_plan(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    ended: str,
) -> None:
    # The PM was down or behind: by the time it takes the request, the client has cancelled it, or its deadline
    # has passed (its check ends it). Either way a paid decomposition would be thrown away.
    rt = await pm_on(fake_anthropic, nc, names, tmp_path, monkeypatch, 5)
    req = await stored_request(rt, "gone", timedelta(hours=1) if ended == "cancelled" else timedelta(0))
    if ended == "cancelled":
        await rt.executions.mutate("gone", lambda ex: cancel(ex, "client cancelled"))
    await planned_once(rt, req)

    assert fake_anthropic.of("plan") == []
    stored = await rt.executions.get("gone")
    assert stored is not None
    assert stored[0].tasks == [] and stored[0].calls == []
    assert stored[0].status == ("cancelled" if ended == "cancelled" else "failed")
    if ended != "cancelled":  # ended by the PM: a request sent straight to NATS has no deadline check scheduled
        assert stored[0].error == "execution deadline passed before it was planned"
    assert (await rt.jetstream.stream_info(names.tasks_stream)).state.messages == 0


async def test_a_slow_plan_keeps_its_request_from_being_redelivered(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The model plans for longer than ack_wait: the heartbeat keeps the broker from handing the request to
    # another PM replica meanwhile (which would pay for a second plan).
    rt = await pm_on(fake_anthropic, nc, names, tmp_path, monkeypatch, 20, ack_wait_s=1)
    req = await stored_request(rt, "slowplan")
    provider = AnthropicProvider(rt.settings.pe, KEY)
    pm = PMHandlers(rt, provider)
    try:
        await answered_past_ack_wait(rt, names.execution_requested, req.to_bytes(), names.executions_stream,
                                     fake_anthropic, "plan", lambda msg: pm.on_requested(req, msg))
    finally:
        await provider.aclose()
    assert len(fake_anthropic.of("plan")) == 1
    stored = await rt.executions.get("slowplan")
    assert stored is not None and stored[0].planner == "llm"


async def test_a_redelivered_request_sends_the_plans_events_again_but_counts_the_plan_once(
    nc: NATS, names: Names, tmp_path: Path,
) -> None:
    rt = await service_runtime(nc, names, tmp_path, service="pm")
    req = ExecutionRequested(execution_id="twice", message=PROJECT, requested_at=now(),
                             deadline_at=now() + timedelta(hours=1))
    req.revision = await rt.executions.create(new_execution(req))
    pm, plans = PMHandlers(rt, SimulatedProvider(rt.settings.pe)), metrics.PLANS.labels("rules")
    before = plans._value.get()
    await rt.jetstream.publish(names.execution_requested, req.to_bytes())
    first, later = [await rt.jetstream.pull_subscribe(names.execution_requested, durable=d,
                                                      stream=names.executions_stream) for d in ("first", "later")]
    await pm.on_requested(req, (await first.fetch(1, timeout=5))[0])
    # As if its acknowledgement was lost: the same message delivered again (here by a second durable).
    await (await later.fetch(1, timeout=5))[0].nak()
    [again] = await later.fetch(1, timeout=5)
    assert again.metadata.num_delivered == 2
    await pm.on_requested(req, again)
    assert plans._value.get() - before == 1
    await stream_holds(rt.jetstream, names.events_stream, names.events("twice", "planned"),
                       {names.events("twice", "planned"): 1})  # sent twice, under one msg-id


@pytest.mark.parametrize("planner", ["llm", "rules"])
async def test_two_copies_of_a_request_taken_at_once_make_one_plan_paid_and_counted_once(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    planner: str,
) -> None:
    # A replay past the stream's duplicate window while the PM was down left two messages of one request, fetched
    # together: both planned, the model was paid twice, and the plan counted twice.
    if planner == "llm":
        rt = await pm_on(fake_anthropic, nc, names, tmp_path, monkeypatch, 20)
    else:
        rt = await service_runtime(nc, names, tmp_path, service="pm")
    req = await stored_request(rt, "copies")
    replay = req.model_copy(update={"revision": None})  # the gateway's replay carries no revision
    provider = AnthropicProvider(rt.settings.pe, KEY) if planner == "llm" else SimulatedProvider(rt.settings.pe)
    pm, plans = PMHandlers(rt, provider), metrics.PLANS.labels(planner)
    before = plans._value.get()
    for copy, msg_id in ((req, "copies"), (replay, "copies-again")):
        await rt.jetstream.publish(names.execution_requested, copy.to_bytes(), headers={"Nats-Msg-Id": msg_id})
    sub = await rt.jetstream.pull_subscribe(names.execution_requested, durable="pm", stream=names.executions_stream)
    first, second = await sub.fetch(2, timeout=5)
    try:
        await asyncio.gather(pm.on_requested(req, first), pm.on_requested(replay, second))
    finally:
        await provider.aclose()
    stored = await rt.executions.get("copies")
    assert stored is not None and stored[0].status == "running" and stored[0].planner == planner
    assert len(fake_anthropic.of("plan")) == (1 if planner == "llm" else 0)
    assert len(stored[0].calls) == (1 if planner == "llm" else 0)
    assert plans._value.get() - before == 1
    assert (await sub.consumer_info()).num_ack_pending == 0  # both handled, neither left to come back


async def test_a_redelivered_request_announces_an_execution_ended_unannounced(nc: NATS, names: Names,
                                                                            tmp_path: Path) -> None:
    # The PM stored the rejection of a plan and died before announcing it: the redelivery announces it.
    rt = await service_runtime(nc, names, tmp_path, service="pm")
    req = ExecutionRequested(execution_id="mute", message=PROJECT, requested_at=now(),
                             deadline_at=now() + timedelta(hours=1))
    await rt.executions.create(new_execution(req))
    await rt.executions.mutate("mute", lambda ex: fail_execution(ex, "invalid plan: a cycle"))
    msg = await delivered(rt, names.execution_requested, req.to_bytes(), names.executions_stream, times=2)
    await PMHandlers(rt, SimulatedProvider(rt.settings.pe)).on_requested(req, msg)
    event = await rt.jetstream.get_last_msg(names.events_stream, names.completed_event("mute"))
    assert ExecutionCompleted.model_validate_json(event.data).execution.error == "invalid plan: a cycle"
    assert (event.headers or {})[ExecutionCompleted.STATUS_HEADER] == "failed"


async def test_a_plan_that_cannot_be_made_after_a_paid_call_ends_the_execution_with_the_call_in_its_cost(
    nc: NATS, names: Names, fake_anthropic: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The model's answer is unusable (billed all the same), and the rules cannot plan the request either: the
    # execution fails at once, saying why, with the call in its cost and its cost event out, not paid for again
    # on a redelivery.
    import services.pm.planning as planning

    def unplannable(req: ExecutionRequested, max_tasks: int) -> Any:
        raise PlanError("nothing here can be planned")

    monkeypatch.setattr(planning, "make_plan", unplannable)
    rt = await pm_on(fake_anthropic, nc, names, tmp_path, monkeypatch, 20)
    fake_anthropic.next("plan", "no_tool")
    req = await stored_request(rt, "unplannable")
    await planned_once(rt, req)
    stored = await rt.executions.get("unplannable")
    assert stored is not None
    ex = stored[0]
    assert ex.status == "failed" and ex.error == "invalid plan: nothing here can be planned"
    [call] = ex.calls
    assert call.phase == "decomposition" and call.error and call.error.startswith("invalid_output")
    assert ex.cost.total_usd == pytest.approx(PLAN_ON_OPUS, abs=1e-12)
    await stream_holds(rt.jetstream, names.events_stream, names.cost_event("unplannable"),
                       {names.cost_event("unplannable"): 1})
    assert len(fake_anthropic.of("plan")) == 1
