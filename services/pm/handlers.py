"""ExecutionRequested → plan → ExecutionPlanned + the first RunTasks."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError
from pydantic import ValidationError

from services.pm.planning import plan_request
from shared import metrics
from shared.bus import emit, publish
from shared.consumer import keep_alive, persist, redelivered
from shared.costs import call_events, publish_cost
from shared.errors import PlanError
from shared.execution import (
    apply_plan,
    fail_execution,
    new_execution,
    plannable,
    queued,
    record_calls,
    run_bytes,
    run_msg_id,
    start_planning,
)
from shared.providers import ModelProvider
from shared.schemas import Execution, ExecutionPlanned, ExecutionRequested, ModelCall, now
from shared.service import Runtime
from shared.state import Known

log = logging.getLogger(__name__)



class PMHandlers:
    def __init__(self, rt: Runtime, provider: ModelProvider) -> None:
        self.rt, self.provider = rt, provider

    async def on_requested(self, req: ExecutionRequested, msg: Msg) -> None:
        """Plan the execution (once) and publish its ready tasks; safe to redeliver."""
        ctx = {"execution_id": req.execution_id}
        store, js, names = self.rt.executions, self.rt.jetstream, self.rt.names
        if req.revision is not None and not redelivered(msg) and (req.tasks is not None or not self.provider.writes):
            # The gateway stored new_execution(req) at this revision: plan on it without a read. Should the
            # document have changed since (cancelled already), the plan's compare-and-set fails and re-reads.
            # Not before a paid decomposition call: one read first tells whether it was cancelled meanwhile.
            current: Known | None = (new_execution(req), req.revision)
        else:
            current = await store.get(req.execution_id)
            if current is not None and req.tasks is None and self.provider.writes:  # a paid call plans it
                seq = msg.metadata.sequence.stream
                marked = await store.mutate_from(req.execution_id, lambda ex: start_planning(ex, seq), current)
                current = marked[:2] if marked is not None else None
                if current is not None and current[0].status == "planning" and current[0].planning_request != seq:
                    # Another copy of the request (a replay past the duplicate window) is being planned: that
                    # message's delivery, or its redelivery, plans it; a second plan would be paid for twice.
                    log.info("another copy of the request is being planned", extra=ctx)
                    await msg.ack()
                    return
        if current is None:
            # The gateway stores the execution before publishing; this covers a request sent straight to NATS.
            try:
                await store.create(new_execution(req))
            except KeyWrongLastSequenceError:
                pass
        ex: Execution | None = current[0] if current is not None else None
        replanned = ex is not None and not plannable(ex)
        if not replanned and now() >= req.deadline_at:  # no plan, and no model call for one
            # Ended here, not left to the deadline's check: a request sent straight to NATS has none scheduled.
            await self._end(req.execution_id, "execution deadline passed before it was planned")
            await msg.ack()
            return
        installed = False  # whether this delivery's write stored the plan (counted once, whoever else tried)
        if not replanned:
            try:
                async with keep_alive(lambda: [msg], self.rt.pe.ack_wait_s / 3):  # a long model call: not redelivered
                    plan = await plan_request(req, self.rt.pe, self.provider,
                                              lambda call: self.rt.record_call(req.execution_id, call))
            except (PlanError, ValidationError) as e:  # a plan that cannot be made fails now, not after redeliveries
                await self._end(req.execution_id, f"invalid plan: {e}", e.calls if isinstance(e, PlanError) else [])
                await msg.ack()
                return
            # The decomposition call is stored in the same compare-and-set write as the plan: counted once.
            # It starts from the version read above (no second read); a stale one re-reads, and so does a try
            # after NATS could not take the write (the first may have changed the version in place).
            start = [current]

            def install(ex: Execution) -> bool:
                nonlocal installed
                installed = plannable(ex)  # on the version the write that lands starts from
                return apply_plan(ex, plan.tasks, plan.planner, plan.calls)

            async def write() -> tuple[Execution, int, bytes | None] | None:
                return await store.mutate_from(req.execution_id, install, start.pop() if start else None)

            stored = await persist(write, lambda: [msg], req.deadline_at, self.rt.pe.ack_wait_s / 3, "store the plan",
                                   ctx)
            ex = stored[0] if stored else None
        # The events again only on a redelivery (the first delivery may have died before emitting them). A
        # request stored twice (an idempotent replay past the stream's duplicate window) would otherwise store
        # them twice; its tasks are published again either way, and the tasks stream's msg-ids absorb them.
        emitting = not replanned or redelivered(msg)
        if ex is not None and emitting:  # the decomposition's cost also when the execution ended meanwhile
            await self._costs(ex)
        if ex is not None and ex.terminal and redelivered(msg):
            # Whoever ended it (this PM rejecting the plan, say) may have died before announcing it; the event's
            # msg-id keeps it to one.
            await self.rt.announce_completed(ex)
        if ex is None or ex.status != "running":
            await msg.ack()  # cancelled or finished meanwhile: nothing to start
            return
        planner = ex.planner or "rules"
        if emitting:
            if installed:  # not again by a redelivery (which sends the stored plan's events again) or another copy
                metrics.PLANS.labels(planner).inc()
            planned = ExecutionPlanned(execution_id=ex.execution_id, planner=planner,
                                       tasks=[t.spec() for t in ex.tasks])
            await emit(self.rt.nats, names.events(ex.execution_id, "planned"), planned, f"{ex.execution_id}:planned")
        # After the plan's write is acknowledged, not right behind it as the aggregator sends what it releases: a task
        # sent with the write could finish, and its result reach an aggregator that reads the document, before the
        # plan is stored (on R3 the two streams have different leaders). The task would be unknown to that version
        # and its result dropped.
        limit = self.rt.executions.limit
        await asyncio.gather(*[publish(js, names.tasks(t.pool), run_bytes(ex, t, limit),
                                       run_msg_id(ex.execution_id, t.id)) for t in queued(ex)])
        await msg.ack()
        log.info("planned %d task(s) with %s", len(ex.tasks), ex.planner, extra=ctx)

    async def _costs(self, ex: Execution) -> None:
        """The cost events of the execution's decomposition calls (a repeat within the window is a no-op)."""
        for event in call_events(ex.execution_id, ex.calls, "decomposition"):
            await publish_cost(self.rt.nats, self.rt.names, event)

    async def _end(self, execution_id: str, reason: str, calls: list[ModelCall] | None = None) -> None:
        """Fail the execution, unplanned, with ``reason`` (it stays as it is if it has ended already). The model
        calls made for its plan are recorded in the same write (paid all the same), and their cost events sent."""
        failed = False

        def fail(ex: Execution) -> bool:
            nonlocal failed
            paid = record_calls(ex, calls or [])
            failed = fail_execution(ex, reason)
            return failed or paid

        ex = await self.rt.executions.mutate(execution_id, fail)
        if ex is not None and any(c.phase == "decomposition" for c in ex.calls):  # also one a stop cut off earlier
            await self._costs(ex)
        if ex is not None and failed:  # counted and announced by whoever ended it, if it had ended already
            metrics.execution_ended(ex.mode, ex.status, (ex.updated_at - ex.created_at).total_seconds())
            await self.rt.announce_completed(ex)
        log.warning("not planned: %s", reason, extra={"execution_id": execution_id})
