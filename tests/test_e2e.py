"""End to end: gateway → PM → pools → aggregator → gateway, all six services as real processes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import httpx
import nats
import pytest
from nats.js.api import DeliverPolicy

from shared.schemas import CUT, DESCRIPTION_MAX, ExecutionCompleted, RunTask
from tests.conftest import Stack, start_stack, stop_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(nats_url: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    s = start_stack(nats_url, "e2e" + uuid.uuid4().hex[:8], tmp_path_factory.mktemp("e2e"))
    yield s
    assert stop_stack(s) == 0, s.output()[-3000:]


def post(stack: Stack, body: dict[str, Any], timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{stack.url}/api/execute-parallel", json=body, timeout=timeout)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_restaurant_website_runs_in_parallel_pools_and_get_matches(stack: Stack) -> None:
    r = post(stack, {"message": "Build a restaurant website with online ordering", "wait": True})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] == "completed"
    assert doc["planner"] == "rules"
    pools = {t["pool"] for t in doc["tasks"]}
    assert len(pools) >= 2, pools
    for t in doc["tasks"]:
        assert t["status"] == "completed"
        assert len(t["attempts"]) == 1 and t["attempts"][0]["outcome"] == "completed"
        assert t["worker"] == f"{t['pool']}-1"
        assert ts(t["started_at"]) < ts(t["finished_at"])
        assert t["model"] and t["cost_usd"] > 0
        assert t["output"]["simulated"] is True and t["output"]["summary"].startswith("[simulated]")
    assert "simulated" in doc["final_response"]
    assert doc["cost"]["total_usd"] == pytest.approx(sum(t["cost_usd"] for t in doc["tasks"]))
    assert set(doc["cost"]["by_pool"]) == pools

    # The dependency held: the frontend started only after the backend API finished, with its output.
    tasks = {t["id"]: t for t in doc["tasks"]}
    assert ts(tasks["frontend"]["started_at"]) >= ts(tasks["backend"]["finished_at"])
    # Independent tasks did not wait for each other.
    assert ts(tasks["security-audit"]["started_at"]) < ts(tasks["backend"]["finished_at"])

    got = httpx.get(f"{stack.url}/api/execution/{doc['execution_id']}", timeout=10)
    assert got.status_code == 200
    assert got.json() == doc


def test_a_security_audit_of_a_whole_shop_runs_as_reviews_side_by_side_within_the_pool_limit(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}/api/chat", json={"message": "Audit our web shop for security problems before launch"},
                   timeout=60)
    assert r.status_code == 200, r.text
    chat = r.json()
    assert chat["routing"]["parallel"] is True and "security audit" in chat["routing"]["reason"]
    doc = httpx.get(f"{stack.url}/api/execution/{chat['execution_id']}", timeout=10).json()
    assert (doc["status"], doc["planner"]) == ("completed", "rules")
    assert [(t["pool"], t["depends_on"], t["status"]) for t in doc["tasks"]] == [("security", [], "completed")] * 4
    assert len({t["description"] for t in doc["tasks"]}) == 4
    runs = sorted((ts(t["started_at"]), ts(t["finished_at"])) for t in doc["tasks"])
    live = [sum(1 for s, e in runs if s <= start < e) for start, _ in runs]
    assert max(live) == 2  # side by side, and never more than security's max_concurrent
    assert chat["response"] == doc["final_response"] and chat["cost_usd"] == doc["cost"]["total_usd"] > 0


@pytest.mark.parametrize("route", ["chat", "project"])
async def test_a_message_longer_than_a_task_description_reaches_its_agents_whole(stack: Stack, route: str) -> None:
    # The API takes messages five times longer than a task's description may be (the single-agent path of
    # /api/chat put the message into one and answered 500). The execution stores it once, however many tasks
    # work on it: a copy in each task's context made a project's document too big to store, and its plan failed.
    lead = {"chat": "Fix the flaky checkout test in the React cart component. ",
            "project": "Build a restaurant website with online ordering. "}[route]
    message = lead + "é" * 99_000  # 198 kB: well over a description, and near what a request may take
    nc = await nats.connect(str(stack.state()["nats_url"]))
    sent = await nc.subscribe(stack.names.tasks("*"))  # core: sees every task message as it is published
    try:
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            path, body = ("/api/chat", {"message": message}) if route == "chat" else (
                "/api/execute-parallel", {"message": message, "wait": True})
            r = await client.post(path, json=body)
            assert r.status_code == 200, r.text
            doc = (await client.get(f"/api/execution/{r.json()['execution_id']}")).json()
        tasks = [RunTask.model_validate_json((await sent.next_msg(timeout=5)).data) for _ in doc["tasks"]]
    finally:
        await nc.drain()
    assert doc["status"] == "completed" and len(doc["tasks"]) == (1 if route == "chat" else 4)
    for t, cmd in zip(sorted(doc["tasks"], key=lambda t: t["id"]), sorted(tasks, key=lambda c: c.task.id), strict=True):
        assert len(t["description"]) == DESCRIPTION_MAX and t["description"].endswith(CUT)
        assert "request" not in t["context"] and cmd.task.context["request"] == message.strip()


def test_client_plan_runs_concurrently_and_honours_simulated_latency(stack: Stack) -> None:
    plan = [
        {"id": f"t{i}", "pool": pool, "description": f"task {i}", "context": {"simulate": {"latency_s": 1.0}}}
        for i, pool in enumerate(["codegen", "codegen", "security", "database"])
    ]
    r = post(stack, {"message": "client plan", "tasks": plan, "wait": True})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["planner"] == "client" and doc["status"] == "completed"
    durations = [a["duration_s"] for t in doc["tasks"] for a in t["attempts"]]
    # The latency runs on the event loop's clock (libuv's, read once per loop iteration, so a timer may end a little
    # before a full second has passed on the wall clock), the recorded times are wall clock: 0.9998 s has been seen.
    assert all(d >= 0.99 for d in durations), durations
    # Four 1 s tasks within the pools' limits all run at once: every one started before any finished.
    attempts = [t["attempts"][0] for t in doc["tasks"]]
    assert max(ts(a["started_at"]) for a in attempts) < min(ts(a["finished_at"]) for a in attempts)


def test_failed_attempts_are_retried_and_recorded(stack: Stack) -> None:
    plan = [{"id": "flaky", "pool": "database", "description": "flaky migration",
             "context": {"simulate": {"latency_s": 0, "fail_attempts": 1}}}]
    doc = post(stack, {"message": "retry me", "tasks": plan, "wait": True}).json()
    task = doc["tasks"][0]
    assert doc["status"] == "completed"
    assert [a["outcome"] for a in task["attempts"]] == ["failed", "completed"]
    assert "attempt 1" in task["attempts"][0]["error"]


def test_an_agent_that_raises_is_a_failed_attempt_not_a_lost_task(stack: Stack) -> None:
    plan = [{"id": "bad", "pool": "security", "description": "x", "context": {"simulate": {"raise_attempts": 9}}}]
    doc = post(stack, {"message": "agent bug", "tasks": plan, "wait": True}).json()
    task = doc["tasks"][0]
    assert doc["status"] == "failed" and task["status"] == "failed"
    assert len(task["attempts"]) == 3
    assert task["error"] == "agent error: RuntimeError: simulated agent bug"


def test_dependency_failure_skips_dependents_and_ends_partial(stack: Stack) -> None:
    plan = [
        {"id": "api", "pool": "codegen", "description": "backend API",
         "context": {"simulate": {"latency_s": 0, "fail_attempts": 99}}},
        {"id": "ui", "pool": "codegen", "description": "frontend", "depends_on": ["api"]},
        {"id": "db", "pool": "database", "description": "schema", "context": {"simulate": {"latency_s": 0}}},
    ]
    doc = post(stack, {"message": "partial", "tasks": plan, "wait": True}).json()
    tasks = {t["id"]: t for t in doc["tasks"]}
    assert doc["status"] == "partial"
    assert tasks["api"]["status"] == "failed" and len(tasks["api"]["attempts"]) == 3
    assert tasks["ui"]["status"] == "skipped" and tasks["ui"]["error"] == "blocked by api"
    assert tasks["ui"]["attempts"] == []
    assert tasks["db"]["status"] == "completed"
    assert "Re-run api" in doc["final_response"]


async def test_accepted_without_wait_then_final_event_and_get(stack: Stack) -> None:
    plan = [{"id": "one", "pool": "security", "description": "audit", "context": {"simulate": {"latency_s": 0.3}}}]
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        r = await client.post("/api/execute-parallel", json={"message": "no wait", "tasks": plan})
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["status"] == "running"  # the version the plan was stored in: it lists the tasks
        assert [t["id"] for t in accepted["tasks"]] == ["one"]
        eid = accepted["execution_id"]

        # The final response event is kept in the EVENTS stream: read it whether or not it already happened.
        nc = await nats.connect(stack.state()["nats_url"])  # type: ignore[arg-type]
        js = nc.jetstream()
        sub = await js.subscribe(stack.names.completed_event(eid), deliver_policy=DeliverPolicy.ALL,
                                 ordered_consumer=True)
        msg = await sub.next_msg(timeout=30)
        event = ExecutionCompleted.model_validate_json(msg.data)
        await nc.drain()
        assert event.execution.status == "completed"

        got = (await client.get(f"/api/execution/{eid}")).json()
        assert got["status"] == "completed"
        assert got["final_response"] == event.execution.final_response


def test_wait_times_out_with_202_and_current_state(stack: Stack) -> None:
    plan = [{"id": "slow", "pool": "codegen", "description": "slow", "context": {"simulate": {"latency_s": 3}}}]
    r = post(stack, {"message": "slow", "tasks": plan, "wait": True, "timeout_s": 0.5})
    assert r.status_code == 202
    assert r.json()["status"] in ("queued", "running")  # not terminal: the 3 s task is still going
    assert r.json()["final_response"] is None


def test_ops_endpoints_on_gateway(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{stack.url}/readyz").json()["ready"] is True
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert "# TYPE openclaw_http_requests_total counter" in metrics
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    assert "/api/execute-parallel" in spec["paths"] and "/api/execution/{execution_id}" in spec["paths"]
    assert httpx.get(f"{stack.url}/docs").status_code == 200
    httpx.get(f"{stack.url}/no/such/page")
    counted = httpx.get(f"{stack.url}/metrics").text
    for route in ("/openapi.json", "/docs", "unmatched"):  # a label per route, as the API's routes have
        assert f'openclaw_http_requests_total{{method="GET",route="{route}"' in counted, route
    # The API's 5xx series are there before any 5xx, so the error-rate alert sees the first one.
    for method, route in (("POST", "/api/execute-parallel"), ("DELETE", "/api/execution/{execution_id}")):
        for status in ("500", "503"):
            assert f'openclaw_http_requests_total{{method="{method}",route="{route}",status="{status}"}} 0.0' in (
                counted), (method, route, status)


def test_every_service_serves_health_and_metrics(stack: Stack) -> None:
    children = stack.state()["children"]
    assert isinstance(children, dict)
    for name, child in children.items():
        base = f"http://127.0.0.1:{child['port']}"
        assert httpx.get(f"{base}/healthz").status_code == 200, name
        assert httpx.get(f"{base}/readyz").json()["ready"] is True, name
        assert "python_info" in httpx.get(f"{base}/metrics").text, name
    pool_metrics = httpx.get(f"http://127.0.0.1:{children['codegen-1']['port']}/metrics").text
    assert 'openclaw_tasks_total{outcome="completed",pool="codegen"}' in pool_metrics


def test_serial_mode_runs_the_same_plan_one_task_at_a_time(stack: Stack) -> None:
    plan = [
        {"id": "a", "pool": "codegen", "description": "a", "context": {"simulate": {"latency_s": 0.3}}},
        {"id": "b", "pool": "security", "description": "b", "context": {"simulate": {"latency_s": 0.3}}},
        {"id": "c", "pool": "database", "description": "c", "depends_on": ["a"],
         "context": {"simulate": {"latency_s": 0.3}}},
        {"id": "d", "pool": "database", "description": "d", "context": {"simulate": {"latency_s": 0.3}}},
    ]
    doc = post(stack, {"message": "serial", "tasks": plan, "mode": "serial", "wait": True}).json()
    assert doc["mode"] == "serial" and doc["status"] == "completed"
    spans = sorted((ts(t["started_at"]), ts(t["finished_at"]), t["id"]) for t in doc["tasks"])
    assert [s[2] for s in spans] == ["a", "b", "c", "d"]  # plan order, dependencies first
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        assert start >= end  # never two at once
