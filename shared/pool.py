"""What every pool service does with a task: run it under its timeout, heartbeat, retry, report.

The broker holds the limits: ``max_ack_pending`` caps the pool across replicas, ``nak(delay=…)``
spaces retries (1 s, 3 s, 9 s), ``ack_wait`` redelivers the task of a worker that died. The
worker enforces the task's own timeout and heartbeats with ``in_progress()`` while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg

from shared import metrics
from shared.bus import publish
from shared.consumer import Consumer
from shared.costs import publish_attempt_cost
from shared.names import Pool
from shared.providers import ModelProvider, Prompt, ProviderError, make_provider
from shared.schemas import RunTask, TaskCompleted, TaskFailed, TaskSpec, TaskStarted, now
from shared.service import Runtime, Start, Workers
from shared.topology import ensure_consumer, pool_consumer_config

log = logging.getLogger(__name__)

FormatPrompt = Callable[[TaskSpec], Prompt]


class PoolWorker:
    """One replica of a pool."""

    def __init__(self, rt: Runtime, pool: Pool, format_prompt: FormatPrompt, provider: ModelProvider) -> None:
        self.rt, self.pool, self.format_prompt, self.provider = rt, pool, format_prompt, provider
        self.cfg = rt.pe.worker_pools.get(pool)

    async def handle(self, cmd: RunTask, msg: Msg) -> None:
        """Run one delivery of a task and publish what happened, then ack / nak / finish it."""
        js, names, pe = self.rt.jetstream, self.rt.names, self.rt.pe
        attempt = msg.metadata.num_delivered or 1
        task = cmd.task
        ctx = {"execution_id": cmd.execution_id, "task_id": task.id, "pool": self.pool, "attempt": attempt}
        base: dict[str, Any] = {
            "execution_id": cmd.execution_id,
            "task_id": task.id,
            "pool": self.pool,
            "attempt": attempt,
            "worker": self.rt.settings.worker_id,
        }
        started = now()
        subject = names.results(cmd.execution_id)
        started_msg = TaskStarted(**base, started_at=started)
        await publish(js, subject, started_msg, started_msg.msg_id())
        log.info("task started", extra=ctx)

        model = self.cfg.model
        timeout = min(self.cfg.timeout, max(0.0, (cmd.deadline_at - started).total_seconds()))
        metrics.TASKS_IN_FLIGHT.labels(self.pool).inc()
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        error: str | None = None
        try:
            reply = await asyncio.wait_for(
                self.provider.run_task(self.pool, task, self.format_prompt(task), model, attempt), timeout
            )
        except TimeoutError:
            error = f"timed out after {timeout:g}s"
        except ProviderError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - an agent that crashes is a failed attempt, not a lost task
            log.exception("agent raised", extra=ctx)
            error = f"agent error: {type(e).__name__}: {e}"
        finally:
            heartbeat.cancel()
            metrics.TASKS_IN_FLIGHT.labels(self.pool).dec()
        finished = now()
        duration = (finished - started).total_seconds()

        if error is None:
            cost = pe.price(reply.model).usd(
                reply.usage.input_tokens,
                reply.usage.output_tokens,
                reply.usage.cache_read_tokens,
                reply.usage.cache_write_tokens,
            )
            done = TaskCompleted(
                **base,
                started_at=started,
                finished_at=finished,
                model=reply.model,
                provider=reply.provider,
                usage=reply.usage,
                cost_usd=cost,
                output=reply.output,
            )
            await publish(js, subject, done, done.msg_id())
            await publish_attempt_cost(js, names, done)
            await msg.ack()
            self._observe("completed", duration, reply.model, cost, reply.usage.input_tokens, reply.usage.output_tokens)
            log.info("task completed in %.3fs", duration, extra=ctx)
            return

        final = attempt > pe.retries.max_retries or self._past_deadline(cmd.deadline_at, pe.retries.delay(attempt))
        delay = None if final else pe.retries.delay(attempt)
        failed = TaskFailed(
            **base,
            started_at=started,
            finished_at=finished,
            error=error,
            final=final,
            retry_in_s=delay,
            model=model,
            provider=self.provider.name,
        )
        await publish(js, subject, failed, failed.msg_id())
        self._observe("failed" if final else "retried", duration, model, 0.0, 0, 0)
        if final:
            await msg.ack()
            log.warning("task failed for good: %s", error, extra=ctx)
        else:
            await msg.nak(delay=delay)
            log.warning("attempt failed: %s; retrying in %ss", error, delay, extra=ctx)

    @staticmethod
    def _past_deadline(deadline: datetime, delay: float) -> bool:
        return (deadline - now()).total_seconds() <= delay

    def _observe(self, outcome: str, duration: float, model: str, cost: float, tin: int, tout: int) -> None:
        metrics.TASKS.labels(self.pool, outcome).inc()
        metrics.TASK_DURATION.labels(self.pool, outcome).observe(duration)
        if cost:
            metrics.COST.labels(self.pool, model).inc(cost)
            metrics.TOKENS.labels(self.pool, model, "input").inc(tin)
            metrics.TOKENS.labels(self.pool, model, "output").inc(tout)

    async def _heartbeat(self, msg: Msg) -> None:
        """Tell the broker this delivery is alive, a few times per ``ack_wait``."""
        interval = max(0.2, self.rt.pe.ack_wait_s / 3)
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(interval)
                await msg.in_progress()


def pool_start(pool: Pool, format_prompt: FormatPrompt) -> Start:
    """The ``start`` hook of a pool service: ensure its durable, then run the consumer loop."""

    async def start(rt: Runtime) -> Workers:
        js, names = rt.jetstream, rt.names
        await ensure_consumer(js, names.tasks_stream, pool_consumer_config(names, pool, rt.pe))
        worker = PoolWorker(rt, pool, format_prompt, make_provider(rt.pe, rt.settings.anthropic_api_key))
        consumer = Consumer(
            js,
            names,
            names.tasks_stream,
            names.pool_consumer(pool),
            RunTask.model_validate_json,
            worker.handle,
            capacity=rt.pe.worker_pools.get(pool).max_concurrent,
        )
        return [consumer.run(rt.stop)]

    return start
