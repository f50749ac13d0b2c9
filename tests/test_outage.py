"""The whole stack through a NATS crash: the server is killed (SIGKILL) and started again on the same store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from services.aggregator.handlers import AggregatorHandlers
from services.codegen.prompts import format_prompt
from shared import metrics
from shared.execution import apply_plan, apply_result, new_execution, run_command
from shared.names import Names
from shared.natsserver import NatsServer
from shared.pool import Endings, PoolWorker
from shared.providers import AnthropicProvider, SimulatedProvider
from shared.schemas import (
    ExecutionDeadline,
    ExecutionRequested,
    TaskCompleted,
    TaskFailed,
    TaskOutput,
    TaskSpec,
    now,
)
from shared.service import Runtime
from tests.conftest import (
    Stack,
    delivered,
    service_runtime,
    stack_env,
    start_stack,
    stop_stack,
    until,
    wait_until,
    write_config,
)
from tests.fake_anthropic import FakeAnthropic, Kind

pytestmark = pytest.mark.e2e

PLAN = [{"id": pool, "pool": pool, "description": "x", "context": {"simulate": {"latency_s": 0}}}
        for pool in ("codegen", "security", "database")]


def test_executions_complete_again_after_nats_crashes_and_comes_back(tmp_path: Path) -> None:
    # A crashed server ends nobody's pull requests (one that shuts down sends 409s): every consumer loop has
    # to notice its request is gone. The gateway answers 503 until it is connected again.
    server = NatsServer(tmp_path / "store").start()
    stack = start_stack(server.url, "outage" + uuid.uuid4().hex[:8], tmp_path)
    url = f"{stack.url}/api/execute-parallel"
    try:
        before = httpx.post(url, json={"message": "m", "tasks": PLAN, "wait": True}, timeout=30)
        assert before.json()["status"] == "completed", before.text
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        server.start()
        answers: list[int] = []

        def completed() -> bool:
            r = httpx.post(url, json={"message": "m", "tasks": PLAN, "wait": True}, timeout=30)
            answers.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"] == "unavailable" and "not connected to NATS" in r.json()["message"]
                return False
            assert r.status_code == 200, r.text
            return bool(r.json()["status"] == "completed")

        started = time.monotonic()
        wait_until(completed, 60, "an execution completed after the crash")
        assert set(answers) <= {200, 503}, answers
        assert time.monotonic() - started < 30  # the consumers noticed within seconds, not at a timeout
    finally:
        code = stop_stack(stack)
        server.stop()
    assert code == 0, stack.output()[-3000:]


@contextlib.asynccontextmanager
async def parked(js: JetStreamContext, stream: str, names: Names) -> AsyncIterator[None]:
    """``stream`` takes no publish while the block runs (its subjects moved aside), as on a cluster that lost
    its quorum; what it holds can still be read."""
    config = (await js.stream_info(stream)).config
    subjects, config.subjects = config.subjects, [f"{names.namespace}.parked"]
    await js.update_stream(config)
    try:
        yield
    finally:
        config.subjects = subjects
        await js.update_stream(config)


async def ended(client: httpx.AsyncClient, eid: str, status: str) -> dict[str, Any]:
    """The execution's document once it has ``status``."""

    async def got() -> dict[str, Any] | None:
        doc: dict[str, Any] = (await client.get(f"/api/execution/{eid}")).json()
        return doc if doc.get("status") == status else None  # not a 503 while the gateway reconnects

    return await until(got, 30, f"the execution to end {status}")


@dataclass
class Running:
    server: NatsServer
    stack: Stack
    js: JetStreamContext
    client: httpx.AsyncClient  # to the stack's gateway


@contextlib.asynccontextmanager
async def running(tmp_path: Path, prefix: str, *args: str, env: dict[str, str] | None = None
                  ) -> AsyncIterator[Running]:
    """A stack on a nats-server of its own (which a test may park streams of); it must exit 0 when stopped."""
    server = NatsServer(tmp_path / "store").start()
    stack = start_stack(server.url, prefix + uuid.uuid4().hex[:8], tmp_path, *args, env=env)
    nc = await nats.connect(server.url)
    try:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
            yield Running(server, stack, nc.jetstream(), client)
    finally:
        await nc.close()  # in any state (a test may have restarted the server under it)
        code = stop_stack(stack)
        server.stop()
    assert code == 0, stack.output()[-3000:]


async def paid_while_parked(run: Running, fake: FakeAnthropic, body: dict[str, Any], kind: Kind, stream: str,
                            what: str, status: str) -> dict[str, Any]:
    """Submit ``body``; once the model's ``kind`` call is under way, park ``stream`` and let the call answer;
    after two failed tries to ``what``, bring the stream back. Returns the document once it ends ``status``."""
    r = await run.client.post("/api/execute-parallel", json=body)
    assert r.status_code == 202, r.text
    await until(lambda: len(fake.of(kind)) == 1, 30, f"the model's {kind} call")
    async with parked(run.js, stream, run.stack.names):
        fake.release.set()
        await until(lambda: run.stack.output().count(f"could not {what}") >= 2, 30, "failed tries")
    return await ended(run.client, r.json()["execution_id"], status)


def test_an_event_stream_open_through_a_nats_crash_goes_on_with_the_events_after_it(tmp_path: Path) -> None:
    # The stream's ordered consumer is gone with the crashed server, and nothing says so but its missed heartbeats:
    # without them the client heard nothing more until the keep-alive found the execution over.
    server = NatsServer(tmp_path / "store").start()
    stack = start_stack(server.url, "sse" + uuid.uuid4().hex[:8], tmp_path)
    chain = [{"id": "a", "pool": "codegen", "description": "x", "context": {"simulate": {"latency_s": 0}}},
             {"id": "b", "pool": "database", "description": "y", "depends_on": ["a"],
              "context": {"simulate": {"latency_s": 3}}}]
    try:
        r = httpx.post(f"{stack.url}/api/execute-parallel", json={"message": "m", "tasks": chain}, timeout=30)
        assert r.status_code == 202, r.text
        eid, got = r.json()["execution_id"], []
        with httpx.stream("GET", f"{stack.url}/api/execution/{eid}/events",
                          timeout=httpx.Timeout(10, read=60)) as stream:
            kind, crashed = "", False
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("id:"):
                    got.append(kind)
                elif line.startswith("data:") and kind == "started" and '"b"' in line and not crashed:
                    assert server.proc is not None  # b runs: what comes next is published after the restart
                    server.proc.kill()
                    server.proc.wait()
                    server.start()
                    crashed = True
        assert crashed, got
        after = got[got.index("started", got.index("released")):]
        assert "task_completed" in after and after[-1] == "completed", got  # each with its id, from the stream
    finally:
        code = stop_stack(stack)
        server.stop()
    assert code == 0, stack.output()[-3000:]


@pytest.mark.parametrize("kind", ["task", "plan", "synthesis"])
async def test_what_a_paid_call_produced_waits_for_its_stream_instead_of_being_paid_for_again(
    tmp_path: Path, kind: Kind, fake_anthropic: FakeAnthropic,
) -> None:
    # The model answers while the stream it goes to takes nothing (as on a cluster that lost its quorum: every
    # publish fails, none is kept for later): the task's result, or the plan or the answer (in the execution's
    # document). It is kept and stored once the stream is back. Handing the message back instead would run (and
    # bill) the call again on every delivery.
    fake = fake_anthropic
    fake.next(kind, "slow")  # answers once fake.release is set
    config = write_config(tmp_path / "config.json", {"provider": "anthropic",
                                                     "anthropic": {"base_url": fake.url, "timeout_s": 60}})
    async with running(tmp_path, "paid", "--config", str(config),
                       env=stack_env(ANTHROPIC_API_KEY="sk-ant-outage")) as run:
        names = run.stack.names
        stream, what = {"task": (names.results_stream, "publish the result"),
                        "plan": (names.kv_stream, "store the plan"),
                        "synthesis": (names.kv_stream, "store the execution")}[kind]
        plan = [{"id": "api", "pool": "codegen", "description": "Build the ordering REST API"}]
        body = {"message": "Build a restaurant website", **({"tasks": plan} if kind != "plan" else {})}
        doc = await paid_while_parked(run, fake, body, kind, stream, what, "completed")
    assert len(fake.of(kind)) == 1  # one call, paid once
    if kind == "task":
        [task] = doc["tasks"]
        [attempt] = task["attempts"]
        assert attempt["outcome"] == "completed" and attempt["cost_usd"] > 0
        assert doc["cost"]["by_phase"]["tasks"] == pytest.approx(attempt["cost_usd"], abs=1e-12)
    elif kind == "synthesis":
        [synthesis] = doc["calls"]
        assert synthesis["phase"] == "synthesis" and synthesis["error"] is None and synthesis["cost_usd"] > 0
        assert doc["final_response"].startswith(fake.synthesis_text)
    else:
        assert doc["planner"] == "llm" and [t["id"] for t in doc["tasks"]] == ["schema", "api", "audit"]
        [decomposition] = [c for c in doc["calls"] if c["phase"] == "decomposition"]
        assert decomposition["cost_usd"] > 0 and decomposition["error"] is None
        assert doc["cost"]["by_phase"]["decomposition"] == pytest.approx(decomposition["cost_usd"], abs=1e-12)


async def test_a_cost_event_that_cannot_be_sent_does_not_cost_its_result(
    tmp_path: Path, names: Names, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The model answers while the worker is cut off from NATS with its reconnect buffer full, so the cost event
    # cannot even be queued. The event is dropped; the result it reports on waits for the server and is stored
    # once, from the one call. Raising instead would hand the task back and pay for the call again.
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-outage")
    server = NatsServer(tmp_path / "store").start()
    nc = await nats.connect(server.url, pending_size=64, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        rt = await service_runtime(nc, names, tmp_path, {"provider": "anthropic", "anthropic": {
            "base_url": fake_anthropic.url, "timeout_s": 60}}, service="codegen")
        t0 = now()
        ex = new_execution(ExecutionRequested(execution_id="cut0ff", message="m", requested_at=t0,
                                              deadline_at=t0 + timedelta(minutes=5)))
        apply_plan(ex, [TaskSpec(id="api", pool="codegen", description="Build the ordering REST API")], "client")
        await rt.executions.create(ex)
        cmd = run_command(ex, ex.tasks[0])
        fake_anthropic.next("task", "slow")
        msg = await delivered(rt, names.tasks("codegen"), cmd.to_bytes(), names.tasks_stream)
        provider = AnthropicProvider(rt.pe, "sk-ant-outage")
        handled = asyncio.create_task(PoolWorker(rt, "codegen", format_prompt, provider, Endings(300)).handle(cmd, msg))
        await until(lambda: len(fake_anthropic.of("task")) == 1, 10, "the model's call")
        dropped = metrics.EVENTS_DROPPED._value.get()
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        await until(lambda: nc.is_reconnecting, 10, "the client to notice")
        fake_anthropic.release.set()
        await until(lambda: metrics.EVENTS_DROPPED._value.get() > dropped, 10, "the cost event to be dropped")
        server.start()
        await asyncio.wait_for(handled, 30)  # neither raised (a nak) nor gave up on the result
        await provider.aclose()
        results = await rt.jetstream.subscribe(names.results("cut0ff"), stream=names.results_stream,
                                               ordered_consumer=True)
        reports = [(await results.next_msg(timeout=5)).data]
        while b'"task.completed"' not in reports[-1]:  # after its start, had the call run 0.1 s before the kill
            reports.append((await results.next_msg(timeout=5)).data)
        done = TaskCompleted.model_validate_json(reports[-1])
        await results.unsubscribe()
    finally:
        await nc.close()
        server.stop()
    assert len(fake_anthropic.of("task")) == 1  # one call, paid once
    assert done.task_id == "api" and done.cost_usd > 0


@contextlib.asynccontextmanager
async def retried_during_an_outage(tmp_path: Path, names: Names, caplog: pytest.LogCaptureFixture,
                                   cfg: dict[str, Any] | None = None) -> AsyncIterator[tuple[Runtime, Msg]]:
    """A task's second delivery (its first attempt stored as failed) handed to a pool worker (configured with ``cfg``)
    once its nats-server is gone, and the server started again after the worker's first read of the task's state
    failed; yields the runtime and the delivery's message once the worker is done with it."""
    caplog.set_level(logging.WARNING, "shared.consumer")
    server = NatsServer(tmp_path / "store").start()
    nc = await nats.connect(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        rt = await service_runtime(nc, names, tmp_path, cfg, service="codegen")
        t0 = now()
        ex = new_execution(ExecutionRequested(execution_id="unread", message="m", requested_at=t0,
                                              deadline_at=t0 + timedelta(minutes=5)))
        apply_plan(ex, [TaskSpec(id="api", pool="codegen", description="Build the ordering REST API",
                                 context={"simulate": {"latency_s": 0}})], "client")
        apply_result(ex, TaskFailed(execution_id="unread", task_id="api", pool="codegen", attempt=1, worker="w",
                                    started_at=t0, finished_at=t0, error="busy", error_kind="overloaded", final=False,
                                    strategy="retry"))
        await rt.executions.create(ex)
        cmd = run_command(ex, ex.tasks[0])
        msg = await delivered(rt, names.tasks("codegen"), cmd.to_bytes(), names.tasks_stream, times=2)
        server.stop()
        await until(lambda: nc.is_reconnecting, 10, "the client to notice")
        worker = PoolWorker(rt, "codegen", format_prompt, SimulatedProvider(rt.pe), Endings(300))
        handled = asyncio.create_task(worker.handle(cmd, msg))
        await until(lambda: handled.done() or "could not read the task's state" in caplog.text, 30, "a failed read")
        server.start()
        await asyncio.wait_for(handled, 30)  # did not raise, which would hand the message back
        await until(lambda: nc.is_connected, 10, "the client to reconnect")
        yield rt, msg
    finally:
        try:
            await nc.close()
        finally:
            server.stop()  # also when the client's close fails (mid-reconnect): no server left behind


async def test_a_retry_that_cannot_read_the_store_waits_for_it_instead_of_using_up_an_attempt(
    tmp_path: Path, names: Names, caplog: pytest.LogCaptureFixture,
) -> None:
    # A retry reads the task's state before it starts (its model depends on how the attempt before it failed), and
    # NATS is gone when it does. The delivery waits for NATS and then runs. Handed back, it would count as one of the
    # task's attempts with none run, and on the last one the broker would dead-letter the task.
    async with retried_during_an_outage(tmp_path, names, caplog) as (rt, msg):
        results = await rt.jetstream.subscribe(names.results("unread"), stream=names.results_stream,
                                               ordered_consumer=True)
        done = TaskCompleted.model_validate_json((await results.next_msg(timeout=5)).data)
        await results.unsubscribe()
        assert msg.metadata.consumer is not None
        info = await rt.jetstream.consumer_info(names.tasks_stream, msg.metadata.consumer)
    assert (done.task_id, done.attempt) == ("api", 2)
    assert info.num_ack_pending == 0 and info.delivered.consumer_seq == 2  # acknowledged, not delivered again


@pytest.mark.parametrize("ack_wait_s", [3, 8], ids=["given-up", "out-of-reach"])
async def test_a_retry_whose_reads_outlast_their_window_leaves_the_task_to_its_redelivery(
    tmp_path: Path, names: Names, caplog: pytest.LogCaptureFixture, ack_wait_s: float,
) -> None:
    # The same, but the reads' window (a third of ack_wait) is over when the first read fails, 5 s on (its request
    # times out while the client reconnects). With an ack_wait of 3 s nothing was heard from the delivery for longer
    # than 0.9 × that: the broker may have handed the task on. With 8 s, NATS is still out of reach: a nak would be
    # sent on reconnect, maybe once the broker has handed the task on, which would act on it all the same. Either way
    # the delivery neither runs the task (its first heartbeat could abandon the run, paid for) nor acts on the message:
    # the broker redelivers it after ack_wait.
    started = metrics.TASKS.labels("codegen", "started")._value.get()
    async with retried_during_an_outage(tmp_path, names, caplog, {"ack_wait_s": ack_wait_s}) as (_, msg):
        pass
    assert metrics.TASKS.labels("codegen", "started")._value.get() == started  # not run
    assert not msg.is_acked  # neither acknowledged nor handed back


async def test_an_answer_due_at_the_deadline_waits_for_its_stream_too(tmp_path: Path,
                                                                     fake_anthropic: FakeAnthropic) -> None:
    # The deadline's check ends an execution whose second task still runs, and the aggregator's answer (a paid
    # synthesis call) cannot be stored: its write is tried again past the deadline, not handed back to be
    # answered, and paid for, on the next delivery. (The deadline leaves the first task time to complete on a
    # loaded machine: with none completed the answer is the template's, and no synthesis call comes.)
    fake = fake_anthropic
    fake.next("task", "ok", "slow")  # the audit's call is still running at the deadline
    fake.next("synthesis", "slow")  # and the answer comes once the store has gone
    config = write_config(tmp_path / "config.json", {"provider": "anthropic", "execution_timeout_s": 6,
                                                     "anthropic": {"base_url": fake.url, "timeout_s": 60}})
    async with running(tmp_path, "due", "--config", str(config),
                       env=stack_env(ANTHROPIC_API_KEY="sk-ant-outage")) as run:
        plan = [{"id": "api", "pool": "codegen", "description": "Build the ordering REST API"},
                {"id": "audit", "pool": "security", "description": "Audit the payment flow", "depends_on": ["api"]}]
        doc = await paid_while_parked(run, fake, {"message": "Build a website", "tasks": plan}, "synthesis",
                                      run.stack.names.kv_stream, "store the execution", "partial")
    assert len(fake.of("synthesis")) == 1  # one answer, paid once
    [synthesis] = doc["calls"]
    assert synthesis["phase"] == "synthesis" and synthesis["error"] is None
    assert [t["status"] for t in doc["tasks"]] == ["completed", "failed"]


async def test_results_waiting_behind_a_write_that_waits_for_its_stream_are_not_redelivered(
    nc: NATS, names: Names, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # The first result's write waits for the store (parked, as on a cluster without quorum); a second result of
    # the same execution waits for the write after it. Both messages are kept alive meanwhile: redelivered every
    # ack_wait, the second would pile up handlers and, after max_deliver, be dead-lettered although it is applied.
    rt = await service_runtime(nc, names, tmp_path, {"ack_wait_s": 1, "coalesce_results_s": 0})
    t0 = now()
    ex = new_execution(ExecutionRequested(execution_id="queued", message="m", requested_at=t0,
                                          deadline_at=t0 + timedelta(minutes=5)))
    apply_plan(ex, [TaskSpec(id="api", pool="codegen", description="api"),
                    TaskSpec(id="audit", pool="security", description="audit")], "client")
    await rt.executions.create(ex)
    results = [TaskCompleted(execution_id="queued", task_id=t.id, pool=t.pool, attempt=1, worker="w", started_at=t0,
                             finished_at=t0, model="m", provider="simulated", output=TaskOutput(summary="done"))
               for t in ex.tasks]
    for r in results:
        await rt.jetstream.publish(names.results("queued"), r.to_bytes())
    sub = await rt.jetstream.pull_subscribe(names.results("queued"), durable="queued", stream=names.results_stream,
                                            config=ConsumerConfig(ack_wait=1))
    msgs = await sub.fetch(2, timeout=5)
    agg = AggregatorHandlers(rt, SimulatedProvider(rt.pe))
    async with parked(rt.jetstream, names.kv_stream, names):
        first = asyncio.create_task(agg.on_result(results[0], msgs[0]))
        await until(lambda: "could not store the execution" in caplog.text, 10, "the write to fail")
        second = asyncio.create_task(agg.on_result(results[1], msgs[1]))
        with pytest.raises(nats.errors.TimeoutError):  # three times ack_wait: neither message comes again
            await sub.fetch(1, timeout=3)
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    await sub.unsubscribe()
    stored = await rt.executions.get("queued")
    assert stored is not None and stored[0].status == "completed"
    assert all(m.metadata.num_delivered == 1 for m in msgs)


async def test_a_request_the_stream_cannot_take_leaves_nothing_stored_and_can_be_sent_again(tmp_path: Path) -> None:
    # The requests' stream takes nothing (a cluster that lost its quorum): the gateway says so, and stores no
    # execution that nothing would ever plan or end. Sent again once the stream is back, the request runs.
    key = {"Idempotency-Key": "order-" + uuid.uuid4().hex}
    body = {"message": "m", "tasks": PLAN, "wait": True}
    async with running(tmp_path, "queue") as run:
        async with parked(run.js, run.stack.names.executions_stream, run.stack.names):
            refused = await run.client.post("/api/execute-parallel", json=body, headers=key)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "unavailable" and "retry" in refused.json()["message"]
        with pytest.raises(nats.js.errors.NoKeysError):
            await (await run.js.key_value(run.stack.names.kv_bucket)).keys()  # no execution stored, queued forever
        again = await run.client.post("/api/execute-parallel", json=body, headers=key)
        assert again.status_code == 200 and again.json()["status"] == "completed", again.text


async def test_a_request_sent_again_after_its_execution_could_not_be_stored_keeps_the_new_deadline(
    tmp_path: Path,
) -> None:
    # The first try stored its deadline check, then not the execution (the store took nothing). The second try's
    # check is dropped as a repeat of the first (its msg-id): the check must still be due at the deadline the
    # stored execution has, not at the first try's.
    key = {"Idempotency-Key": "order-" + uuid.uuid4().hex}
    body = {"message": "m", "tasks": [{**PLAN[0], "context": {"simulate": {"latency_s": 30}}}]}
    async with running(tmp_path, "again") as run:
        names = run.stack.names
        async with parked(run.js, names.kv_stream, names):
            refused = await run.client.post("/api/execute-parallel", json=body, headers=key)
        assert refused.status_code == 503, refused.text
        accepted = await run.client.post("/api/execute-parallel", json=body, headers=key)
        assert accepted.status_code == 202, accepted.text
        doc = accepted.json()
        schedule = names.execution_deadline_schedule(doc["execution_id"])
        check = await run.js.get_last_msg(names.executions_stream, schedule)
        assert check.data is not None
        assert ExecutionDeadline.model_validate_json(check.data).deadline_at == datetime.fromisoformat(
            doc["deadline_at"])


async def test_a_task_longer_than_ack_wait_runs_once_through_a_nats_restart(tmp_path: Path) -> None:
    # While the pool reconnects its heartbeats cannot reach the broker; the first one after does. So the broker
    # never hands the task on, the worker does not take itself for given up, and the result it publishes
    # after the restart is the task's only attempt: run and paid for once. The task outlasts ack_wait, so
    # without beats that count after the restart it would be redelivered.
    cfg = write_config(tmp_path / "c.json", {"ack_wait_s": 6})
    body = {"message": "m", "tasks": [{**PLAN[0], "context": {"simulate": {"latency_s": 9}}}]}
    async with running(tmp_path, "blip", "--config", str(cfg)) as run:
        eid = (await run.client.post("/api/execute-parallel", json=body)).json()["execution_id"]

        async def started() -> bool:
            return bool((await run.client.get(f"/api/execution/{eid}")).json()["tasks"][0]["status"] == "running")

        await until(started, 30, "the task to be running")
        run.server.stop()  # gracefully: what the broker knows (the delivery, its ack wait) is kept
        run.server.start()
        doc = await ended(run.client, eid, "completed")
    [attempt] = doc["tasks"][0]["attempts"]
    assert (attempt["outcome"], attempt["n"]) == ("completed", 1)
    assert doc["cost"]["total_usd"] == attempt["cost_usd"] > 0


async def test_a_request_taken_before_nats_went_away_is_answered_202_not_503(tmp_path: Path) -> None:
    # Its wait ran out while NATS was away, and the read for the answer failed: a 503 told the client to send
    # the request again, and without an Idempotency-Key that ran it twice.
    body = {"message": "m", "wait": True, "timeout_s": 2,
            "tasks": [{**PLAN[0], "context": {"simulate": {"latency_s": 4}}}]}
    async with running(tmp_path, "taken") as run:
        answer = asyncio.ensure_future(run.client.post("/api/execute-parallel", json=body))
        bucket = await run.js.key_value(run.stack.names.kv_bucket)

        async def stored() -> str | None:
            with contextlib.suppress(nats.js.errors.NoKeysError):
                [key] = await bucket.keys()
                return key
            return None

        eid = await until(stored, 30, "the execution stored")
        await ended(run.client, eid, "running")  # planned, its task under way
        assert run.server.proc is not None
        run.server.proc.kill()
        run.server.proc.wait()
        r = await answer
        run.server.start()
        assert r.status_code == 202, r.text
        assert r.json()["execution_id"] == eid
        assert "answering with the version known" in run.stack.output()
