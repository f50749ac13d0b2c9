"""What every pool service does with a task: run it under its timeout, heartbeat, retry, report.

The broker holds the limits: ``max_ack_pending`` caps the pool across replicas, ``nak(delay=…)``
spaces retries (``retries.backoff_s``: 1 s, 3 s, 9 s), ``ack_wait`` redelivers the task of a worker that died. The
worker enforces the task's own timeout and heartbeats with ``in_progress()`` while it runs.

Whether a task's execution has ended (cancelled, past its deadline) the worker learns from the
``completed`` events, followed from start-up by an ordered consumer (headers only): no store read
before a task's first attempt. What was queued before the worker followed them, and every retry
(whose model depends on how the last attempt failed), is checked against the execution document.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared import metrics
from shared.bus import emit, publish, stopped_within
from shared.consumer import GIVEN_UP_AFTER, UNAVAILABLE, Consumer, persist
from shared.costs import attempt_event, observe, prime_costs, publish_cost
from shared.failures import ON_EXHAUSTED, Strategy, attempts_allowed, decide, model_for
from shared.names import Pool
from shared.providers import Meter, ModelProvider, ModelUse, Prompt, ProviderError, TaskReply, make_provider
from shared.schemas import (
    TERMINAL_TASK,
    ErrorKind,
    ExecutionCompleted,
    RunTask,
    TaskCompleted,
    TaskFailed,
    TaskSpec,
    TaskStarted,
    TaskState,
    Usage,
    now,
    same_run,
)
from shared.service import Runtime, Start, Workers
from shared.sizes import fit, text_slots
from shared.topology import ensure_consumer, pool_consumer_config

log = logging.getLogger(__name__)

FormatPrompt = Callable[[TaskSpec], Prompt]


class _Delivery:
    """One delivery of a task: its attempt number (= delivery count), log context and result header."""

    def __init__(self, cmd: RunTask, msg: Msg, pool: Pool, worker: str) -> None:
        self.cmd, self.msg, self.started = cmd, msg, now()
        self.attempt = msg.metadata.num_delivered or 1
        self.ctx = {"execution_id": cmd.execution_id, "task_id": cmd.task.id, "pool": pool, "attempt": self.attempt,
                    "worker": worker}
        self.run: int = msg.metadata.sequence.stream  # which message of the task (normally its only one)
        self.head: dict[str, Any] = {**self.ctx, "run": self.run,
                                     "upstream": sorted(cmd.task.context.get("upstream") or {})}
        self.abandoned = False
        self.given_up = False  # abandoned because the broker has handed the task to another delivery
        self.beat_at = time.monotonic()  # when the broker last heard this delivery is alive (its start, a beat)
        self.watch: asyncio.TimerHandle | asyncio.Task[None] | None = None  # see PoolWorker._watch


RECORDED_POLL_S = 0.1  # a retry reads the task's state this often until the attempt before it is recorded
READ_RETRY_S = 1.0  # after a read of the task's state that NATS could not answer, the next comes this soon
BEAT_RETRY_S = 1.0  # after a heartbeat that failed, the next comes this soon (at most ack_wait / 3)
FOLLOW_HEARTBEAT_S = 1.0  # the server's heartbeat on the endings' consumer; two missed and it is recreated


class Endings:
    """The executions that ended early since this process started following their ``completed`` events.

    ``covers(msg)``: the task was queued after following began, so had its execution ended, the event
    would be here (an ordered consumer resumes after a reconnect without a gap). Only executions that did
    not complete are kept (cancelled, past their deadline, failed): a completed one has no task left to
    run — a crashed attempt's redelivery is checked against the document. An ending is kept for
    ``keep_s``, the execution timeout: no task runs past its execution's deadline anyway.
    """

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._ended: OrderedDict[str, float] = OrderedDict()  # execution id → when its end was heard of
        self._after: int | None = None  # the tasks stream's last sequence when following began

    async def follow(self, rt: Runtime) -> Subscription:
        js, names = rt.jetstream, rt.names
        # From the last ending the stream holds on. When its consumer is lost (a NATS restart, a failover),
        # nats-py's ordered consumer recreates it after the last sequence it delivered, and from the stream's
        # first message if it delivered none: a quiet start followed by an outage would replay every ending the
        # stream keeps (days of them). Delivering the last one first gives it a place to resume from; that
        # execution did end, so remembering it is no harm.
        sub = await js.subscribe(names.completed_event("*"), stream=names.events_stream, ordered_consumer=True,
                                 cb=self._ended_one, idle_heartbeat=FOLLOW_HEARTBEAT_S,
                                 config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST, headers_only=True))
        self._after = (await js.stream_info(names.tasks_stream)).state.last_seq
        return sub

    async def _ended_one(self, msg: Msg) -> None:
        if (msg.headers or {}).get(ExecutionCompleted.STATUS_HEADER) == "completed":
            return
        at, execution_id = time.monotonic(), msg.subject.rsplit(".", 2)[-2]
        self._ended.pop(execution_id, None)  # a repeated event moves it to the end: oldest stay in front
        self._ended[execution_id] = at
        while self._ended and next(iter(self._ended.values())) < at - self.keep_s:
            self._ended.popitem(last=False)

    def covers(self, msg: Msg) -> bool:
        return self._after is not None and msg.metadata.sequence.stream > self._after

    def ended(self, execution_id: str) -> bool:
        return execution_id in self._ended


class PoolWorker:
    """One replica of a pool."""

    def __init__(self, rt: Runtime, pool: Pool, format_prompt: FormatPrompt, provider: ModelProvider,
                 endings: Endings) -> None:
        self.rt, self.pool, self.format_prompt, self.provider = rt, pool, format_prompt, provider
        self.endings = endings
        self.cfg = rt.pe.worker_pools.get(pool)

    async def handle(self, cmd: RunTask, msg: Msg) -> None:
        """Run one delivery of a task and publish what happened, then ack it or nak it for a retry."""
        d = _Delivery(cmd, msg, self.pool, self.rt.settings.worker_id)
        covered = d.attempt == 1 and self.endings.covers(msg)  # queued since following the endings: no read
        out_of_reach = False
        try:
            ended, failed = (self.endings.ended(cmd.execution_id), []) if covered else await self._before(d)
        except Exception:
            out_of_reach = not self.rt.nats.is_connected  # a nak would go out on reconnect, maybe past ack_wait
            if not (out_of_reach or self._given_up(d)):
                raise  # handed back: its redelivery counts as one of the task's attempts
            ended, failed = False, []
        if out_of_reach or self._given_up(d):
            # The reads outlasted what the broker waits to hear (a paused process, or the reads themselves with a short
            # ack_wait), or failed with NATS out of reach: the broker may have handed the task on, or will. An ack or a
            # nak would act on the message all the same (and a third delivery run beside the second): neither.
            log.warning("not started: nothing from this delivery reached the broker for %.1fs; left to the broker "
                        "(it redelivers the task after ack_wait, or dead-letters it after its last delivery)",
                        self._silent_s(d), extra=d.ctx)
            return
        if not covered:  # the reads may have taken up to a third of ack_wait: the broker hears from it now
            try:
                await self._beat(d, time.monotonic())
            except Exception as e:  # noqa: BLE001 - the run's own heartbeats follow; a missed one is not a reason to stop
                log.warning("heartbeat failed: %s", e, extra=d.ctx)
        if ended:
            await msg.ack()  # the execution ended (cancelled, deadline) or the task was settled: nothing to do
            log.info("not started: its execution has ended", extra=d.ctx)
            return
        seconds_left = (cmd.deadline_at - now()).total_seconds()  # after the reads, which may have waited
        if seconds_left <= 0:
            await self._failed(d, "deadline", "execution deadline passed before the task started", None, Usage())
            return
        model = model_for(self.rt.pe, self.pool, d.attempt, [kind for kind, _ in failed], [then for _, then in failed])
        metrics.TASKS.labels(self.pool, "started").inc()
        log.info("task started on %s", model, extra=d.ctx)

        timeout = min(self.cfg.timeout, seconds_left)
        metrics.TASKS_IN_FLIGHT.labels(self.pool).inc()
        meter = Meter()  # what the call has used, should it be cut off
        run = asyncio.create_task(self._run(cmd, model, d.attempt, timeout, meter))
        # Nothing more for an attempt quicker than announce_start_after_s: then _watch takes over, and beats until
        # the attempt is acked or nak'ed (a result's publish may wait out an outage).
        d.watch = asyncio.get_running_loop().call_later(self.rt.pe.announce_start_after_s, self._watch, d, run)
        try:
            await self._attempt(d, run, model, timeout, meter)
        finally:
            d.watch.cancel()

    async def _attempt(self, d: _Delivery, run: asyncio.Task[TaskReply], model: str, timeout: float,
                       meter: Meter) -> None:
        msg = d.msg
        try:
            reply = await run
        except asyncio.CancelledError:
            if not d.abandoned:  # the service is stopping: the consumer gives the message back
                await self._cut_by_stop(d, model, meter)
                raise
            finished = now()
            duration = (finished - d.started).total_seconds()
            if d.given_up:
                self._observe("abandoned", duration, None, 0.0, Usage())
                log.warning("abandoned: the broker handed the task on after %.1fs without a heartbeat (this "
                            "process was paused, or cut off); its redelivery runs it", self._silent_s(d), extra=d.ctx)
                return
            # Its execution ended (a cancel, the deadline) during the call: what the call had used is reported, and
            # goes on the attempt the aggregator gave up as lost, as any late report's cost does.
            report = await self._paid(d, finished, model, meter.usage, error="abandoned: its execution has ended",
                                      error_kind="deadline", final=True)
            if report.cost_usd:
                await self._publish(d, report)
            self._observe("abandoned", duration, model, report.cost_usd, meter.usage)
            await msg.ack()
            log.info("abandoned: its execution has ended", extra=d.ctx)
            return
        except TimeoutError:
            await self._failed(d, "timeout", f"timed out after {timeout:g}s", model, meter.usage)
            return
        except ProviderError as e:
            await self._failed(d, e.kind, str(e), model, e.usage or Usage(), e.retry_after_s)
            return
        except Exception as e:  # noqa: BLE001 - an agent that crashes is a failed attempt, not a lost task
            log.exception("agent raised", extra=d.ctx)
            await self._failed(d, "agent_error", f"agent error: {type(e).__name__}: {e}", model, meter.usage)
            return
        finally:
            metrics.TASKS_IN_FLIGHT.labels(self.pool).dec()

        finished = now()
        cost = self._cost(reply.model, reply.usage)
        done = TaskCompleted(**d.head, started_at=d.started, finished_at=finished, model=reply.model,
                             provider=reply.provider, usage=reply.usage, cost_usd=cost, output=reply.output)
        await publish_cost(self.rt.nats, self.rt.names, attempt_event(done))
        await self._publish(d, done)
        if not self._handed_on(d):
            await msg.ack()
        duration = (finished - d.started).total_seconds()
        self._observe("completed", duration, reply.model, cost, reply.usage)
        log.info("task completed in %.3fs", duration, extra=d.ctx)

    async def _paid(self, d: _Delivery, finished: datetime, model: str | None, usage: Usage,
                    **outcome: Any) -> TaskFailed:
        """A failed attempt's report, priced at ``usage``; its cost event goes out now, the report is the caller's
        to send (kept through an outage, or said once)."""
        cost = self._cost(model, usage)
        failed = TaskFailed(**d.head, started_at=d.started, finished_at=finished, model=model,
                            provider=self.provider.name if model else None, usage=usage, cost_usd=cost, **outcome)
        if cost:
            await publish_cost(self.rt.nats, self.rt.names, attempt_event(failed))
        return failed

    async def _failed(self, d: _Delivery, kind: ErrorKind, error: str, model: str | None, usage: Usage,
                      retry_after_s: float | None = None) -> None:
        """Report a failed attempt with the failure handler's decision; nak for a retry or ack for good."""
        finished = now()
        seconds_left = (d.cmd.deadline_at - finished).total_seconds()
        decision = decide(self.rt.pe, self.pool, d.attempt, kind, seconds_left, retry_after_s, model)
        failed = await self._paid(d, finished, model, usage, error=error, error_kind=kind, final=decision.final,
                                  strategy=decision.strategy.value, retry_in_s=decision.delay_s)
        cost = failed.cost_usd
        await self._publish(d, failed)
        duration = (finished - d.started).total_seconds()
        if self._handed_on(d):
            self._observe("failed" if decision.final else "retried", duration, model, cost, usage)
        elif decision.final:
            await d.msg.ack()
            self._observe("failed", duration, model, cost, usage)
            log.warning("attempt %d failed (%s): %s; giving up: %s", d.attempt, kind, error, decision.strategy,
                        extra=d.ctx)
        else:
            await d.msg.nak(delay=decision.delay_s)
            self._observe("retried", duration, model, cost, usage)
            log.warning("attempt %d failed (%s): %s; %s in %gs", d.attempt, kind, error, decision.strategy,
                        decision.delay_s, extra=d.ctx)

    def _silent_s(self, d: _Delivery, at: float | None = None) -> float:
        return (time.monotonic() if at is None else at) - d.beat_at

    def _given_up(self, d: _Delivery, at: float | None = None) -> bool:
        """Whether the broker has handed the task to another delivery, or is about to: it has not heard that
        this one is alive for nearly ``ack_wait`` (the process was paused, its loop blocked, its connection
        down). That delivery may be running already, so this one must neither go on nor ack or nak: either
        would act on the task's message, which now stands for the other. An ack would free its pool slot while
        it runs, and the pool would run more than its limit."""
        return self._silent_s(d, at) >= GIVEN_UP_AFTER * self.rt.pe.ack_wait_s

    def _handed_on(self, d: _Delivery) -> bool:
        """Whether the broker has handed the task on (``_given_up``), logged: the attempt's report is published,
        the message left alone."""
        given_up = d.given_up or self._given_up(d)
        if given_up:
            log.warning("the broker handed the task on before this attempt ended (no heartbeat for %s of "
                        "ack_wait): reported, not acknowledged", f"{GIVEN_UP_AFTER:.0%}", extra=d.ctx)
        return given_up

    async def _before(self, d: _Delivery) -> tuple[bool, list[tuple[str | None, str | None]]]:
        """Before the attempt, from the execution state: whether its execution has ended (or its task been settled), and
        how the attempts before it failed and what was decided then (error kinds and strategies, in order), which its
        model depends on.

        The store is read again for up to a third of ack_wait (from the first read): while NATS cannot answer (an
        outage, a leader election), which would otherwise hand the message back and use up one of the task's attempts
        with none run; and on a retry until it records how the attempt before ended. The aggregator stores a failure
        moments after it is reported, but a retry nak'ed for less time (or an aggregator that lags: a restart, a
        rollout, the same outage) would find it missing and choose its model without it, the pool's own after a
        refusal. A read still unanswered then raises; a retry whose attempt before stays unrecorded (its worker died)
        goes on with what is known."""
        deadline = time.monotonic() + self.rt.pe.ack_wait_s / 3
        while True:
            try:
                state = await self._state(d.cmd)
            except UNAVAILABLE as e:
                if time.monotonic() >= deadline:
                    raise
                log.warning("could not read the task's state (%s: %s); again in %gs", type(e).__name__, e,
                            READ_RETRY_S, extra=d.ctx)
                if await stopped_within(self.rt.stop, READ_RETRY_S):
                    raise
                continue
            if state is None:
                return True, []
            mine = [a for a in state.attempts if same_run(a, d.run)]
            if (d.attempt == 1 or any(a.n == d.attempt - 1 and a.outcome != "running" for a in mine)
                    or time.monotonic() >= deadline or await stopped_within(self.rt.stop, RECORDED_POLL_S)):
                before = sorted((a for a in mine if a.n < d.attempt), key=lambda a: a.n)
                return False, [(a.error_kind, a.strategy) for a in before]

    async def _state(self, cmd: RunTask) -> TaskState | None:
        """The task as the execution state has it; None when there is nothing left to run it for."""
        current = await self.rt.executions.get(cmd.execution_id)
        if current is None or current[0].terminal:
            return None
        task = current[0].task(cmd.task.id)
        return None if task is None or task.status in TERMINAL_TASK else task

    async def _ended(self, d: _Delivery) -> bool:
        """Whether the delivery's execution has ended (or its task been settled) since it was queued."""
        if self.endings.covers(d.msg):
            return self.endings.ended(d.cmd.execution_id)
        return await self._state(d.cmd) is None

    async def _beat(self, d: _Delivery, sent: float) -> bool:
        """Tell the broker the delivery is alive; whether it counts (see ``_given_up``): sent on a live connection.
        One sent while reconnecting is kept and sent then, when nobody can say."""
        connected = self.rt.nats.is_connected
        await d.msg.in_progress()
        if connected:
            d.beat_at = sent
        return connected

    async def _cut_by_stop(self, d: _Delivery, model: str, meter: Meter) -> None:
        """The service stopped with the attempt's call under way (its shutdown grace ran out): the attempt failed,
        at what the call had used, and the redelivery runs it again. Said once, not kept through an outage: the
        stop does not wait for NATS."""
        # On the task's last delivery nothing runs it again: the broker gives up on it (the aggregator's dead letter
        # follows, which this report must not leave waiting as a retry).
        last = d.attempt >= attempts_allowed(self.rt.pe)
        finished = now()
        try:
            report = await self._paid(
                d, finished, model, meter.usage, error_kind="server", final=last,
                error="cut off: the service stopped before the attempt finished (shutdown_grace_s)"
                + ("" if last else "; it runs again"),
                strategy=(ON_EXHAUSTED[self.pool] if last else Strategy.RETRY).value, retry_in_s=None if last else 0)
            if report.cost_usd:
                await publish(self.rt.jetstream, self.rt.names.results(d.cmd.execution_id), report, report.msg_id())
        except Exception as e:  # noqa: BLE001 - stopping all the same; the call's cost is what is lost
            log.warning("could not report the attempt cut off by the stop: %s", e, extra=d.ctx)
        self._observe("failed" if last else "retried", (finished - d.started).total_seconds(), model,
                      self._cost(model, meter.usage), meter.usage)

    async def _publish(self, d: _Delivery, result: TaskCompleted | TaskFailed) -> None:
        """Publish the attempt's result, cut to fit a message, and kept through an outage (see ``persist``)."""
        data, limit = result.to_bytes(), self.rt.executions.limit
        if len(data) > limit and isinstance(result, TaskCompleted):  # paid for: cut it rather than run it again
            data, cut = fit(result.to_bytes, [text_slots(result.output)], limit, "a task's result")
            metrics.TEXTS_CUT.labels("result").inc()
            log.warning("result over %d bytes: %d characters of the output cut to fit", limit, cut, extra=d.ctx)
        subject = self.rt.names.results(d.cmd.execution_id)
        await persist(lambda: publish(self.rt.jetstream, subject, data, result.msg_id()), lambda: [d.msg],
                      d.cmd.deadline_at, self.rt.pe.ack_wait_s / 3, "publish the result", d.ctx)

    def _cost(self, model: str | None, usage: Usage) -> float:
        if model is None:
            return 0.0
        return self.rt.pe.price(model).usd(
            usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens
        )

    def _observe(self, outcome: str, duration: float, model: str | None, cost: float, usage: Usage) -> None:
        metrics.TASKS.labels(self.pool, outcome).inc()
        metrics.TASK_DURATION.labels(self.pool, outcome).observe(duration)
        if model:
            observe(self.pool, model, usage, cost)

    async def _run(self, cmd: RunTask, model: str, attempt: int, timeout: float, meter: Meter) -> TaskReply:
        async with asyncio.timeout(timeout):
            return await self.provider.run_task(self.pool, cmd.task, self.format_prompt(cmd.task), model, attempt,
                                                meter)

    def _watch(self, d: _Delivery, run: asyncio.Task[TaskReply]) -> None:
        d.watch = asyncio.create_task(self._heartbeat(d, run))

    async def _heartbeat(self, d: _Delivery, run: asyncio.Task[TaskReply]) -> None:
        """For an attempt that has run ``announce_start_after_s``: announce its start (the state shows it
        running, and records it should its worker be lost); then a few times per ``ack_wait`` tell the
        broker this delivery is alive, and abandon the run if its execution has ended meanwhile
        (cancelled, past its deadline) or the broker has handed the task on (``_given_up``). A quicker
        attempt is recorded from its result alone, which carries its start: one message instead of two."""
        interval = every = self.rt.pe.ack_wait_s / 3
        with contextlib.suppress(asyncio.CancelledError):
            if not run.done():  # else its result, which carries its start, is out or on its way
                started = TaskStarted(**d.head, started_at=d.started)
                await emit(self.rt.nats, self.rt.names.results(d.cmd.execution_id), started, started.msg_id())
            while True:
                await asyncio.sleep(every)
                sent = time.monotonic()
                if self._given_up(d, sent):  # a pause longer than the beats allow: another delivery has the task
                    d.abandoned = d.given_up = True
                    run.cancel()
                    return
                every = min(interval, BEAT_RETRY_S)  # unless it counts: the first beat after a reconnect does
                try:
                    if await self._beat(d, sent):
                        every = interval
                    ended = await self._ended(d)
                except Exception as e:  # noqa: BLE001 - without beats the broker would hand the task to a second worker
                    log.warning("heartbeat failed, next in %gs: %s", every, e, extra=d.ctx)
                    continue
                if ended:
                    d.abandoned = True
                    run.cancel()
                    return


def pool_start(pool: Pool, format_prompt: FormatPrompt) -> Start:
    """The ``start`` hook of a pool service: ensure its durable, then run the consumer loop."""

    async def start(rt: Runtime) -> Workers:
        js, names = rt.jetstream, rt.names
        await ensure_consumer(js, names.tasks_stream, pool_consumer_config(names, pool, rt.pe))
        metrics.prime(metrics.TASKS, [(pool, o) for o in ("started", "completed", "retried", "failed", "abandoned")])
        cfg = rt.pe.worker_pools.get(pool)
        prime_costs(pool, sorted({cfg.model, cfg.fallback_model}))
        endings = Endings(rt.pe.execution_timeout_s)
        following = await endings.follow(rt)
        provider = make_provider(rt.pe, rt.settings.anthropic_api_key)  # one client for the process
        keys = ["model"] if cfg.fallback_model == cfg.model else ["model", "fallback_model"]
        await provider.check_models([ModelUse(f"worker_pools.{pool}.{key}", getattr(cfg, key)) for key in keys])
        worker = PoolWorker(rt, pool, format_prompt, provider, endings)
        consumer = Consumer(
            rt.nats,
            names,
            names.tasks_stream,
            names.pool_consumer(pool),
            RunTask.model_validate_json,
            worker.handle,
            capacity=rt.settings.slots or rt.pe.worker_pools.get(pool).max_concurrent,
            ack_wait_s=rt.pe.ack_wait_s,
        )

        async def run() -> None:
            try:
                await consumer.run(rt.stop, rt.pe.shutdown_grace_s)
            finally:
                await following.unsubscribe()
                await provider.aclose()

        return [run(), watch_queue(rt, pool)]

    return start


async def watch_queue(rt: Runtime, pool: Pool, every_s: float = 5.0) -> None:
    """Keep the queue-depth and ack-pending gauges current from the durable's info (what KEDA scales on)."""
    names = rt.names
    while not rt.stop.is_set():
        try:
            info = await rt.jetstream.consumer_info(names.tasks_stream, names.pool_consumer(pool))
            metrics.QUEUE_DEPTH.labels(pool).set(info.num_pending or 0)
            metrics.ACK_PENDING.labels(pool).set(info.num_ack_pending or 0)
        except Exception as e:  # noqa: BLE001 - a gauge that misses one reading is not worth stopping for
            log.debug("consumer info failed: %s", e)
            for gauge in (metrics.QUEUE_DEPTH, metrics.ACK_PENDING):  # no reading rather than a stale one, which
                with contextlib.suppress(KeyError):  # the backlog alerts (max over replicas) would take as current
                    gauge.remove(pool)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rt.stop.wait(), every_s)
