"""The typed pull-consumer loop and the heartbeat, against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from shared.consumer import Consumer, keep_alive
from shared.names import Names
from shared.topology import ensure_streams


async def test_a_full_consumer_stops_when_told_and_gives_its_messages_back(nc: NATS, names: Names) -> None:
    # Every slot is taken by a handler that would run for minutes (a model call): the stop must not wait for it.
    js = nc.jetstream()
    await ensure_streams(js, names)
    subject = names.results("stop")
    await js.add_consumer(names.results_stream, ConsumerConfig(durable_name="full", filter_subject=subject,
                                                               ack_policy=AckPolicy.EXPLICIT, ack_wait=60))
    await js.publish(subject, b"one")
    running = asyncio.Event()

    async def handle(_: bytes, msg: Msg) -> None:
        running.set()
        await asyncio.Event().wait()

    consumer = Consumer(js, names, names.results_stream, "full", lambda data: data, handle, capacity=1)
    stop = asyncio.Event()
    loop = asyncio.create_task(consumer.run(stop, grace_s=0.2))
    await asyncio.wait_for(running.wait(), 10)
    stop.set()
    await asyncio.wait_for(loop, 5)  # the grace period, not the handler, bounds the stop
    sub = await js.pull_subscribe_bind("full", stream=names.results_stream)
    [again] = await sub.fetch(1, timeout=5)  # handed back by the stop (nak), not after ack_wait (60 s)
    assert again.data == b"one" and again.metadata.num_delivered == 2


class _Beats(logging.Handler):
    """Counts failed heartbeats; ``third`` is set by the third."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.third = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if len(self.messages) >= 3:
            self.third.set()


async def test_a_failed_heartbeat_does_not_stop_the_next(nats_url: str, names: Names) -> None:
    own = await nats.connect(nats_url)
    js = own.jetstream()
    await ensure_streams(js, names)
    subject = names.results("beat")
    await js.publish(subject, b"x")
    sub = await js.pull_subscribe(subject, durable="beat", stream=names.results_stream)
    [msg] = await sub.fetch(1, timeout=5)
    await own.close()  # from now on every in_progress() on it fails
    beats, log = _Beats(), logging.getLogger("shared.consumer")
    log.addHandler(beats)
    try:
        async with keep_alive(msg, 0.02):
            await asyncio.wait_for(beats.third.wait(), 5)  # a beat that fails is followed by the next
    finally:
        log.removeHandler(beats)
    assert all(m.startswith(f"heartbeat on {subject} failed, next in 0.02s") for m in beats.messages)


async def test_a_message_delivered_on_an_older_pull_request_is_handled_at_once(nc: NATS, names: Names) -> None:
    """nats-py sends every pull request of a subscription to one inbox. A request left waiting at the server that
    ends without a word once it has its message takes the next one: here a fetch(1) given up on; in service, the
    request a batch fetch sends after taking the late 408 of an expired request for its own answer. The loop must
    hand that message on at once, not when its own request ends (30 s here)."""
    js = nc.jetstream()
    await ensure_streams(js, names)
    subject = names.results("older")
    await js.add_consumer(names.results_stream, ConsumerConfig(durable_name="older", filter_subject=subject,
                                                               ack_policy=AckPolicy.EXPLICIT))
    handled: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(data: bytes, msg: Msg) -> None:
        handled.put_nowait(data)
        await msg.ack()

    async def waiting_requests(n: int) -> None:
        for _ in range(1000):
            if (await js.consumer_info(names.results_stream, "older")).num_waiting == n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never {n} pull requests waiting")

    consumer = Consumer(js, names, names.results_stream, "older", lambda data: data, handle, capacity=8,
                        idle_fetch_s=30)
    stop = asyncio.Event()
    loop = asyncio.create_task(consumer.run(stop, grace_s=0.2))
    await waiting_requests(1)  # the loop's own request
    assert consumer.subscription is not None
    with contextlib.suppress(TimeoutError):  # a request of the same subscription that nobody waits on any more
        await asyncio.wait_for(consumer.subscription.fetch(1, timeout=30), 0.2)
    await waiting_requests(2)
    await js.publish(subject, b"first")  # to the loop's request, the older one
    assert await asyncio.wait_for(handled.get(), 10) == b"first"
    await waiting_requests(2)  # the loop asked again: now the abandoned request is older
    await js.publish(subject, b"second")  # delivered on the abandoned request
    assert await asyncio.wait_for(handled.get(), 10) == b"second"
    loop.cancel()  # its request waits 30 s; the stop is another test's
    with contextlib.suppress(asyncio.CancelledError):
        await loop
