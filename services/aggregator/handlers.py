"""Task results → execution state → released tasks → (when all are terminal) the final response."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from services.aggregator.aggregate import aggregate
from services.aggregator.synthesis import write_answer
from shared import metrics
from shared.bus import publish
from shared.consumer import keep_alive
from shared.costs import call_event, publish_cost
from shared.execution import all_tasks_terminal, apply_result, outcome, queued, run_command, run_msg_id
from shared.providers import ModelProvider
from shared.schemas import Execution, TaskCompleted, TaskFailed, TaskStarted, now
from shared.service import Runtime

log = logging.getLogger(__name__)
HEARTBEAT_S = 10.0  # a third of the aggregator durable's ack_wait: a long synthesis call is not redelivered


class AggregatorHandlers:
    def __init__(self, rt: Runtime, provider: ModelProvider) -> None:
        self.rt, self.provider = rt, provider

    async def on_result(self, r: TaskStarted | TaskCompleted | TaskFailed, msg: Msg) -> None:
        """Apply one result; release what it unblocks; finish the execution when nothing is left."""
        store, js, names = self.rt.executions, self.rt.jetstream, self.rt.names
        ex = await store.mutate(r.execution_id, lambda ex: apply_result(ex, r))
        if ex is None:
            log.warning("result for unknown execution", extra={"execution_id": r.execution_id})
            await msg.ack()
            return
        # Published after the state that releases them is stored, and before the ack: a crash in between
        # replays the result, and msg-id dedup turns the second publish into a no-op.
        await asyncio.gather(*(
            publish(js, names.tasks(t.pool), run_command(ex, t), run_msg_id(ex.execution_id, t.id))
            for t in queued(ex) if t.depends_on
        ))
        if all_tasks_terminal(ex):
            await self._finish(ex, msg)
        await msg.ack()

    async def _finish(self, snapshot: Execution, msg: Msg) -> None:
        """Aggregate, synthesize and store the final answer (once), then announce it."""
        if snapshot.terminal:  # finished before (a replay): announce again, call and write nothing
            await self._announce(snapshot)
            return
        status = outcome(snapshot)
        agg = aggregate(snapshot)
        async with keep_alive(msg, HEARTBEAT_S):
            text, call = await write_answer(snapshot, agg, status, self.rt.pe, self.provider)
        won = False

        def finish(ex: Execution) -> bool:
            nonlocal won
            won = not ex.terminal  # re-run on every compare-and-set retry: the last run tells
            if not won:
                return False  # another replica finished first: its answer and its call stand, ours are dropped
            ex.status, ex.aggregated, ex.final_response = status, agg, text  # type: ignore[assignment]
            if call is not None:
                ex.calls.append(call)  # in the same compare-and-set write as the answer: counted once
            ex.finished_at = ex.updated_at = now()
            return True

        ex = await self.rt.executions.mutate(snapshot.execution_id, finish)
        if ex is None or not ex.terminal:
            return
        await self._announce(ex)
        if not won:
            return
        metrics.EXECUTIONS.labels(ex.status).inc()
        if ex.finished_at:
            metrics.EXECUTION_DURATION.labels(ex.status).observe((ex.finished_at - ex.created_at).total_seconds())
        log.info("execution %s: %s, $%.4f", ex.status, ex.aggregated.summary if ex.aggregated else "",
                 ex.cost.total_usd, extra={"execution_id": ex.execution_id})

    async def _announce(self, ex: Execution) -> None:
        """The synthesis call's cost event and the final event; msg-ids make repeats harmless."""
        js, names = self.rt.jetstream, self.rt.names
        for c in ex.calls:
            if c.phase == "synthesis":
                await publish_cost(js, names, call_event(ex.execution_id, c))
        await self.rt.announce_completed(ex)
