"""ExecutionRequested → plan → ExecutionPlanned + the first RunTasks."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError

from services.pm.planning import make_plan
from shared import metrics
from shared.bus import publish
from shared.errors import PlanError
from shared.execution import apply_plan, fail_execution, new_execution, queued, run_command, run_msg_id
from shared.schemas import ExecutionPlanned, ExecutionRequested
from shared.service import Runtime

log = logging.getLogger(__name__)


class PMHandlers:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def on_requested(self, req: ExecutionRequested, msg: Msg) -> None:
        """Plan the execution (once) and publish its ready tasks; safe to redeliver."""
        ctx = {"execution_id": req.execution_id}
        store, js, names = self.rt.executions, self.rt.jetstream, self.rt.names
        if await store.get(req.execution_id) is None:
            # The gateway stores the execution before publishing; this covers a request sent straight to NATS.
            try:
                await store.create(new_execution(req))
            except KeyWrongLastSequenceError:
                pass
        try:
            specs, planner = make_plan(req, self.rt.pe.max_tasks_per_execution)
        except PlanError as e:
            await self._reject(req, str(e))
            await msg.ack()
            return
        ex = await store.mutate(req.execution_id, lambda ex: apply_plan(ex, specs, planner))
        if ex is None or ex.status != "running":
            await msg.ack()  # cancelled or finished meanwhile: nothing to start
            return
        metrics.PLANS.labels(ex.planner or planner).inc()
        planned = ExecutionPlanned(
            execution_id=ex.execution_id, planner=ex.planner or planner, tasks=[t.spec() for t in ex.tasks]
        )
        sends = [publish(js, names.events(ex.execution_id, "planned"), planned, f"{ex.execution_id}:planned")]
        sends += [
            publish(js, names.tasks(t.pool), run_command(ex, t), run_msg_id(ex.execution_id, t.id))
            for t in queued(ex)
        ]
        await asyncio.gather(*sends)
        await msg.ack()
        log.info("planned %d task(s) with %s", len(ex.tasks), ex.planner, extra=ctx)

    async def _reject(self, req: ExecutionRequested, reason: str) -> None:
        ex = await self.rt.executions.mutate(req.execution_id, lambda ex: fail_execution(ex, f"invalid plan: {reason}"))
        if ex is not None and ex.terminal:
            await self.rt.announce_completed(ex)
        log.warning("rejected plan: %s", reason, extra={"execution_id": req.execution_id})
