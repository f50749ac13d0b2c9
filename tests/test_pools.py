"""Worker pools under load and failure: limits, retries, fallback, degradation, crashes, dead letters, deadlines.

Every test runs the real stack (`openclaw up`) with its own config and namespace; the services are
real processes, so a crash is a real kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from shared.bus import publish
from shared.schemas import CostIncurred, DeadLetter, TaskFailed, now
from tests.conftest import Stack, wait_until, write_config

pytestmark = pytest.mark.e2e


def ns() -> str:
    return "p" + uuid.uuid4().hex[:10]


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def run(stack: Stack, tasks: list[dict[str, Any]], timeout: float = 90) -> dict[str, Any]:
    r = httpx.post(f"{stack.url}/api/execute-parallel",
                   json={"message": "pool test", "tasks": tasks, "wait": True, "timeout_s": timeout},
                   timeout=timeout + 10)
    assert r.status_code == 200, r.text
    return r.json()


def submit(stack: Stack, tasks: list[dict[str, Any]]) -> str:
    r = httpx.post(f"{stack.url}/api/execute-parallel", json={"message": "pool test", "tasks": tasks}, timeout=30)
    assert r.status_code == 202, r.text
    return str(r.json()["execution_id"])


def get(stack: Stack, eid: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{stack.url}/api/execution/{eid}", timeout=10).json()
    return doc


def task(i: str, pool: str = "codegen", **simulate: Any) -> dict[str, Any]:
    return {"id": i, "pool": pool, "description": f"task {i}", "context": {"simulate": simulate}}


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def test_two_replicas_share_the_pool_limit(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path / "c.json", {"max_tasks_per_execution": 12})
    stack = stack_factory(ns(), "--config", str(cfg), "--replicas", "codegen=2")
    doc = run(stack, [task(f"t{i}", latency_s=1.0) for i in range(12)])
    assert doc["status"] == "completed"
    attempts = [a for t in doc["tasks"] for a in t["attempts"]]
    assert len(attempts) == 12
    intervals = [(ts(a["started_at"]), ts(a["finished_at"])) for a in attempts]
    assert max_overlap(intervals) == 3  # codegen's max_concurrent, across both replicas
    assert {a["worker"] for a in attempts} == {"codegen-1", "codegen-2"}
    span = (max(e for _, e in intervals) - min(s for s, _ in intervals)).total_seconds()
    # 12 one-second tasks, 3 at a time: about 4 s (at least 4 by the limit), far from the 12 s of one at a time;
    # the upper bound leaves room for a loaded machine.
    assert 4.0 <= span < 8.0, span


def test_retries_are_spaced_1s_then_3s_and_recorded(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(ns())
    doc = run(stack, [task("flaky", "database", latency_s=0, fail_attempts=2)])
    t = doc["tasks"][0]
    assert doc["status"] == "completed" and t["status"] == "completed"
    a1, a2, a3 = t["attempts"]
    assert [a["n"] for a in (a1, a2, a3)] == [1, 2, 3]
    assert [a["outcome"] for a in (a1, a2, a3)] == ["failed", "failed", "completed"]
    assert [a["strategy"] for a in (a1, a2)] == ["retry", "retry"]  # a model error, not busy/slow: no fallback
    assert a1["error"] == "simulated failure on attempt 1" and a1["error_kind"] == "simulated"
    assert all(a["model"] == "claude-sonnet-4-6" and a["duration_s"] is not None for a in (a1, a2, a3))
    gap1 = (ts(a2["started_at"]) - ts(a1["finished_at"])).total_seconds()
    gap2 = (ts(a3["started_at"]) - ts(a2["finished_at"])).total_seconds()
    # The broker holds each retry for its delay (lower bounds); the upper bounds only say "not the next delay".
    assert 0.95 <= gap1 < 2.9, gap1
    assert 2.95 <= gap2 < 8.9, gap2
    # Failed attempts that got an (unusable) answer are billed, and counted in the task's cost.
    assert t["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in (a1, a2, a3)))
    assert a1["cost_usd"] > 0


def test_exhausted_pools_degrade_as_the_seed_says(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path / "c.json", {"retries": {"max_retries": 1, "backoff_s": [0.2]}})
    stack = stack_factory(ns(), "--config", str(cfg))
    doc = run(stack, [
        task("api", "codegen", latency_s=0, fail_attempts=9),
        task("audit", "security", latency_s=0, fail_attempts=9),
        task("indexes", "database", latency_s=0, fail_attempts=9),
        task("docs", "codegen", latency_s=0),
    ])
    tasks = {t["id"]: t for t in doc["tasks"]}
    assert doc["status"] == "partial"
    expect = {"api": ("escalate", "pending"), "audit": ("skip", "unaudited"),
              "indexes": ("skip", "without optimization")}
    for tid, (resolution, label) in expect.items():
        t = tasks[tid]
        assert t["status"] == "failed" and len(t["attempts"]) == 2
        assert (t["resolution"], t["degradation"]) == (resolution, label)
        assert t["attempts"][-1]["strategy"] == resolution
    assert tasks["docs"]["status"] == "completed"
    failed_cost = sum(tasks[t]["cost_usd"] for t in expect)
    assert failed_cost > 0 and doc["refund_usd"] == pytest.approx(failed_cost)
    text = doc["final_response"]
    assert "unaudited" in text and "without optimization" in text
    assert "Decisions for you" in text and "api (codegen) is pending" in text
    assert f"Refund due: ${doc['refund_usd']:.4f}" in text


def test_all_tasks_failing_ends_failed(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path / "c.json", {"retries": {"max_retries": 0}})
    stack = stack_factory(ns(), "--config", str(cfg))
    doc = run(stack, [task("a", "codegen", latency_s=0, fail_attempts=1),
                      task("b", "security", latency_s=0, fail_attempts=1, error="overloaded")])
    assert doc["status"] == "failed"
    assert all(t["status"] == "failed" and len(t["attempts"]) == 1 for t in doc["tasks"])
    assert "couldn't get this one over the line" in doc["final_response"]


def test_hanging_task_times_out_retries_falls_back_then_fails(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path / "c.json", {
        "worker_pools": {"security": {"max_concurrent": 2, "timeout": 0.5}},
        "retries": {"max_retries": 2, "backoff_s": [0.2, 0.2]},
    })
    stack = stack_factory(ns(), "--config", str(cfg))
    doc = run(stack, [task("stuck", "security", hang=True)])
    t = doc["tasks"][0]
    assert doc["status"] == "failed" and t["status"] == "failed"
    assert [a["error"] for a in t["attempts"]] == ["timed out after 0.5s"] * 3
    assert [a["error_kind"] for a in t["attempts"]] == ["timeout"] * 3
    # The last attempt ran on the lighter model because the failures were timeouts.
    assert [a["model"] for a in t["attempts"]] == ["claude-sonnet-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"]
    assert [a["strategy"] for a in t["attempts"]] == ["retry", "fallback", "skip"]
    # Cut at the timeout: not before it, and not at the next heartbeat (10 s) or ack_wait (30 s) either. The margins
    # are for the two clocks (the timeout runs on the event loop's, the recorded times are wall clock, rounded) and
    # for a loaded machine, where a stall of a second has been seen.
    durations = [a["duration_s"] for a in t["attempts"]]
    assert all(0.49 <= d < 5 for d in durations), durations


def test_a_retry_sooner_than_the_aggregator_still_knows_how_the_attempt_before_failed(stack_factory,  # type: ignore[no-untyped-def]
                                                                                       tmp_path: Path) -> None:
    # No backoff: the redelivery comes before the aggregator has stored the refusal, and used to choose its model
    # without it — the pool's own, which had just declined, paid for again.
    cfg = write_config(tmp_path / "c.json", {"retries": {"max_retries": 2, "backoff_s": [0, 0]}})
    stack = stack_factory(ns(), "--config", str(cfg))
    doc = run(stack, [task(f"r{i}", "codegen", latency_s=0, fail_attempts=1, error="refusal") for i in range(3)])
    for t in doc["tasks"]:
        assert [(a["model"], a["error_kind"]) for a in t["attempts"]] == [
            ("claude-sonnet-4-6", "refusal"), ("claude-haiku-4-5", None)], t["id"]


def _wait_running(stack: Stack, eid: str, task_id: str) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        t = next(t for t in get(stack, eid)["tasks"] if t["id"] == task_id)
        return t if t["status"] == "running" else None

    found: dict[str, Any] = wait_until(running, 30, f"{task_id} to be running")
    return found


def test_a_replica_stopped_mid_task_hands_it_back_once_its_shutdown_grace_is_over(  # type: ignore[no-untyped-def]
        stack_factory, tmp_path: Path) -> None:
    # A rollout's SIGTERM. With no grace at all the running attempt is handed back at once, not finished; the
    # default (10 s) would have let this 3 s task finish.
    cfg = write_config(tmp_path / "c.json", {"shutdown_grace_s": 0})
    stack = stack_factory(ns(), "--config", str(cfg))
    eid = submit(stack, [task("long", latency_s=3)])
    _wait_running(stack, eid, "long")
    os.kill(stack.pid("codegen-1"), signal.SIGTERM)  # it drains, exits 0, and the runner starts it again
    doc = wait_until(lambda: (d := get(stack, eid))["status"] == "completed" and d, 30, "completion")
    first, second = doc["tasks"][0]["attempts"]
    # Cut off, its call is paid for what it had used (here the prompt: the simulated model read it at once), and
    # recorded as a failed attempt that runs again; it was lost at $0.
    assert first["outcome"] == "failed" and first["error"].startswith("cut off: the service stopped")
    assert first["cost_usd"] > 0 and first["usage"]["input_tokens"] > 0 and first["usage"]["estimated"]
    assert (second["outcome"], second["n"]) == ("completed", 2)
    assert doc["cost"]["total_usd"] == pytest.approx(first["cost_usd"] + second["cost_usd"], abs=1e-12)


def test_a_replica_stopped_on_a_tasks_last_attempt_fails_it_at_once(  # type: ignore[no-untyped-def]
        stack_factory, tmp_path: Path) -> None:
    # Reported as a retry, the cut attempt left the task "retrying" for a retry the broker would never deliver:
    # the execution waited for its deadline.
    cfg = write_config(tmp_path / "c.json", {"shutdown_grace_s": 0, "retries": {"max_retries": 0}})
    stack = stack_factory(ns(), "--config", str(cfg))
    eid = submit(stack, [task("long", latency_s=3)])
    _wait_running(stack, eid, "long")
    os.kill(stack.pid("codegen-1"), signal.SIGTERM)
    doc = wait_until(lambda: (d := get(stack, eid))["status"] != "running" and d, 20, "the execution to end")
    [t] = doc["tasks"]
    [cut] = t["attempts"]
    assert doc["status"] == "failed" and t["status"] == "failed", (doc["status"], t["status"])
    assert cut["outcome"] == "failed" and cut["error"].startswith("cut off: the service stopped")
    assert cut["cost_usd"] > 0 and doc["cost"]["total_usd"] == pytest.approx(cut["cost_usd"], abs=1e-12)


def test_killed_replica_mid_task_loses_nothing(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path / "c.json", {"ack_wait_s": 2})
    stack = stack_factory(ns(), "--config", str(cfg), "--replicas", "codegen=2")
    eid = submit(stack, [task("long", latency_s=3)])
    victim = _wait_running(stack, eid, "long")["worker"]
    os.kill(stack.pid(victim), signal.SIGKILL)
    killed_at = time.monotonic()
    doc = wait_until(lambda: (d := get(stack, eid))["status"] == "completed" and d, 30, "completion")
    assert time.monotonic() - killed_at < 2 + 3 + 5  # ack_wait + the task + margin
    t = doc["tasks"][0]
    lost, done = t["attempts"]
    assert lost["worker"] == victim and lost["outcome"] == "lost" and lost["cost_usd"] == 0
    assert done["outcome"] == "completed" and done["n"] == 2
    assert t["cost_usd"] == done["cost_usd"] and doc["cost"]["total_usd"] == done["cost_usd"]  # counted once


def test_a_paused_replica_leaves_its_task_to_the_redelivery(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A replica paused (SIGSTOP: a frozen VM, a stalled loop) past ack_wait: the broker hands its task to the
    # other replica. Resumed, it must neither run on beside the redelivery nor ack the task's message, which now
    # stands for the redelivery: that would free the pool's only slot while the redelivery still runs.
    cfg = write_config(tmp_path / "c.json", {"ack_wait_s": 2,
                                             "worker_pools": {"codegen": {"max_concurrent": 1, "timeout": 60}}})
    stack = stack_factory(ns(), "--config", str(cfg), "--replicas", "codegen=2")
    eid = submit(stack, [task("a", latency_s=4), task("b", latency_s=4)])
    first = wait_until(lambda: next((t for t in get(stack, eid)["tasks"] if t["status"] == "running"), None), 30,
                       "a task to be running")
    victim = first["worker"]
    os.kill(stack.pid(victim), signal.SIGSTOP)
    try:
        def redelivered() -> bool:
            t = next(t for t in get(stack, eid)["tasks"] if t["id"] == first["id"])
            return len(t["attempts"]) == 2 and t["attempts"][1]["outcome"] == "running"

        wait_until(redelivered, 30, "the broker to hand the task to the other replica")
    finally:
        os.kill(stack.pid(victim), signal.SIGCONT)
    doc = wait_until(lambda: (d := get(stack, eid))["status"] == "completed" and d, 60, "completion")
    attempts = [a for t in doc["tasks"] for a in t["attempts"]]
    assert max_overlap([(ts(a["started_at"]), ts(a["finished_at"])) for a in attempts]) == 1  # the pool's limit
    paused = next(t for t in doc["tasks"] if t["id"] == first["id"])["attempts"][0]
    assert (paused["worker"], paused["outcome"], paused["cost_usd"]) == (victim, "lost", 0)  # abandoned, not run on
    wait_until(lambda: "the broker handed the task on after" in stack.output(), 10, "the resumed replica's log")


def test_a_restarted_pool_starts_no_task_of_an_execution_that_ended_while_it_was_down(  # type: ignore[no-untyped-def]
        stack_factory, tmp_path: Path) -> None:
    # A pool learns endings from the completed events it follows from start-up; what was queued before
    # that (here: before its restart) it checks against the execution document instead.
    cfg = write_config(tmp_path / "c.json", {"ack_wait_s": 2,
                                             "worker_pools": {"database": {"max_concurrent": 1, "timeout": 60}}})
    stack = stack_factory(ns(), "--config", str(cfg))
    eid = submit(stack, [task("busy", "database", latency_s=30), task("waiting", "database", latency_s=0)])
    _wait_running(stack, eid, "busy")
    os.kill(stack.pid("database-1"), signal.SIGKILL)
    c = httpx.delete(f"{stack.url}/api/execution/{eid}", timeout=30)
    assert c.status_code == 200 and c.json()["status"] == "cancelled", c.text

    def lines(tid: str) -> list[str]:
        return [line for line in stack.output().splitlines() if f"execution_id={eid} task_id={tid}" in line]

    # The restarted replica gets "busy" again (after ack_wait) and then "waiting": it runs neither.
    wait_until(lambda: all(any("not started" in line for line in lines(t)) for t in ("busy", "waiting")), 30,
               "the restarted replica to turn both tasks away")
    assert [line for line in lines("busy") if "task started" in line] and "attempt=1" in lines("busy")[0]
    assert not [line for line in lines("busy") if "task started" in line and "attempt=2" in line]
    assert not [line for line in lines("waiting") if "task started" in line]
    assert [t["attempts"] for t in get(stack, eid)["tasks"] if t["id"] == "waiting"] == [[]]


def test_every_replica_killed_mid_task_restarts_and_completes(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path / "c.json", {"ack_wait_s": 2})
    stack = stack_factory(ns(), "--config", str(cfg), "--replicas", "database=2")
    eid = submit(stack, [task("m1", "database", latency_s=2), task("m2", "database", latency_s=2)])
    _wait_running(stack, eid, "m1")
    _wait_running(stack, eid, "m2")
    for name in ("database-1", "database-2"):
        os.kill(stack.pid(name), signal.SIGKILL)
    killed_at = time.monotonic()
    doc = wait_until(lambda: (d := get(stack, eid))["status"] == "completed" and d, 40, "completion")
    assert time.monotonic() - killed_at < 30  # redelivered after ack_wait to the restarted replicas
    for t in doc["tasks"]:
        assert [a["outcome"] for a in t["attempts"]] == ["lost", "completed"]
    assert doc["cost"]["total_usd"] == pytest.approx(sum(t["attempts"][1]["cost_usd"] for t in doc["tasks"]))
    assert "database-1 exited with status -9" in stack.output()


async def test_a_task_whose_worker_always_dies_is_dead_lettered_and_the_execution_told(  # type: ignore[no-untyped-def]
    stack_factory, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.json", {"ack_wait_s": 1, "retries": {"max_retries": 1}})
    stack = stack_factory(ns(), "--config", str(cfg))
    eid = submit(stack, [task("doomed", "security", latency_s=0, crash_attempts=5),
                         task("ok", "database", latency_s=0)])
    doc = wait_until(lambda: (d := get(stack, eid))["status"] in ("partial", "failed") and d, 60, "a terminal status")
    t = next(t for t in doc["tasks"] if t["id"] == "doomed")
    assert doc["status"] == "partial"
    assert t["status"] == "failed" and t["degradation"] == "unaudited"
    assert t["error"] == "dead-lettered: consumer security gave up after 2 deliveries (max_deliver)"
    assert [a["outcome"] for a in t["attempts"]] == ["lost", "failed"]

    nc = await nats.connect(str(stack.state()["nats_url"]))
    js = nc.jetstream()
    names = stack.names
    sub = await js.subscribe(names.dlq(names.tasks_stream, "security", "*"), deliver_policy=DeliverPolicy.ALL,
                             ordered_consumer=True)
    letter = DeadLetter.model_validate_json((await sub.next_msg(timeout=10)).data)
    assert letter.advisory == "io.nats.jetstream.advisory.v1.max_deliver" and letter.deliveries == 2
    assert eid in letter.payload and letter.subject == names.tasks("security")
    # The work queue no longer holds the message that ran out of deliveries.
    info = await js.stream_info(names.tasks_stream)
    assert info.state.messages == 0
    # Had the last delivery's worker been alive (its heartbeats unable to reach NATS), it would report that
    # attempt after all, with its own msg-id and a billed call: not a repeat of the dead letter's report.
    at = now()
    late = TaskFailed(execution_id=eid, task_id="doomed", pool="security", attempt=2, worker="security-1",
                      started_at=at, finished_at=at, error="invalid output", error_kind="invalid_output", final=True,
                      model="claude-sonnet-4-6", provider="anthropic", cost_usd=0.3)
    await publish(js, names.results(eid), late, late.msg_id())
    await nc.drain()
    doc = wait_until(lambda: (d := get(stack, eid))["tasks"][0]["attempts"][1]["cost_usd"] and d, 30, "its cost")
    t = next(t for t in doc["tasks"] if t["id"] == "doomed")
    assert t["status"] == "failed" and t["error"].startswith("dead-lettered")
    assert t["attempts"][1]["cost_usd"] == 0.3 and doc["cost"]["by_pool"]["security"] == pytest.approx(0.3)


async def test_a_task_whose_message_is_taken_twice_has_both_runs_recorded_and_paid_for(  # type: ignore[no-untyped-def]
    stack_factory,
) -> None:
    # A work queue forgets the msg-ids of the messages it has handed out across a restart or a leader change. An
    # aggregator's re-send of a task the document still shows queued is then a second message for the task, and a
    # second run, numbered attempt 1 again. Its reports had the first run's msg-ids: dropped as repeats, the run
    # was paid for and counted nowhere but the pool's metric. Here the repeat is published as the broker takes it.
    stack = stack_factory(ns())
    eid = submit(stack, [task("slow", "security", latency_s=2)])  # two slots: the runs overlap
    _wait_running(stack, eid, "slow")
    names = stack.names
    nc = await nats.connect(str(stack.state()["nats_url"]))
    js = nc.jetstream()
    first = await js.get_last_msg(names.tasks_stream, names.tasks("security"))  # held until its run is acked
    again = await js.publish(names.tasks("security"), first.data)
    events = await js.subscribe(names.cost_event(eid), deliver_policy=DeliverPolicy.ALL, ordered_consumer=True)

    def both_paid() -> dict[str, Any] | None:
        d = get(stack, eid)
        runs = d["tasks"][0]["attempts"]
        return d if d["status"] == "completed" and len(runs) == 2 and all(a["cost_usd"] for a in runs) else None

    doc = await asyncio.to_thread(wait_until, both_paid, 30, "both runs recorded with their cost")
    t = doc["tasks"][0]
    assert sorted((a["n"], a["run"]) for a in t["attempts"]) == [(1, first.seq), (1, again.seq)]
    assert any("message came twice" in (a["error"] or "") for a in t["attempts"])
    assert doc["cost"]["total_usd"] == pytest.approx(sum(a["cost_usd"] for a in t["attempts"]), abs=1e-12)
    costs = []
    while len(costs) < 2:
        event = CostIncurred.model_validate_json((await events.next_msg(timeout=10)).data)
        if event.phase == "task":
            costs.append(event)
    assert sorted((e.run, e.cost_usd) for e in costs) == sorted((a["run"], a["cost_usd"]) for a in t["attempts"])
    await nc.drain()


async def test_deadline_finishes_partial_with_what_is_done(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path / "c.json", {
        "execution_timeout_s": 4,  # time for the quick task on a loaded machine, well before the 10 s ones
        "worker_pools": {"database": {"max_concurrent": 1, "timeout": 60}},
    })
    stack = stack_factory(ns(), "--config", str(cfg))
    names = stack.names
    nc = await nats.connect(str(stack.state()["nats_url"]))
    js = nc.jetstream()
    began = time.monotonic()
    eid = submit(stack, [task("quick", "codegen", latency_s=0),
                         task("slow", "database", latency_s=10), task("starved", "database", latency_s=10)])
    # The deadline check waits in the stream as a message schedule, not in the aggregator's consumer.
    scheduled = await js.get_last_msg(names.executions_stream, names.execution_deadline_schedule(eid))
    assert scheduled.headers and scheduled.headers["Nats-Schedule-Target"] == names.execution_deadline
    assert scheduled.headers["Nats-Schedule"].startswith("@at ")
    doc = wait_until(lambda: (d := get(stack, eid))["status"] == "partial" and d, 20, "the deadline")
    assert time.monotonic() - began < 9  # the deadline (4 s) ended it, not the 10 s tasks
    # The aggregator acks the check after the answer is stored and announced: a moment after "partial" shows.
    for _ in range(1000):
        checks = await js.consumer_info(names.executions_stream, names.deadlines_consumer)
        if checks.num_ack_pending == 0:
            break
        await asyncio.sleep(0.01)
    await nc.drain()
    assert checks.delivered.consumer_seq == 1 and checks.num_ack_pending == 0  # delivered once: when due
    tasks = {t["id"]: t for t in doc["tasks"]}
    assert doc["status"] == "partial"
    assert tasks["quick"]["status"] == "completed"
    assert tasks["slow"]["status"] == "failed"  # its worker's own timeout stops at the deadline
    assert tasks["starved"]["status"] == "failed" and tasks["starved"]["attempts"] == []
    assert tasks["starved"]["error"] == "execution deadline exceeded"  # never got a slot: the deadline check
    assert (ts(doc["finished_at"]) - ts(doc["created_at"])).total_seconds() < 9


async def test_the_deadline_check_of_a_finished_execution_publishes_nothing(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The check comes execution_timeout_s after acceptance, by default long after the events stream's duplicate
    # window: announcing a finished execution again then would store a second final event (and its cost events).
    cfg = write_config(tmp_path / "c.json", {"execution_timeout_s": 2})
    stack = stack_factory(ns(), "--config", str(cfg))
    names = stack.names
    nc = await nats.connect(str(stack.state()["nats_url"]))
    js = nc.jetstream()
    doc = run(stack, [task("a", "codegen"), task("b", "security")])
    assert doc["status"] == "completed"
    eid = doc["execution_id"]
    published: list[str] = []

    async def seen(msg: Msg) -> None:
        published.append(msg.subject)

    # The waiting client was answered from the stored answer, before the aggregator announced it: let it.
    for _ in range(200):
        with contextlib.suppress(NotFoundError):
            await js.get_last_msg(names.events_stream, names.completed_event(eid))
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the execution's end was never announced")
    await nc.subscribe(names.events(eid, "*"), cb=seen)  # core: sees a publish even if the stream drops it
    deadline = time.monotonic() + 20
    while True:  # until the aggregator has been handed the check and acked it
        info = await js.consumer_info(names.executions_stream, names.deadlines_consumer)
        if info.delivered.consumer_seq >= 1 and info.num_ack_pending == 0 and info.num_pending == 0:
            break
        assert time.monotonic() < deadline, "the deadline check was not delivered and acked within 20 s"
        await asyncio.sleep(0.05)
    await nc.flush()
    assert published == []
    assert get(stack, eid)["status"] == "completed"
    await nc.drain()


def test_an_unplanned_execution_is_announced_when_cancelled_or_at_its_deadline(  # type: ignore[no-untyped-def]
        stack_factory, tmp_path: Path) -> None:
    # With the PM paused nothing is planned: the aggregator ends the execution itself, and the final event
    # it announces is what the gateway's waiting DELETE and POST return.
    cfg = write_config(tmp_path / "c.json", {"execution_timeout_s": 3})
    stack = stack_factory(ns(), "--config", str(cfg))
    os.kill(stack.pid("pm-1"), signal.SIGSTOP)
    try:
        cancelled = submit(stack, [task("a")])
        r = httpx.delete(f"{stack.url}/api/execution/{cancelled}", params={"wait_s": 10}, timeout=20)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled" and r.json()["tasks"] == []
        r = httpx.post(f"{stack.url}/api/execute-parallel", timeout=30,
                       json={"message": "m", "tasks": [task("a")], "wait": True, "timeout_s": 15})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "failed"
        assert r.json()["error"] == "no plan was made before the execution deadline"
    finally:
        os.kill(stack.pid("pm-1"), signal.SIGCONT)
