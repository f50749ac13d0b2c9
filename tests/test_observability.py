"""Metrics and logs: every metric the Grafana dashboard queries is exported, and logs join up by execution."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

from shared import metrics
from shared.config import ParallelExecutionConfig
from shared.names import Names
from shared.pool import watch_queue
from tests.conftest import (
    ROOT,
    Stack,
    ready_on,
    scrape,
    service_runtime,
    stack_env,
    start_stack,
    stop_stack,
    until,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e
DASHBOARD = ROOT / "deploy" / "grafana" / "openclaw-dashboard.json"


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\b(openclaw_[a-z_]+)\b", e)}


def exported(stack: Stack) -> dict[str, set[str]]:
    """Sample names with at least one sample, per service."""
    out: dict[str, set[str]] = {}
    for name, child in stack.state()["children"].items():  # type: ignore[union-attr]
        out[name] = {sample.split("{")[0] for sample in scrape(child["port"])}
    return out


def all_ready(stack: Stack) -> None:
    """Until every service answers /readyz: started, its consumers bound and its metrics primed (the stack is up once
    its gateway is)."""
    for name, child in stack.state()["children"].items():  # type: ignore[union-attr]
        wait_until(lambda port=child["port"]: ready_on(port), 30, f"{name} to be ready")


def test_every_dashboard_metric_is_exported_after_real_work(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = stack_factory("o" + uuid.uuid4().hex[:10], "--log-format", "json")
    post = lambda body: httpx.post(f"{stack.url}/api/execute-parallel", json=body, timeout=60)  # noqa: E731

    # Before any work, the counters the alerts take increase() of are exported at 0: a series that first appeared at
    # 1 would hide its first event (a process's first dead letter, its first failed execution) from the alert.
    def samples(child: str) -> dict[str, float]:
        return scrape(stack.state()["children"][child]["port"])  # type: ignore[index]

    all_ready(stack)
    aggregator, tasks = samples("aggregator-1"), stack.names.tasks_stream
    assert aggregator[f'openclaw_dead_letters_total{{consumer="codegen",stream="{tasks}"}}'] == 0
    assert aggregator['openclaw_executions_total{mode="parallel",status="failed"}'] == 0
    assert samples("pm-1")['openclaw_executions_total{mode="serial",status="failed"}'] == 0
    assert samples("security-1")[f'openclaw_dead_letters_total{{consumer="security",stream="{tasks}"}}'] == 0
    assert samples("security-1")['openclaw_tasks_total{outcome="failed",pool="security"}'] == 0
    codegen = ParallelExecutionConfig().worker_pools.get("codegen")  # the cost alert's increase() too, for each model
    for model in (codegen.model, codegen.fallback_model):
        assert samples("codegen-1")[f'openclaw_cost_usd_total{{model="{model}",pool="codegen"}}'] == 0
        assert samples("codegen-1")[f'openclaw_tokens_total{{model="{model}",pool="codegen",type="output"}}'] == 0
    # a plan with a retry, the seed's conflict, a serial run, a routed chat and a poison message
    doc = post({"message": "Build a restaurant website with online ordering", "wait": True}).json()
    assert doc["status"] == "completed" and doc["aggregated"]["conflicts_detected"]
    flaky = [{"id": "f", "pool": "database", "description": "d",
              "context": {"simulate": {"latency_s": 0, "fail_attempts": 1}}}]
    assert post({"message": "m", "tasks": flaky, "mode": "serial", "wait": True}).json()["status"] == "completed"
    assert httpx.post(f"{stack.url}/api/chat", json={"message": "Audit the login for XSS"}, timeout=60).is_success

    async def poison() -> None:
        nc = await nats.connect(str(stack.state()["nats_url"]))
        await nc.jetstream().publish(stack.names.tasks("security"), b"not json")
        await nc.drain()

    asyncio.run(poison())

    wanted = dashboard_metrics()
    assert len(wanted) >= 15, wanted

    def missing() -> set[str]:
        have = set().union(*exported(stack).values())
        return {m for m in wanted if not ({m, f"{m}_bucket"} & have)}

    # the queue gauges are read from the consumers every 5 s, the dead letter lands asynchronously
    try:
        wait_until(lambda: not missing(), 30, "every dashboard metric to have samples")
    except AssertionError:
        raise AssertionError(f"the dashboard queries metrics no service exports: {sorted(missing())}") from None
    per_service = exported(stack)
    assert "openclaw_tasks_total" in per_service["codegen-1"] and "openclaw_queue_depth" in per_service["security-1"]
    assert "openclaw_executions_total" in per_service["aggregator-1"]
    assert "openclaw_http_requests_total" in per_service["gateway-1"] and "openclaw_plans_total" in per_service["pm-1"]

    # Structured logs: one execution can be followed across services by its id.
    eid = doc["execution_id"]
    records = []
    for line in stack.output().splitlines():
        _, _, rest = line.partition("] ")
        if rest.strip().startswith("{"):
            records.append(json.loads(rest))
    mine = [r for r in records if r.get("execution_id") == eid]
    assert {r["service"] for r in mine} >= {"gateway", "pm", "codegen", "security", "database", "aggregator"}
    # Who asked for it: the gateway's line names the tenant (local mode's one here).
    assert [r["tenant"] for r in mine if r["msg"] == "accepted execution"] == ["local"]
    started = [r for r in mine if r["msg"].startswith("task started")]
    assert started and all({"task_id", "pool", "attempt"} <= r.keys() for r in started)
    # Each names the replica that ran it, as the attempt in the document does.
    workers = {(t["id"], a["n"]): a["worker"] for t in doc["tasks"] for a in t["attempts"]}
    assert all(r["worker"] == workers[r["task_id"], r["attempt"]] for r in started)


def test_the_pm_and_the_aggregator_export_their_model_costs_at_0_before_any_call(nats_url: str,
                                                                                  tmp_path: Path) -> None:
    # With a provider that plans and answers, the decomposition's and the synthesis' cost series exist from the start,
    # so the cost alert's increase() counts their first call. (The simulated provider makes neither call.)
    config = write_config(tmp_path / "config.json", {"provider": "anthropic", "anthropic": {
        "base_url": "http://127.0.0.1:9", "timeout_s": 1}})
    stack = start_stack(nats_url, "c" + uuid.uuid4().hex[:10], tmp_path, "--config", str(config),
                        env=stack_env(ANTHROPIC_API_KEY="sk-ant-unused"))
    try:
        all_ready(stack)
        pe = ParallelExecutionConfig()
        for child, phase, model in (("pm-1", "decomposition", pe.pm_coordinator.decomposition_model),
                                    ("aggregator-1", "synthesis", pe.pm_coordinator.synthesis_model)):
            text = httpx.get(f"http://127.0.0.1:{stack.state()['children'][child]['port']}/metrics").text  # type: ignore[index]
            assert f'openclaw_cost_usd_total{{model="{model}",pool="{phase}"}} 0.0' in text.splitlines()
    finally:
        assert stop_stack(stack) == 0, stack.output()[-3000:]


async def test_a_pool_whose_queue_cannot_be_read_exports_no_stale_depth(nc: NATS, names: Names, tmp_path: Path) -> None:
    # The last reading stayed: a replica cut off from NATS kept exporting its old backlog, which the backlog alerts
    # (the max over replicas) took for the pool's.
    rt = await service_runtime(nc, names, tmp_path, service="security")  # its durable does not exist: reads fail
    metrics.QUEUE_DEPTH.labels("security").set(5)
    metrics.ACK_PENDING.labels("security").set(2)

    def exported() -> set[str]:
        return {s.name for g in (metrics.QUEUE_DEPTH, metrics.ACK_PENDING) for m in g.collect() for s in m.samples
                if s.labels.get("pool") == "security"}

    watching = asyncio.ensure_future(watch_queue(rt, "security", every_s=0.01))
    try:
        await until(lambda: not exported(), 10, "the stale readings gone")
    finally:
        rt.stop.set()
        await watching
