"""A typed pull-consumer loop: decode at the boundary, dead-letter poison, run handlers concurrently.

The loop asks for only as many messages as it has free local capacity, so one replica never holds
more of the durable's ``max_ack_pending`` slots than it can work on, and hands each message to its
handler the moment it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from pydantic import ValidationError

from shared import metrics
from shared.bus import publish
from shared.errors import said
from shared.names import Names
from shared.schemas import DeadLetter
from shared.sizes import fit, message_limit

log = logging.getLogger(__name__)

IDLE_FETCH_S = 1.0  # by default a pull request waits this long for a message, then the loop asks again
LOST_AFTER_S = 1.0  # a request whose end has not come this long after it expired is taken as lost (a crash)
RECONNECT_POLL_S = 0.1  # while disconnected the loop sends no request, and looks again this often
TICK_S = 0.25  # the loop's clock: a tick this much late or more (STALL_S) means the process stood still
STALL_S = 1.0
GIVEN_UP_AFTER = 0.9  # of ack_wait without a word from a delivery: the broker has handed it on, or is about to

M = TypeVar("M")
Handler = Callable[[M, Msg], Awaitable[None]]


class Consumer(Generic[M]):
    """Bind to an existing durable and feed each decoded message to ``handle``.

    The handler owns the ack: it acks, naks (with a delay) or terms. A handler that raises is
    logged and the message nak'ed for redelivery; the durable's ``max_deliver`` bounds that.
    """

    def __init__(
        self,
        nc: NATS,
        names: Names,
        stream: str,
        durable: str,
        decode: Callable[[bytes], M],
        handle: Handler[M],
        capacity: int,
        error_delay_s: float = 1.0,
        idle_fetch_s: float = IDLE_FETCH_S,
        ack_wait_s: float | None = None,
    ) -> None:
        self.nc, self.js, self.names, self.stream, self.durable = nc, nc.jetstream(), names, stream, durable
        self.decode, self.handle = decode, handle
        self.capacity = capacity
        self.ask_at = max(1, capacity // 4)  # free slots worth a pull request of their own
        self.error_delay_s = error_delay_s
        self.idle_fetch_s = idle_fetch_s
        self.ack_wait_s = ack_wait_s  # the durable's: a delivery older than this is not handled (see _dispatch)
        self._in_flight: set[asyncio.Task[None]] = set()
        metrics.prime(metrics.DEAD_LETTERS, [(stream, durable)])
        self._waker: asyncio.Future[None] | None = None

    async def run(self, stop: asyncio.Event, grace_s: float = 10.0) -> None:
        """Serve until ``stop``; then let running handlers finish for ``grace_s`` and hand the rest back."""
        pulls = _Pulls(self.nc, self.stream, self.durable, self._dispatch, self._wake)
        await pulls.open()
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        clock = asyncio.create_task(pulls.clock.run())
        try:
            while not stop.is_set():
                if pulls.refused:  # consumer gone, leadership change…: not again at once
                    log.warning("pull request to %s refused: %s; asking again in %gs",
                                self.durable, pulls.refused, self.error_delay_s)
                    pulls.refused = None
                    await asyncio.wait({stopping}, timeout=self.error_delay_s)
                    continue
                free = self.capacity - len(self._in_flight) - pulls.owed()
                if free >= self.ask_at:
                    if not self.nc.is_connected:
                        # nats-py would keep the request and send it on reconnect, when the loop has taken it as
                        # lost and asked again: every request of the outage would bring messages, past capacity.
                        await asyncio.wait({stopping}, timeout=RECONNECT_POLL_S)
                        continue
                    await pulls.request(free, self.idle_fetch_s)
                    continue
                # Until a message, a request's end or a handler's end changes that count (or the stop).
                self._waker = asyncio.get_running_loop().create_future()
                await asyncio.wait({stopping, self._waker}, timeout=pulls.until_lost(),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            clock.cancel()
            await pulls.close()  # what was delivered meanwhile is handled (see _dispatch)
            await self._finish(grace_s)

    def _wake(self) -> None:
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    def _dispatch(self, msg: Msg, since: float, waited: bool) -> None:
        """Handle ``msg``, which the broker may have sent as early as ``since`` (monotonic) and which may have waited
        in the socket through a stall (``waited``)."""
        if self.ack_wait_s is not None and time.monotonic() - since >= GIVEN_UP_AFTER * self.ack_wait_s:
            # It waited in the socket while the process stood still (SIGSTOP, a frozen VM): the broker has handed it
            # to another delivery, which may be running already. Handled, it would run twice (and past a pool's
            # limit); acked or nak'ed, it would act on the message that now stands for the other: neither.
            metrics.MESSAGES.labels(self.durable, "stale").inc()
            log.warning("delivery %s of %s taken in %.1fs after the broker may have sent it (the process stood "
                        "still): left to its redelivery", _deliveries(msg), msg.subject, time.monotonic() - since)
            return
        # One that arrives while the loop closes is handled too, within the grace period: handed back unrun, it
        # would use up a delivery all the same (on a task's last, the broker would give up on the task).
        task = asyncio.create_task(self._process(msg, waited))
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake()

    async def _finish(self, grace_s: float) -> None:
        """Let running handlers finish within the grace period; cancel the rest (they nak)."""
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(self._in_flight, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _process(self, msg: Msg, waited: bool) -> None:
        try:
            if waited and self.ack_wait_s is not None:
                # It may have waited through a stall, short of the broker handing it on: the broker hears it is
                # alive at once, so that the handler starts with the whole of ack_wait before it.
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()
            try:
                decoded = self.decode(msg.data)
            except (ValidationError, ValueError) as e:
                await self.dead_letter(msg, f"payload does not validate: {_short(e)}")
                return
            await self.handle(decoded, msg)
            metrics.MESSAGES.labels(self.durable, "handled").inc()
        except asyncio.CancelledError:
            # Shutting down mid-handler: give the message back at once so another replica takes it.
            await msg.nak()
            metrics.MESSAGES.labels(self.durable, "abandoned").inc()
            raise
        except Exception:  # the handler, or the dead-letter's publish: again after error_delay_s, not ack_wait
            log.exception("handling %s failed (delivery %s); redelivering", msg.subject, _deliveries(msg))
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
        data, _ = fit(letter.to_bytes, [[(letter, "payload")]], message_limit(self.nc), "a dead letter")
        await publish(self.js, self.names.dlq(self.stream, self.durable, seq or 0), data,
                      msg_id=f"{self.stream}:{seq}:dead")
        await msg.term()
        metrics.DEAD_LETTERS.labels(self.stream, self.durable).inc()
        log.warning("dead-lettered %s seq %s: %s", msg.subject, seq, reason, extra={"subject": msg.subject})


class _Clock:
    """When the process last stood still (SIGSTOP, a frozen VM, a loop blocked for seconds), seen by a tick due
    every ``TICK_S``: what its socket took in meanwhile reaches the handlers only after it."""

    def __init__(self) -> None:
        self._tick: float | None = None
        self.stall: tuple[float, float] | None = None  # the last one: (its start, when it was seen to end)

    async def run(self) -> None:
        self._tick = time.monotonic()
        try:
            while True:
                await asyncio.sleep(TICK_S)
                self.see()
        finally:
            self._tick = None

    def see(self) -> float:
        """Now; a stall if the last tick is overdue (also before the tick itself comes round after it)."""
        now = time.monotonic()
        if self._tick is not None:
            if now - self._tick >= STALL_S:
                self.stall = (self._tick, now)
            self._tick = now
        return now


class _Pulls:
    """The pull requests of one consumer loop, on an inbox of its own with a reply subject per request.

    A message is handed on the moment it arrives. nats-py's ``fetch`` returns a batch only once it is
    complete or timed out, and sends every request of a subscription to the same inbox, where a late status
    of one request can be taken for another's answer (bench/PROFILE.md §10). Here each status names its
    request. A message does not (it carries its own subject), but the server serves waiting requests in
    order, so it is counted against the oldest.
    """

    def __init__(self, nc: NATS, stream: str, durable: str, dispatch: Callable[[Msg, float, bool], None],
                 wake: Callable[[], None]) -> None:
        self.nc, self.dispatch, self.wake = nc, dispatch, wake
        self.clock = _Clock()
        self.subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.refused: str | None = None  # why the server ended a request other than by its expiry
        self._inbox = ""
        self._sub: Subscription | None = None
        self._sent = 0
        # request → [messages it may still bring, when it expires, when sent]; oldest first
        self._owed: dict[str, list[float]] = {}

    async def open(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def close(self) -> None:
        """No more requests answered; what is queued still goes through ``_on_msg``."""
        if self._sub is None or self.nc.is_closed or self.nc.is_draining:
            return  # the connection's own end takes the subscription with it
        try:
            await self._sub.drain()
        except nats.errors.Error as e:  # a reconnect under way: what was queued comes back after ack_wait
            log.warning("could not drain the pull inbox: %r", e)

    async def request(self, batch: int, expires_s: float) -> None:
        self._sent += 1
        token = str(self._sent)
        sent = time.monotonic()
        self._owed[token] = [batch, sent + expires_s, sent]
        body = json.dumps({"batch": batch, "expires": int(expires_s * 1e9)}).encode()
        await self.nc.publish(self.subject, body, reply=f"{self._inbox}.{token}")

    def owed(self) -> int:
        """Messages the open requests may still bring; a request past its time without an end is dropped."""
        now = self.clock.see()
        for token in [t for t, owed in self._owed.items() if self._lost_at(owed) < now]:
            del self._owed[token]
        return int(sum(n for n, _, _ in self._owed.values()))

    def until_lost(self) -> float | None:
        """Seconds until the next open request is taken as lost, if its end does not come first."""
        if not self._owed:
            return None
        return max(0.0, min(self._lost_at(owed) for owed in self._owed.values()) - time.monotonic())

    def _lost_at(self, owed: list[float]) -> float:
        """When a request is taken as lost: LOST_AFTER_S after it expired, or after the process stood still if it
        was open then. Its messages and its end may be waiting in the socket: counted against it, they are known
        for what came during the stall (``_sent_since``)."""
        _, expires_at, sent = owed
        stall = self.clock.stall
        after = max(expires_at, stall[1]) if stall is not None and sent <= stall[1] else expires_at
        return after + LOST_AFTER_S

    def _sent_since(self) -> tuple[float, bool]:
        """When the server may have sent the message that arrives now, at the earliest, and whether it may have
        waited through a stall: the request it answers (the oldest open one) was open then, or none is and the
        stall just ended. The earliest is the stall's start if that request expired during the stall: no message
        came for it after. One that outlived the stall may have brought this one after it too: now."""
        now = self.clock.see()
        stall = self.clock.stall
        if stall is None:
            return now, False
        oldest = next(iter(self._owed.values()), None)
        if oldest is None:
            waited = expired = now - stall[1] <= LOST_AFTER_S
        else:
            _, expires_at, sent = oldest
            waited, expired = sent <= stall[1], expires_at <= stall[1]
        return (stall[0] if waited and expired else now), waited

    async def _on_msg(self, msg: Msg) -> None:
        # A delivery has an ack subject to reply to; a status has none. Its headers alone cannot tell: nats-py
        # puts the status line under "Status", where a publisher's own header of that name lands too.
        status = None if msg.reply else (msg.headers or {}).get("Status")
        if status is None:
            self.dispatch(msg, *self._sent_since())  # also one that comes after its request was taken as lost
            for token, owed in self._owed.items():
                owed[0] -= 1
                if owed[0] <= 0:
                    del self._owed[token]
                break
        elif status != "100":  # not a heartbeat: the request it is addressed to is over
            self._owed.pop(msg.subject.rsplit(".", 1)[-1], None)
            if status != "408":  # 408: expired, the usual end of an idle request
                self.refused = f"{status} {(msg.headers or {}).get(api.Header.DESCRIPTION, '')}".strip()
        self.wake()


@contextlib.asynccontextmanager
async def keep_alive(msgs: Callable[[], Iterable[Msg]], every_s: float) -> AsyncIterator[None]:
    """Tell the broker each message ``msgs()`` returns is still being worked on (``in_progress``), every
    ``every_s`` while the block runs; asked again at each beat, so messages that came to wait on the same
    work meanwhile are kept too.

    For handlers that wait on something slower than their durable's ``ack_wait`` (a model call, a write
    through an outage), so the messages are not redelivered to another replica meanwhile.
    """

    async def beat() -> None:
        while True:
            await asyncio.sleep(every_s)
            for msg in msgs():
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


# What a NATS outage, a reconnect or a stream without quorum raise: worth trying again, unlike a refused request.
UNAVAILABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError,
               nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
               nats.errors.OutboundBufferLimitError, nats.js.errors.ServiceUnavailableError,
               nats.js.errors.NoStreamResponseError)
PERSIST_RETRY_S = 1.0  # between tries of persist()
PERSIST_AT_LEAST_S = 300.0  # how long persist() tries at least, also past the deadline (the deadline's answer)

T = TypeVar("T")


async def persist(op: Callable[[], Awaitable[T]], msgs: Callable[[], Iterable[Msg]], until: datetime, every_s: float,
                  what: str, ctx: dict[str, Any]) -> T:
    """``op()``, the publish or write that keeps what a paid model call produced, tried again every
    ``PERSIST_RETRY_S`` while NATS cannot take it, until ``until`` (the execution's deadline) and for at least
    ``PERSIST_AT_LEAST_S``, with ``msgs()`` kept alive every ``every_s`` meanwhile (see ``keep_alive``). Handing
    them back instead would pay for the call again: the result exists only here. ``op`` must be safe to repeat
    (a msg-id, a compare-and-set from a fresh read). The minimum is for what is due at or after the deadline:
    the answer to the deadline's own check, a late result."""
    until = max(until, datetime.now(UTC) + timedelta(seconds=PERSIST_AT_LEAST_S))

    def unavailable(e: Exception) -> None:
        if datetime.now(UTC) >= until:
            raise e
        log.warning("could not %s (%s: %s); again in %gs", what, type(e).__name__, e, PERSIST_RETRY_S, extra=ctx)

    try:
        return await op()
    except UNAVAILABLE as e:
        unavailable(e)
    async with keep_alive(msgs, every_s):  # only once it failed: no heartbeat task on the way that works
        while True:
            await asyncio.sleep(PERSIST_RETRY_S)
            try:
                return await op()
            except UNAVAILABLE as e:
                unavailable(e)


def _deliveries(msg: Msg) -> int | None:
    return msg.metadata.num_delivered if msg.metadata else None


def redelivered(msg: Msg) -> bool:
    """Whether ``msg`` was delivered before: a handler that died or failed may not have finished with it."""
    return (_deliveries(msg) or 1) > 1


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in x['loc']) or 'payload'}: {said(x)}" for x in e.errors()[:5]
        )
    return str(e)[:500]
