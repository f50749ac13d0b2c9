"""Task results → execution state → released tasks → (when all are terminal) the final response."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from services.aggregator.aggregate import aggregate
from services.aggregator.synthesis import synthesize
from shared import metrics
from shared.bus import publish
from shared.execution import all_tasks_terminal, apply_result, outcome, queued, run_command, run_msg_id
from shared.schemas import Execution, TaskCompleted, TaskFailed, TaskStarted, now
from shared.service import Runtime

log = logging.getLogger(__name__)


class AggregatorHandlers:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

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
            await self._finish(ex)
        await msg.ack()

    async def _finish(self, snapshot: Execution) -> None:
        """Aggregate, synthesize and store the final answer (once), then announce it."""
        status = outcome(snapshot)
        agg = aggregate(snapshot)
        text = synthesize(snapshot, agg, status, self.rt.pe.pm_coordinator)

        def finish(ex: Execution) -> bool:
            if ex.terminal:
                return False
            ex.status, ex.aggregated, ex.final_response = status, agg, text  # type: ignore[assignment]
            ex.finished_at = ex.updated_at = now()
            return True

        ex = await self.rt.executions.mutate(snapshot.execution_id, finish)
        if ex is None or not ex.terminal:
            return
        await self.rt.announce_completed(ex)
        metrics.EXECUTIONS.labels(ex.status).inc()
        if ex.finished_at:
            metrics.EXECUTION_DURATION.labels(ex.status).observe((ex.finished_at - ex.created_at).total_seconds())
        log.info("execution %s: %s, $%.4f", ex.status, ex.aggregated.summary if ex.aggregated else "",
                 ex.cost.total_usd, extra={"execution_id": ex.execution_id})
