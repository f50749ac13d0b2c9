"""Task results → execution state → released tasks → (when all are terminal) the final response."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from services.aggregator.aggregate import aggregate
from services.aggregator.synthesis import synthesize
from shared import metrics
from shared.bus import publish
from shared.execution import (
    all_tasks_terminal,
    apply_result,
    expire,
    fail_execution,
    outcome,
    queued,
    run_command,
    run_msg_id,
)
from shared.failures import ON_EXHAUSTED
from shared.schemas import (
    ConsumerAdvisory,
    DeadLetter,
    Execution,
    ExecutionDeadline,
    ExecutionRequested,
    RunTask,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
    now,
)
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

    async def on_deadline(self, check: ExecutionDeadline, msg: Msg) -> None:
        """At the deadline, finish the execution with what it has; before it, hand the check back."""
        left = (check.deadline_at - now()).total_seconds()
        if left > 0:
            await msg.nak(delay=left)  # the broker holds the check until the deadline
            return
        ctx = {"execution_id": check.execution_id}

        def expire_or_fail(ex: Execution) -> bool:
            if not ex.tasks:
                return fail_execution(ex, "no plan was made before the execution deadline")
            return expire(ex, "execution deadline exceeded")

        ex = await self.rt.executions.mutate(check.execution_id, expire_or_fail)
        if ex is not None and ex.terminal:
            await self.rt.announce_completed(ex)
            log.warning("execution failed at its deadline: %s", ex.error, extra=ctx)
        elif ex is not None and all_tasks_terminal(ex):
            log.warning("deadline reached: finishing with what is done", extra=ctx)
            await self._finish(ex)
        await msg.ack()

    async def on_advisory(self, adv: ConsumerAdvisory, msg: Msg) -> None:
        """A consumer gave up on a message: keep it in the DLQ with the reason, and tell its execution."""
        js, names = self.rt.jetstream, self.rt.names
        try:
            original = await js.get_msg(adv.stream, adv.stream_seq)
        except NotFoundError:
            original = None  # a work-queue message that was terminated is gone; the consumer kept a copy
        letter = DeadLetter(
            stream=adv.stream,
            consumer=adv.consumer,
            subject=original.subject if original else "",
            stream_seq=adv.stream_seq,
            deliveries=adv.deliveries,
            reason=adv.describe(),
            advisory=adv.type,
            payload=(original.data or b"").decode("utf-8", errors="replace") if original else "",
        )
        # Same msg-id as the consumer's own copy of a poison message: one dead letter per message.
        await publish(js, names.dlq(adv.stream, adv.consumer), letter, f"{adv.stream}:{adv.stream_seq}:dead")
        metrics.DEAD_LETTERS.labels(adv.stream, adv.consumer).inc()
        if original is not None and original.data and adv.exhausted:
            if adv.stream == names.tasks_stream:
                await self._task_dead(adv, original.data)
                await js.delete_msg(adv.stream, adv.stream_seq)  # a work queue keeps what ran out of deliveries
            elif adv.stream == names.executions_stream and original.subject == names.execution_requested:
                await self._request_dead(adv, original.data)
        log.warning("dead-lettered %s seq %d: %s", letter.subject or adv.stream, adv.stream_seq, letter.reason)
        await msg.ack()

    async def _task_dead(self, adv: ConsumerAdvisory, data: bytes) -> None:
        """The task will never report: record its last attempt as failed for good."""
        try:
            cmd = RunTask.model_validate_json(data)
        except ValueError:
            return
        at = now()
        failed = TaskFailed(execution_id=cmd.execution_id, task_id=cmd.task.id, pool=cmd.task.pool,
                            attempt=max(1, adv.deliveries), worker="dead-letter", started_at=at, finished_at=at,
                            error=f"dead-lettered: {adv.describe()}", error_kind="dead_letter", final=True,
                            strategy=ON_EXHAUSTED[cmd.task.pool].value)
        await publish(self.rt.jetstream, self.rt.names.results(cmd.execution_id), failed, failed.msg_id())

    async def _request_dead(self, adv: ConsumerAdvisory, data: bytes) -> None:
        try:
            req = ExecutionRequested.model_validate_json(data)
        except ValueError:
            return
        reason = f"could not be planned: {adv.describe()}"
        ex = await self.rt.executions.mutate(req.execution_id, lambda ex: fail_execution(ex, reason))
        if ex is not None and ex.terminal:
            await self.rt.announce_completed(ex)

    async def _finish(self, snapshot: Execution) -> None:
        """Aggregate, synthesize and store the final answer (once), then announce it."""
        status = outcome(snapshot)
        agg = aggregate(snapshot, self.rt.pe.result_aggregation.conflict_resolution)
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
