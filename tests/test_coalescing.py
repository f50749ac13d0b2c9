"""The aggregator stores results that change nothing downstream together with the execution's next change."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from services.aggregator.handlers import AggregatorHandlers
from shared.execution import apply_plan, apply_result, new_execution
from shared.names import Names
from shared.providers import SimulatedProvider
from shared.schemas import (
    CancelExecution,
    Execution,
    ExecutionRequested,
    TaskCompleted,
    TaskFailed,
    TaskOutput,
    TaskSpec,
    TaskStarted,
    now,
)
from shared.service import Runtime
from tests.conftest import delivered, service_runtime, until

T0 = now()


def held() -> float:
    return REGISTRY.get_sample_value("openclaw_results_coalescing") or 0.0


THREE = [TaskSpec(id="api", pool="codegen", description="api"),
         TaskSpec(id="audit", pool="security", description="audit"),
         TaskSpec(id="db", pool="database", description="db")]
POOL = {t.id: t.pool for t in THREE}


def done(eid: str, task: str) -> TaskCompleted:
    return TaskCompleted(execution_id=eid, task_id=task, pool=POOL[task], attempt=1, worker="w", started_at=T0,
                         finished_at=T0 + timedelta(seconds=1), model="m", provider="simulated", cost_usd=0.25,
                         output=TaskOutput(summary=f"{task} done"))


@dataclass
class Aggregating:
    """One aggregator replica (in this process) and one planned execution, in the test's namespace."""

    rt: Runtime
    h: AggregatorHandlers
    eid: str
    created: int  # the revision of the execution as planned
    base: float  # openclaw_results_coalescing before the test

    @classmethod
    async def start(cls, nc: NATS, names: Names, tmp_path: Path, hold_s: float, specs: list[TaskSpec] = THREE,
                    mode: Literal["parallel", "serial"] = "parallel") -> Aggregating:
        rt = await service_runtime(nc, names, tmp_path, {"coalesce_results_s": hold_s})
        eid = uuid.uuid4().hex[:12]
        ex = new_execution(ExecutionRequested(execution_id=eid, message="m", mode=mode, requested_at=T0,
                                              deadline_at=T0 + timedelta(hours=1)))
        assert apply_plan(ex, specs, "client")
        created = await rt.executions.create(ex)
        return cls(rt, AggregatorHandlers(rt, SimulatedProvider(rt.settings.pe)), eid, created, held())

    async def delivered(self, *items: TaskCompleted | TaskFailed) -> list[Msg]:
        """``items`` published on the execution's results subject, each delivered once."""
        subject = self.rt.names.results(self.eid)
        for r in items:
            await self.rt.jetstream.publish(subject, r.to_bytes())
        sub = await self.rt.jetstream.pull_subscribe(subject, durable=f"d{self.eid}",
                                                     stream=self.rt.names.results_stream)
        msgs = await sub.fetch(len(items), timeout=5)
        assert len(msgs) == len(items)
        return msgs

    async def waiting(self, r: TaskCompleted, msg: Msg) -> asyncio.Task[None]:
        """``r`` handed to the aggregator, once the gauge shows it waiting."""
        before = held()
        handling = asyncio.create_task(self.h.on_result(r, msg))
        await until(lambda: held() == before + 1, 5, f"{r.task_id}'s result waiting")
        return handling

    async def cancel(self) -> None:
        names, cmd = self.rt.names, CancelExecution(execution_id=self.eid)
        await self.h.on_cancel(cmd, await delivered(self.rt, names.execution_cancel, cmd.to_bytes(),
                                                    names.executions_stream))

    async def stored(self) -> tuple[Execution, int]:
        """The execution as stored, and how many writes followed its plan (the test's bucket holds no
        other key, so revisions count the writes)."""
        current = await self.rt.executions.get(self.eid)
        assert current is not None
        return current[0], current[1] - self.created


@pytest.mark.parametrize("last", ["the last result", "a cancel"])
async def test_results_that_release_nothing_wait_and_are_stored_with_the_change_that_ends_it(
    nc: NATS, names: Names, tmp_path: Path, last: str,
) -> None:
    a = await Aggregating.start(nc, names, tmp_path, hold_s=10)
    api, audit, db = (done(a.eid, t) for t in ("api", "audit", "db"))
    m_api, m_audit, m_db = await a.delivered(api, audit, db)

    first = await a.waiting(api, m_api)
    second = await a.waiting(audit, m_audit)
    assert (await a.stored())[1] == 0  # neither stored yet: nothing downstream needed them
    if last == "a cancel":
        await a.cancel()
    else:
        await a.h.on_result(db, m_db)
    await asyncio.wait_for(asyncio.gather(first, second), 5)  # answered (and acked) by the same write

    assert held() == a.base
    final, n = await a.stored()
    assert n == 1  # one write for all of it
    statuses = {t.id: t.status for t in final.tasks}
    if last == "a cancel":
        assert final.status == "cancelled" and statuses == {"api": "completed", "audit": "completed",
                                                            "db": "cancelled"}
        assert final.cost.total_usd == pytest.approx(0.5)
    else:
        assert final.status == "completed" and set(statuses.values()) == {"completed"}
        assert final.cost.total_usd == pytest.approx(0.75)


@pytest.mark.parametrize("case", ["a dependent", "serial mode", "a retry"])
async def test_a_result_that_something_follows_is_stored_at_once(
    nc: NATS, names: Names, tmp_path: Path, case: str,
) -> None:
    mode: Literal["parallel", "serial"] = "parallel"
    specs, expected = THREE, {"api": "completed", "audit": "queued", "db": "queued"}
    if case == "a dependent":  # audit waits for api
        specs = [THREE[0], THREE[1].model_copy(update={"depends_on": ["api"]}), THREE[2]]
    elif case == "serial mode":  # one task at a time: api's end releases the next, audit
        mode, expected = "serial", {"api": "completed", "audit": "queued", "db": "pending"}
    else:  # the retry reads how this attempt failed
        expected = {"api": "retrying", "audit": "queued", "db": "queued"}
    a = await Aggregating.start(nc, names, tmp_path, 10, specs, mode)
    api: TaskCompleted | TaskFailed = done(a.eid, "api")
    if case == "a retry":
        api = TaskFailed(**api.model_dump(include={"execution_id", "task_id", "pool", "attempt", "worker",
                                                   "started_at", "finished_at"}),
                         error="overloaded", error_kind="overloaded", final=False, retry_in_s=1)
    [m_api] = await a.delivered(api)

    await asyncio.wait_for(a.h.on_result(api, m_api), 5)  # well within the 10 s a held result could wait

    ex, n = await a.stored()
    assert n == 1 and {t.id: t.status for t in ex.tasks} == expected


async def test_a_waiting_result_is_stored_on_its_own_when_nothing_else_comes(
    nc: NATS, names: Names, tmp_path: Path,
) -> None:
    a = await Aggregating.start(nc, names, tmp_path, hold_s=0.3)
    api = done(a.eid, "api")
    [m_api] = await a.delivered(api)

    await asyncio.wait_for(await a.waiting(api, m_api), 5)

    assert held() == a.base
    ex, n = await a.stored()
    assert n == 1 and ex.status == "running"
    assert {t.id: t.status for t in ex.tasks} == {"api": "completed", "audit": "queued", "db": "queued"}


async def test_a_cancel_that_joins_waiting_results_reads_the_execution_before_writing(
    nc: NATS, names: Names, tmp_path: Path,
) -> None:
    a = await Aggregating.start(nc, names, tmp_path, hold_s=10)
    api = done(a.eid, "api")
    [m_api] = await a.delivered(api)
    waiting = await a.waiting(api, m_api)
    # Meanwhile another replica stores audit's start: the version this one read is stale.
    audit = TaskStarted(execution_id=a.eid, task_id="audit", pool="security", attempt=1, worker="w2", started_at=T0)
    assert await a.rt.executions.mutate(a.eid, lambda ex: apply_result(ex, audit)) is not None
    lost = REGISTRY.get_sample_value("openclaw_kv_cas_conflicts_total") or 0.0

    await a.cancel()
    await asyncio.wait_for(waiting, 5)

    # Read first, so no write (and no answer) was made on the stale version.
    assert (REGISTRY.get_sample_value("openclaw_kv_cas_conflicts_total") or 0.0) == lost
    final, n = await a.stored()
    assert n == 2 and final.status == "cancelled"
    assert {t.id: t.status for t in final.tasks} == {"api": "completed", "audit": "cancelled", "db": "cancelled"}
    assert final.task("audit").attempts[0].worker == "w2"  # type: ignore[union-attr]
