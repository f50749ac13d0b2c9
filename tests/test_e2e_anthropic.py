"""End to end on the anthropic provider: the whole stack, the real SDK, a local Messages API.

The PM plans with the decomposition model, the pools run their tasks on their configured models, the
aggregator writes the answer with the synthesis model; every call's usage × config prices adds up to
the execution's cost, in the document and in the cost events on NATS.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.js.api import DeliverPolicy

from shared.schemas import CostIncurred
from tests.conftest import Stack, stack_env, start_stack, stop_stack, until, write_config
from tests.fake_anthropic import FIRST_DELTA_CHARS, FakeAnthropic

pytestmark = pytest.mark.e2e

KEY = "sk-ant-e2e"
# The fake's usage × default list prices, by hand (per MTok; cache read 0.1× input, cache write 1.25× input).
PLAN_ON_OPUS = (1850 * 5 + 2600 * 25 + 1320 * 6.25) / 1e6  # 0.0825
TASK_ON_SONNET = (2100 * 3 + 940 * 15 + 1500 * 0.3 + 300 * 3.75) / 1e6  # 0.021975
TASK_ON_HAIKU = (2100 * 1 + 940 * 5 + 1500 * 0.1 + 300 * 1.25) / 1e6  # 0.007325
SYNTHESIS_ON_SONNET = (3300 * 3 + 610 * 15 + 800 * 0.3) / 1e6  # 0.01929
SIGNATURE = "— Ada, your delivery lead"


@pytest.fixture(scope="module")
def env(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, FakeAnthropic]]:
    fake = FakeAnthropic().start()
    tmp = tmp_path_factory.mktemp("anthropic")
    config = write_config(tmp / "config.json", {
        "provider": "anthropic",
        "anthropic": {"base_url": fake.url, "timeout_s": 10},
        "worker_pools": {"security": {"max_concurrent": 2, "timeout": 60, "model": "claude-haiku-4-5"}},
        "pm_coordinator": {"reasoning_effort": "medium", "name": "Ada", "signature": SIGNATURE,
                           "tone": "calm and exact", "emoji": False},
        "retries": {"max_retries": 2, "backoff_s": [0.2]},
    })
    stack = start_stack(nats_url, "llm" + uuid.uuid4().hex[:8], tmp, "--config", str(config),
                        env=stack_env(ANTHROPIC_API_KEY=KEY))
    yield stack, fake
    code = stop_stack(stack)
    fake.stop()
    assert code == 0, stack.output()[-3000:]


def run(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{stack.url}/api/execute-parallel", json={**body, "wait": True}, timeout=60)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def cost_events(stack: Stack, execution_id: str, count: int) -> list[CostIncurred]:
    """The execution's first ``count`` cost events, from the EVENTS stream (whenever they were published)."""
    nc = await nats.connect(stack.state()["nats_url"])  # type: ignore[arg-type]
    try:
        sub = await nc.jetstream().subscribe(stack.names.cost_event(execution_id), deliver_policy=DeliverPolicy.ALL,
                                             ordered_consumer=True)
        return [CostIncurred.model_validate_json((await sub.next_msg(timeout=20)).data) for _ in range(count)]
    finally:
        await nc.drain()


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def test_an_execution_planned_run_and_answered_by_models_costs_exactly_its_tokens(
    env: tuple[Stack, FakeAnthropic],
) -> None:
    stack, fake = env
    seen = len(fake.requests)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        r = await client.post("/api/execute-parallel",
                              json={"message": "Build a restaurant website with online ordering", "wait": True})
        assert r.status_code == 200, r.text
        doc = r.json()
        got = (await client.get(f"/api/execution/{doc['execution_id']}")).json()
    assert got == doc

    assert doc["status"] == "completed" and doc["planner"] == "llm"
    tasks = {t["id"]: t for t in doc["tasks"]}
    assert [(t["id"], t["pool"], t["status"]) for t in doc["tasks"]] == [
        ("schema", "database", "completed"), ("api", "codegen", "completed"), ("audit", "security", "completed")]
    # Dependencies from the model's plan held.
    assert ts(tasks["api"]["started_at"]) >= ts(tasks["schema"]["finished_at"])
    assert ts(tasks["audit"]["started_at"]) >= ts(tasks["api"]["finished_at"])
    assert tasks["audit"]["output"]["findings"][0]["severity"] == "critical"
    assert tasks["schema"]["output"]["simulated"] is False

    # Per attempt and task: the pool's model, the endpoint's usage, usage × that model's price.
    expected = {"schema": ("claude-sonnet-4-6", TASK_ON_SONNET), "api": ("claude-sonnet-4-6", TASK_ON_SONNET),
                "audit": ("claude-haiku-4-5", TASK_ON_HAIKU)}
    for tid, (model, cost) in expected.items():
        [attempt] = tasks[tid]["attempts"]
        assert attempt["model"] == model and attempt["provider"] == "anthropic"
        assert attempt["usage"] == {"input_tokens": 2100, "output_tokens": 940, "cache_read_tokens": 1500,
                                    "cache_write_tokens": 300, "estimated": False}
        assert attempt["cost_usd"] == pytest.approx(cost, abs=1e-12)
        assert tasks[tid]["cost_usd"] == pytest.approx(cost, abs=1e-12)

    decomposition, synthesis = doc["calls"]
    assert (decomposition["phase"], decomposition["model"], decomposition["error"]) == (
        "decomposition", "claude-opus-4-6", None)
    assert decomposition["cost_usd"] == pytest.approx(PLAN_ON_OPUS, abs=1e-12)
    assert (synthesis["phase"], synthesis["model"]) == ("synthesis", "claude-sonnet-4-6")
    assert synthesis["cost_usd"] == pytest.approx(SYNTHESIS_ON_SONNET, abs=1e-12)

    total = PLAN_ON_OPUS + 2 * TASK_ON_SONNET + TASK_ON_HAIKU + SYNTHESIS_ON_SONNET
    cost = doc["cost"]
    assert cost["by_pool"] == pytest.approx(
        {"database": TASK_ON_SONNET, "codegen": TASK_ON_SONNET, "security": TASK_ON_HAIKU}, abs=1e-12)
    assert cost["by_phase"] == pytest.approx(
        {"tasks": 2 * TASK_ON_SONNET + TASK_ON_HAIKU, "decomposition": PLAN_ON_OPUS,
         "synthesis": SYNTHESIS_ON_SONNET}, abs=1e-12)
    assert cost["total_usd"] == pytest.approx(total, abs=1e-8)

    # The answer: the synthesis model's text, the exact cost line, the persona's signature.
    answer = doc["final_response"]
    assert answer.startswith(fake.synthesis_text)
    assert f"Cost: ${total:.4f} — planning ${PLAN_ON_OPUS:.4f};" in answer and answer.endswith(SIGNATURE)

    # What went over the wire: one call per step, shaped per role.
    calls = fake.requests[seen:]
    assert sorted(c["kind"] for c in calls) == ["plan", "synthesis", "task", "task", "task"]
    [plan] = [c["body"] for c in calls if c["kind"] == "plan"]
    assert plan["thinking"] == {"type": "adaptive"} and plan["output_config"] == {"effort": "medium"}
    assert "online ordering" in plan["messages"][0]["content"]
    api = next(c["body"] for c in calls if c["kind"] == "task" and "ordering REST API" in
               c["body"]["messages"][0]["content"])
    assert "Schema for: Design the orders and menu schema" in api["messages"][0]["content"]  # upstream output
    [synth] = [c["body"] for c in calls if c["kind"] == "synthesis"]
    assert "You are Ada" in synth["system"][0]["text"] and "calm and exact" in synth["system"][0]["text"]

    # Every call's cost went out as an event, and they add up to the same total.
    events = await cost_events(stack, doc["execution_id"], 5)
    assert sorted((e.phase, e.task_id) for e in events) == [
        ("decomposition", None), ("synthesis", None), ("task", "api"), ("task", "audit"), ("task", "schema")]
    assert sum(e.cost_usd for e in events) == pytest.approx(total, abs=1e-8)


def test_a_malformed_plan_falls_back_to_the_rules_and_its_cost_still_counts(
    env: tuple[Stack, FakeAnthropic],
) -> None:
    stack, fake = env
    fake.next("plan", "bad_input")
    doc = run(stack, {"message": "Build a restaurant website with online ordering"})
    assert doc["status"] == "completed" and doc["planner"] == "rules"
    assert [t["id"] for t in doc["tasks"]] == ["schema", "backend", "frontend", "security-audit"]
    decomposition = doc["calls"][0]
    assert decomposition["phase"] == "decomposition"
    assert decomposition["error"].startswith("invalid_output: invalid submit_plan input: tasks.0.pool")
    assert decomposition["cost_usd"] == pytest.approx(PLAN_ON_OPUS, abs=1e-12)
    assert doc["cost"]["by_phase"]["decomposition"] == pytest.approx(PLAN_ON_OPUS, abs=1e-12)


def test_a_chat_message_one_specialist_answers_alone_gets_its_answer_and_pays_for_no_summary(
    env: tuple[Stack, FakeAnthropic],
) -> None:
    # The router gave it one specialist; the answer was the synthesis model's summary of that one answer, a second
    # paid call (nearly half the cost) for what the specialist had said already.
    stack, fake = env
    summaries = len(fake.of("synthesis"))
    r = httpx.post(f"{stack.url}/api/chat", json={"message": "Design the PostgreSQL schema for invoices"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["routing"]["parallel"] is False and body["status"] == "completed"
    assert len(fake.of("synthesis")) == summaries
    doc = httpx.get(f"{stack.url}/api/execution/{body['execution_id']}").json()
    [task] = doc["tasks"]
    out = task["output"]
    assert body["response"].startswith(out["summary"] + "\n")
    assert all(a["content"] in body["response"] for a in out["artifacts"]) and out["artifacts"]
    assert "synthesis" not in doc["cost"]["by_phase"] and body["cost_usd"] == pytest.approx(task["cost_usd"])
    assert body["response"].endswith(f"Cost: ${doc['cost']['total_usd']:.4f} — agents ${task['cost_usd']:.4f} "
                                     f"(database ${task['cost_usd']:.4f}).")


def test_rate_limited_and_malformed_task_calls_are_retried_by_the_pool_not_the_sdk(
    env: tuple[Stack, FakeAnthropic],
) -> None:
    stack, fake = env
    seen = len(fake.of("task"))
    fake.next("task", "429", "bad_input")
    plan = [{"id": "migrate", "pool": "database", "description": "Add an index on orders.created_at"}]
    doc = run(stack, {"message": "index", "tasks": plan})
    assert doc["status"] == "completed" and doc["planner"] == "client"
    attempts = doc["tasks"][0]["attempts"]
    assert [a["outcome"] for a in attempts] == ["failed", "failed", "completed"]
    assert "HTTP 429" in attempts[0]["error"]
    # The endpoint's Retry-After (2 s) over the backoff's 1 s: sooner would be refused again, and burn an attempt.
    assert (ts(attempts[1]["started_at"]) - ts(attempts[0]["finished_at"])).total_seconds() >= fake.retry_after_s
    assert "invalid submit_result input" in attempts[1]["error"]
    assert len(fake.of("task")) - seen == 3  # one request per attempt: no retries inside the SDK
    assert attempts[2]["cost_usd"] == pytest.approx(TASK_ON_SONNET, abs=1e-12)
    assert [c["phase"] for c in doc["calls"]] == ["synthesis"]  # a client plan needs no decomposition


def test_a_model_busy_past_the_deadline_hands_the_task_to_the_lighter_one(fake_anthropic: FakeAnthropic,
                                                                          tmp_path: Path, nats_url: str) -> None:
    # A 429 asking to wait 30 s, with 20 s left before the execution's deadline: the task gave up (escalated,
    # nothing delivered). The lighter model has limits of its own: it gets the next attempt, after the backoff.
    fake = fake_anthropic
    fake.retry_after_s = 30
    fake.next("task", "429")
    config = write_config(tmp_path / "config.json", {
        "provider": "anthropic", "anthropic": {"base_url": fake.url, "timeout_s": 10},
        "execution_timeout_s": 20, "retries": {"max_retries": 2, "backoff_s": [0.2]},
    })
    stack = start_stack(nats_url, "busy" + uuid.uuid4().hex[:8], tmp_path, "--config", str(config),
                        env=stack_env(ANTHROPIC_API_KEY=KEY))
    try:
        doc = run(stack, {"message": "m", "tasks": [{"id": "api", "pool": "codegen", "description": "Build the API"}]})
    finally:
        assert stop_stack(stack) == 0, stack.output()[-3000:]
    assert doc["status"] == "completed", doc.get("error")
    [task] = doc["tasks"]
    assert [(a["model"], a["outcome"], a.get("strategy")) for a in task["attempts"]] == [
        ("claude-sonnet-4-6", "failed", "fallback"), ("claude-haiku-4-5", "completed", None)]
    assert [r["model"] for r in fake.of("task")] == ["claude-sonnet-4-6", "claude-haiku-4-5"]


async def test_a_call_the_pools_timeout_cuts_off_is_paid_for_what_it_had_used(fake_anthropic: FakeAnthropic,
                                                                              tmp_path: Path, nats_url: str) -> None:
    # Recorded at $0 before, while the endpoint had read the prompt and written part of the answer. Streamed, the
    # input is its count from the start; the output is estimated from what had arrived (the count comes at the end).
    fake = fake_anthropic
    fake.task_chars = 2000
    fake.next("task", "stall")  # the first FIRST_DELTA_CHARS of the answer, then silence
    config = write_config(tmp_path / "config.json", {
        "provider": "anthropic", "anthropic": {"base_url": fake.url, "timeout_s": 60},
        "worker_pools": {"database": {"timeout": 1}}, "retries": {"max_retries": 2, "backoff_s": [0.2]},
    })
    stack = start_stack(nats_url, "cut" + uuid.uuid4().hex[:8], tmp_path, "--config", str(config),
                        env=stack_env(ANTHROPIC_API_KEY=KEY))
    try:
        doc = run(stack, {"message": "m", "tasks": [{"id": "ddl", "pool": "database", "description": "Add an index"}]})
        events = await cost_events(stack, doc["execution_id"], 3)
    finally:
        assert stop_stack(stack) == 0, stack.output()[-3000:]
    assert doc["status"] == "completed", doc.get("error")
    [task] = doc["tasks"]
    cut, done = task["attempts"]
    assert (cut["outcome"], cut["error_kind"], cut["error"]) == ("failed", "timeout", "timed out after 1s")
    assert cut["usage"] == {"input_tokens": 2100, "output_tokens": FIRST_DELTA_CHARS // 4, "cache_read_tokens": 1500,
                            "cache_write_tokens": 300, "estimated": True}
    cut_cost = (2100 * 3 + FIRST_DELTA_CHARS // 4 * 15 + 1500 * 0.3 + 300 * 3.75) / 1e6
    assert cut["cost_usd"] == pytest.approx(cut_cost, abs=1e-12)
    assert done["outcome"] == "completed" and done["usage"]["estimated"] is False
    assert task["cost_usd"] == pytest.approx(cut_cost + TASK_ON_SONNET, abs=1e-12)
    assert doc["cost"]["by_phase"]["tasks"] == pytest.approx(cut_cost + TASK_ON_SONNET, abs=1e-12)
    # Its cost event too: the two attempts and the synthesis.
    assert sorted((e.phase, e.attempt) for e in events) == [("synthesis", 1), ("task", 1), ("task", 2)]
    assert sum(e.cost_usd for e in events) == pytest.approx(doc["cost"]["total_usd"], abs=1e-8)


async def test_a_call_a_cancel_cuts_off_is_paid_for_on_its_lost_attempt(fake_anthropic: FakeAnthropic,
                                                                       tmp_path: Path, nats_url: str) -> None:
    # It was counted nowhere (or, for a moment, in the metrics alone): the execution had ended.
    fake = fake_anthropic
    fake.task_chars = 2000
    fake.next("task", "stall")
    config = write_config(tmp_path / "config.json", {
        "provider": "anthropic", "anthropic": {"base_url": fake.url, "timeout_s": 60}})
    stack = start_stack(nats_url, "cx" + uuid.uuid4().hex[:8], tmp_path, "--config", str(config),
                        env=stack_env(ANTHROPIC_API_KEY=KEY))

    try:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
            r = await client.post("/api/execute-parallel", json={
                "message": "m", "tasks": [{"id": "api", "pool": "codegen", "description": "Build the API"}]})
            eid = r.json()["execution_id"]

            async def doc() -> dict[str, Any]:
                got: dict[str, Any] = (await client.get(f"/api/execution/{eid}")).json()
                return got

            async def running() -> bool:
                return bool(fake.of("task")) and (await doc())["tasks"][0]["status"] == "running"

            async def paid() -> bool:
                return bool((await doc())["cost"]["total_usd"] > 0)

            await until(running, 20, "the call under way")
            assert (await client.delete(f"/api/execution/{eid}")).status_code == 200
            await until(paid, 20, "the cut call's cost")
            final, events = await doc(), await cost_events(stack, eid, 1)
    finally:
        assert stop_stack(stack) == 0, stack.output()[-3000:]
    assert final["status"] == "cancelled"
    [attempt] = final["tasks"][0]["attempts"]
    assert attempt["outcome"] == "lost" and attempt["error"].startswith("abandoned: cancelled")
    assert attempt["usage"] == {"input_tokens": 2100, "output_tokens": FIRST_DELTA_CHARS // 4,
                                "cache_read_tokens": 1500, "cache_write_tokens": 300, "estimated": True}
    cut = (2100 * 3 + FIRST_DELTA_CHARS // 4 * 15 + 1500 * 0.3 + 300 * 3.75) / 1e6
    assert attempt["cost_usd"] == pytest.approx(cut, abs=1e-12)
    assert final["cost"]["total_usd"] == pytest.approx(cut, abs=1e-12)
    assert [(e.phase, e.task_id, e.attempt) for e in events] == [("task", "api", 1)]
    assert events[0].cost_usd == pytest.approx(cut, abs=1e-12)


@pytest.mark.parametrize("chars", [400_000, 900_000])
def test_outputs_beyond_max_payload_are_cut_to_fit_and_paid_for_once(
    env: tuple[Stack, FakeAnthropic], chars: int,
) -> None:
    """Each task answers with a text of ``chars`` (≈ 1.4 bytes each as JSON): at 400,000 two of them outgrow the
    document (1 MiB on the test's server), at 900,000 one outgrows its result message too. The execution still
    completes, each task on its one paid call, and every message in between fits."""
    stack, fake = env
    seen = len(fake.requests)
    results_cut = texts_cut(stack, "database-1", "result")
    fake.task_chars = chars
    try:
        r = httpx.post(f"{stack.url}/api/execute-parallel",
                       json={"message": "Build a restaurant website with online ordering", "wait": True}, timeout=60)
    finally:
        fake.task_chars = 0
    assert r.status_code == 200, r.text
    assert len(r.content) <= 1024 * 1024 - 4096  # the stored document, as served
    doc = r.json()
    assert doc["status"] == "completed"
    assert [(t["id"], t["status"], len(t["attempts"])) for t in doc["tasks"]] == [
        ("schema", "completed", 1), ("api", "completed", 1), ("audit", "completed", 1)]
    calls = fake.requests[seen:]
    assert sorted(c["kind"] for c in calls) == ["plan", "synthesis", "task", "task", "task"]
    assert doc["cost"]["total_usd"] == pytest.approx(
        PLAN_ON_OPUS + 2 * TASK_ON_SONNET + TASK_ON_HAIKU + SYNTHESIS_ON_SONNET, abs=1e-8)

    schema, api = (doc["tasks"][i]["output"]["artifacts"][0]["content"] for i in (0, 1))
    audit = doc["tasks"][2]["output"]["findings"][0]["detail"]
    cut = "characters cut: an execution document may take 1,044,480 bytes"
    # Cut to one length, the longest texts first: the finding, equally long, too; the summaries not at all.
    assert all(cut in text and 100_000 < len(text) < chars for text in (schema, api, audit))
    assert doc["tasks"][0]["output"]["summary"] == "Schema for: Design the orders and menu schema with migrations"
    prompts = {t: next(c["body"]["messages"][0]["content"] for c in calls if c["kind"] == "task" and needle in
                       c["body"]["messages"][0]["content"]) for t, needle in (("api", "ordering REST API"),
                                                                              ("audit", "Audit checkout"))}
    # Each task got its dependency's output as the pool reported it, not as the document had to cut it: whole at
    # 400,000; at 900,000 cut to fit the result's message (and the task's, which adds the task's own context).
    if chars == 400_000:
        whole = json.dumps('return "é"\n' * (chars // 11))[1:-1]  # as the prompt has it
        assert whole in prompts["api"] and "characters cut" not in prompts["api"] + prompts["audit"]
        assert "Implemented: Build the ordering REST API" in prompts["audit"]
        assert texts_cut(stack, "database-1", "result") == results_cut
    else:
        assert "characters cut: a task's result may take 1,044,480 bytes" in prompts["api"]
        assert texts_cut(stack, "database-1", "result") == results_cut + 1


def texts_cut(stack: Stack, child: str, message: str) -> float:
    """The child's count of messages whose texts it cut to fit."""
    port = stack.state()["children"][child]["port"]  # type: ignore[index]
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    line = f'openclaw_texts_cut_total{{message="{message}"}} '
    return next((float(x.removeprefix(line)) for x in metrics.splitlines() if x.startswith(line)), 0.0)


def test_a_retired_model_degrades_to_the_lighter_one_task_by_task(env: tuple[Stack, FakeAnthropic]) -> None:
    stack, fake = env
    fake.retired.add("claude-sonnet-4-6")  # database's and codegen's model, and the synthesis model
    try:
        doc = run(stack, {"message": "index", "tasks": [
            {"id": "migrate", "pool": "database", "description": "Add an index on orders.created_at"},
            {"id": "api", "pool": "codegen", "description": "Expose the orders by date", "depends_on": ["migrate"]}]})
    finally:
        fake.retired.clear()
    assert doc["status"] == "completed"
    for task in doc["tasks"]:
        assert [(a["outcome"], a["model"], a["error_kind"], a["cost_usd"]) for a in task["attempts"]] == [
            ("failed", "claude-sonnet-4-6", "model_unavailable", 0),
            ("completed", "claude-haiku-4-5", None, pytest.approx(TASK_ON_HAIKU))], task["id"]
        assert "HTTP 404" in task["attempts"][0]["error"]
    # The answer falls back to the template, unbilled; the total is the two calls that answered.
    [synthesis] = doc["calls"]
    assert synthesis["model"] == "claude-sonnet-4-6" and "HTTP 404" in synthesis["error"]
    assert doc["cost"]["total_usd"] == pytest.approx(2 * TASK_ON_HAIKU, abs=1e-12)


def test_a_declined_task_is_asked_of_the_lighter_model_and_a_refused_request_is_not_sent_again(
    env: tuple[Stack, FakeAnthropic],
) -> None:
    stack, fake = env
    seen = len(fake.of("task"))
    fake.next("task", "refusal")
    doc = run(stack, {"message": "index", "tasks": [
        {"id": "migrate", "pool": "database", "description": "Add an index on orders.created_at"}]})
    attempts = doc["tasks"][0]["attempts"]
    assert doc["status"] == "completed"
    assert [(a["outcome"], a["model"]) for a in attempts] == [
        ("failed", "claude-sonnet-4-6"), ("completed", "claude-haiku-4-5")]  # the next attempt, not the last
    assert "declined to answer" in attempts[0]["error"] and attempts[0]["cost_usd"] > 0  # billed, and counted

    fake.next("task", "400")
    doc = run(stack, {"message": "audit", "tasks": [
        {"id": "audit", "pool": "security", "description": "Audit checkout and payments"}]})
    [task] = doc["tasks"]
    assert [a["outcome"] for a in task["attempts"]] == ["failed"]  # the same request would be refused again
    assert "HTTP 400" in task["error"] and task["degradation"] == "unaudited"
    assert len(fake.of("task")) - seen == 3
