"""The aggregator in the running stack: dependency release, conflicts, and replicas that die."""

from __future__ import annotations

import os
import re
import signal
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Stack, wait_until, write_config

pytestmark = pytest.mark.e2e


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def task(i: str, pool: str, latency: float, *deps: str) -> dict[str, Any]:
    return {"id": i, "pool": pool, "description": f"task {i}", "depends_on": list(deps),
            "context": {"simulate": {"latency_s": latency}}}


def run(stack: Stack, tasks: list[dict[str, Any]] | None = None, message: str = "aggregator test") -> dict[str, Any]:
    body: dict[str, Any] = {"message": message, "wait": True}
    if tasks is not None:
        body["tasks"] = tasks
    r = httpx.post(f"{stack.url}/api/execute-parallel", json=body, timeout=90)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def test_dependency_chain_starts_as_inputs_complete_with_their_outputs(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory("a" + uuid.uuid4().hex[:10])
    doc = run(stack, [
        task("schema", "database", 0.5),
        task("backend", "codegen", 0.5, "schema"),
        task("frontend", "codegen", 0.5, "backend"),
        task("audit", "security", 1.2),
    ])
    assert doc["status"] == "completed"
    t = {x["id"]: x for x in doc["tasks"]}
    assert ts(t["backend"]["started_at"]) >= ts(t["schema"]["finished_at"])
    assert ts(t["frontend"]["started_at"]) >= ts(t["backend"]["finished_at"])
    # Released the moment the input completed, not after some round: well under the 1.2 s audit.
    assert (ts(t["backend"]["started_at"]) - ts(t["schema"]["finished_at"])).total_seconds() < 0.5
    assert ts(t["audit"]["started_at"]) < ts(t["schema"]["finished_at"])  # independent work never waited
    assert [a["upstream"] for a in t["backend"]["attempts"]] == [["schema"]]
    assert [a["upstream"] for a in t["frontend"]["attempts"]] == [["backend"]]
    assert t["schema"]["attempts"][0]["upstream"] == []
    assert doc["aggregated"]["dependencies"] == [{"task": "backend", "depends_on": ["schema"]},
                                                 {"task": "frontend", "depends_on": ["backend"]}]


def test_the_seed_csrf_conflict_is_resolved_security_first_end_to_end(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory("a" + uuid.uuid4().hex[:10])
    doc = run(stack, message="Build a restaurant website with online ordering")
    agg = doc["aggregated"]
    csrf = [c for c in agg["conflicts_detected"] if c["topic"].lower() == "csrf"]
    assert len(csrf) == 1 and csrf[0]["rule"] == "security_first" and csrf[0]["kind"] == "approach_vs_risk"
    overridden = {(o["overridden"]["task_id"], o["overridden"]["pool"], o["by"]["pool"]) for o in agg["audit"]
                  if o["topic"].lower() == "csrf"}
    assert overridden == {("backend", "codegen", "security"), ("frontend", "codegen", "security")}
    session = next(r for r in agg["recommendations"] if r["topic"] == "session handling")
    assert sorted(session["sources"]) == ["backend", "frontend", "security-audit"]  # agreement merged
    assert "Where the agents disagreed" in doc["final_response"] and "csrf — security's" in doc["final_response"]


def handled(stack: Stack, child: str) -> float:
    port = stack.state()["children"][child]["port"]  # type: ignore[index]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    m = re.search(r'openclaw_messages_total\{consumer="aggregator",outcome="handled"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def test_two_aggregators_one_killed_mid_execution_lose_and_duplicate_nothing(  # type: ignore[no-untyped-def]
    stack_factory, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.json", {"ack_wait_s": 2, "max_tasks_per_execution": 12,
                                             "worker_pools": {"codegen": {"max_concurrent": 6, "timeout": 60}}})
    stack = stack_factory("a" + uuid.uuid4().hex[:10], "--config", str(cfg), "--replicas", "aggregator=2")
    fan = [task(f"f{i}", "codegen", 0) for i in range(6)]
    chain = [task("c1", "database", 0.8), task("c2", "database", 0.8, "c1"), task("c3", "database", 0.8, "c2")]
    r = httpx.post(f"{stack.url}/api/execute-parallel", json={"message": "m", "tasks": fan + chain}, timeout=30)
    eid = r.json()["execution_id"]

    def c1_done() -> bool:
        doc = httpx.get(f"{stack.url}/api/execution/{eid}").json()
        return next(t for t in doc["tasks"] if t["id"] == "c1")["status"] == "completed"

    wait_until(c1_done, 30, "c1 to complete")
    survivor_before = handled(stack, "aggregator-2")
    os.kill(stack.pid("aggregator-1"), signal.SIGKILL)

    doc = wait_until(lambda: (d := httpx.get(f"{stack.url}/api/execution/{eid}").json())["status"] == "completed"
                     and d, 40, "completion after the kill")
    for t in doc["tasks"]:
        assert [a["outcome"] for a in t["attempts"]] == ["completed"], t  # each task ran exactly once
    assert doc["cost"]["total_usd"] == pytest.approx(sum(t["attempts"][0]["cost_usd"] for t in doc["tasks"]))
    assert handled(stack, "aggregator-2") > survivor_before  # the survivor kept applying results
    assert "aggregator-1 exited with status -9" in stack.output()
