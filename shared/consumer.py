"""A typed pull-consumer loop: decode at the boundary, dead-letter poison, run handlers concurrently.

The loop fetches only as many messages as it has free local capacity, so one replica never holds
more of the durable's ``max_ack_pending`` slots than it can work on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError

from shared import metrics
from shared.bus import publish
from shared.names import Names
from shared.schemas import DeadLetter

log = logging.getLogger(__name__)

IDLE_FETCH_S = 1.0  # by default a pull request waits this long for a message, then the loop checks for a stop
BACKLOG_FETCH_S = 0.05  # the most a request for messages already waiting may take

M = TypeVar("M")
Handler = Callable[[M, Msg], Awaitable[None]]


class Consumer(Generic[M]):
    """Bind to an existing durable and feed each decoded message to ``handle``.

    The handler owns the ack: it acks, naks (with a delay) or terms. A handler that raises is
    logged and the message nak'ed for redelivery; the durable's ``max_deliver`` bounds that.
    """

    def __init__(
        self,
        js: JetStreamContext,
        names: Names,
        stream: str,
        durable: str,
        decode: Callable[[bytes], M],
        handle: Handler[M],
        capacity: int,
        error_delay_s: float = 1.0,
        idle_fetch_s: float = IDLE_FETCH_S,
    ) -> None:
        self.js, self.names, self.stream, self.durable = js, names, stream, durable
        self.decode, self.handle = decode, handle
        self.capacity = capacity
        self.error_delay_s = error_delay_s
        self.idle_fetch_s = idle_fetch_s
        self.subscription: JetStreamContext.PullSubscription | None = None  # bound by run()
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event, grace_s: float = 10.0) -> None:
        sub = self.subscription = await self.js.pull_subscribe_bind(self.durable, stream=self.stream)
        stopping = asyncio.create_task(stop.wait())
        backlog = 0  # messages waiting behind the last one delivered, as it reported
        busy = False  # the last fetch brought several: more are likely to follow
        try:
            while not stop.is_set():
                free = self.capacity - len(self._in_flight)
                if free <= 0:  # full: wait for a slot, or for the stop (handlers may run for minutes)
                    await asyncio.wait({stopping, *self._in_flight}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                # One message at a time unless more are known to be waiting. nats-py sends every pull request of
                # a subscription to the same inbox; when a request expires just after the client gave up on it,
                # its late 408 is taken for the answer to the next fetch, which then leaves a request behind
                # that ends without a word once it has a message. A batch fetch that gets that message keeps it
                # until its own request ends, up to the whole timeout (a dependent task released 100 ms late,
                # bench/PROFILE.md §10). fetch(1) returns on any message; a batch of messages the last one said
                # were waiting (num_pending) ends as soon as it has them. After a burst (a fetch that brought
                # several) the next asks for a batch too, but for BACKLOG_FETCH_S at most: under load that keeps
                # one request per batch, and a message held that way waits no longer than that.
                try:
                    if backlog or busy:
                        msgs = await sub.fetch(free, timeout=BACKLOG_FETCH_S)
                    else:
                        msgs = await sub.fetch(1, timeout=self.idle_fetch_s)
                except TimeoutError:  # also nats.errors.TimeoutError, its subclass
                    backlog, busy = 0, False
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self._process(msg))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                backlog, busy = (msgs[-1].metadata.num_pending or 0, len(msgs) > 1) if msgs else (0, False)
        finally:
            stopping.cancel()
            await self._finish(grace_s)
            await sub.unsubscribe()

    async def _finish(self, grace_s: float) -> None:
        """Let running handlers finish within the grace period; cancel the rest (they nak)."""
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(self._in_flight, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _process(self, msg: Msg) -> None:
        try:
            decoded = self.decode(msg.data)
        except (ValidationError, ValueError) as e:
            await self.dead_letter(msg, f"payload does not validate: {_short(e)}")
            return
        try:
            await self.handle(decoded, msg)
            metrics.MESSAGES.labels(self.durable, "handled").inc()
        except asyncio.CancelledError:
            # Shutting down mid-handler: give the message back at once so another replica takes it.
            await msg.nak()
            metrics.MESSAGES.labels(self.durable, "abandoned").inc()
            raise
        except Exception:
            log.exception("handler failed on %s (delivery %s); redelivering", msg.subject, _deliveries(msg))
            metrics.MESSAGES.labels(self.durable, "error").inc()
            await msg.nak(delay=self.error_delay_s)

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        """Copy ``msg`` with ``reason`` to the DLQ stream, then terminate it."""
        seq = msg.metadata.sequence.stream if msg.metadata else None
        letter = DeadLetter(
            stream=self.stream,
            consumer=self.durable,
            subject=msg.subject,
            stream_seq=seq,
            deliveries=_deliveries(msg),
            reason=reason,
            payload=msg.data.decode("utf-8", errors="replace"),
        )
        await publish(
            self.js, self.names.dlq(self.stream, self.durable), letter, msg_id=f"{self.stream}:{seq}:dead"
        )
        await msg.term()
        metrics.DEAD_LETTERS.labels(self.stream, self.durable).inc()
        log.warning("dead-lettered %s seq %s: %s", msg.subject, seq, reason, extra={"subject": msg.subject})


@contextlib.asynccontextmanager
async def keep_alive(msg: Msg, every_s: float) -> AsyncIterator[None]:
    """Tell the broker ``msg`` is still being worked on (``in_progress``) every ``every_s`` while the block runs.

    For handlers that wait on something slower than their durable's ``ack_wait`` (a model call), so the
    message is not redelivered to another replica meanwhile.
    """

    async def beat() -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await msg.in_progress()
            except Exception as e:  # noqa: BLE001 - one missed beat is made up by the next; stopping is not
                log.warning("heartbeat on %s failed, next in %gs: %s", msg.subject, every_s, e)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _deliveries(msg: Msg) -> int | None:
    return msg.metadata.num_delivered if msg.metadata else None


def redelivered(msg: Msg) -> bool:
    """Whether ``msg`` was delivered before: a handler that died or failed may not have finished with it."""
    return (_deliveries(msg) or 1) > 1


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in x['loc']) or 'payload'}: {x['msg']}" for x in e.errors()[:5]
        )
    return str(e)[:500]
