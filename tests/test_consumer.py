"""The typed pull-consumer loop and the heartbeat, against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import REGISTRY

from shared.consumer import Consumer, keep_alive
from shared.names import Names
from shared.natsserver import NatsServer
from shared.schemas import DeadLetter
from shared.topology import ensure_streams
from tests.conftest import publish_once_back, until


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

    consumer = Consumer(nc, names, names.results_stream, "full", lambda data: data, handle, capacity=1)
    stop = asyncio.Event()
    loop = asyncio.create_task(consumer.run(stop, grace_s=0.2))
    await asyncio.wait_for(running.wait(), 10)
    stop.set()
    await asyncio.wait_for(loop, 5)  # the grace period, not the handler, bounds the stop
    sub = await js.pull_subscribe_bind("full", stream=names.results_stream)
    [again] = await sub.fetch(1, timeout=5)  # handed back by the stop (nak), not after ack_wait (60 s)
    assert again.data == b"one" and again.metadata.num_delivered == 2


async def test_a_message_that_arrives_as_the_consumer_stops_is_run_not_handed_back(
    nc: NATS, nats_url: str, names: Names,
) -> None:
    # Handed back unrun, it used up a delivery all the same: on a task's last one the broker gave up on the task,
    # and its execution failed it as dead-lettered. Each message here comes as a loop closes: run by that loop, it
    # is handled on its first delivery. Handed back, it would come again at once, on its second.
    js = nc.jetstream()
    await ensure_streams(js, names)
    subject = names.results("closing")
    await js.add_consumer(names.results_stream, ConsumerConfig(durable_name="closing", filter_subject=subject,
                                                               ack_policy=AckPolicy.EXPLICIT, ack_wait=2,
                                                               max_deliver=2))
    handled: list[bytes] = []
    again: list[bytes] = []  # handled on a second delivery

    async def handle(data: bytes, msg: Msg) -> None:
        handled.append(data)
        if msg.metadata.num_delivered > 1:
            again.append(data)
        await msg.ack()

    def consumer() -> Consumer[bytes]:
        return Consumer(nc, names, names.results_stream, "closing", lambda data: data, handle, capacity=1)

    async def asking() -> bool:
        return (await js.consumer_info(names.results_stream, "closing")).num_waiting > 0

    publisher = await nats.connect(nats_url)
    sent = [f"m{i}".encode() for i in range(20)]
    try:
        for data in sent:  # each: the loop's pull request open, then a message and the stop at once
            stop = asyncio.Event()
            loop = asyncio.create_task(consumer().run(stop, grace_s=5))
            await until(asking, 5, "a pull request")
            stop.set()  # the loop closes while the message is on its way
            await publisher.jetstream().publish(subject, data)
            await asyncio.wait_for(loop, 10)
    finally:
        await publisher.close()
    stop = asyncio.Event()
    loop = asyncio.create_task(consumer().run(stop))  # takes whatever the stopping loops left
    try:
        await until(lambda: len(handled) == len(sent), 10, f"every message run ({len(handled)} so far)")
    finally:
        stop.set()
        await asyncio.wait_for(loop, 10)
    assert sorted(handled) == sorted(sent)
    # One may come again after ack_wait: the server can send a message to a request's inbox in the instant its
    # subscription ends (it checks the inbox's interest, then sends). That one is neither run nor handed back by the
    # closing loop, and no client can prevent it; a loop that handed messages back would show many.
    assert len(again) <= 1, again


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
        async with keep_alive(lambda: [msg], 0.02):
            await asyncio.wait_for(beats.third.wait(), 5)  # a beat that fails is followed by the next
    finally:
        log.removeHandler(beats)
    assert all(m.startswith(f"heartbeat on {subject} failed, next in 0.02s") for m in beats.messages)


def durable(js: JetStreamContext, names: Names, name: str, subject: str) -> Awaitable[object]:
    return js.add_consumer(names.results_stream, ConsumerConfig(durable_name=name, filter_subject=subject,
                                                                ack_policy=AckPolicy.EXPLICIT, max_ack_pending=100))


@dataclass
class Loop:
    js: JetStreamContext
    subject: str
    handled: asyncio.Queue[bytes]  # every payload handled, in order (the handler acks it)
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def acking_loop(nc: NATS, names: Names, name: str, **options: Any) -> AsyncIterator[Loop]:
    """A consumer loop on a new durable ``name`` (up to 100 unacked) whose handler acks and queues each payload;
    stopped on the way out."""
    js = nc.jetstream()
    await ensure_streams(js, names)
    subject = names.results(name)
    await durable(js, names, name, subject)
    handled: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(data: bytes, msg: Msg) -> None:
        handled.put_nowait(data)
        await msg.ack()

    consumer = Consumer(nc, names, names.results_stream, name, lambda data: data, handle, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop, grace_s=0.2))
    yield Loop(js, subject, handled, task)
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_a_message_is_handed_on_as_it_arrives_not_when_its_pull_request_ends(nc: NATS, names: Names) -> None:
    # The loop's request asks for 8 messages and waits 30 s. nats-py's fetch(8) would keep a first message
    # until it had all 8 or the 30 s were over.
    async with acking_loop(nc, names, "arrives", capacity=8, idle_fetch_s=30) as loop:
        for body in (b"first", b"second", b"third"):
            await loop.js.publish(loop.subject, body)
            assert await asyncio.wait_for(loop.handled.get(), 10) == body


async def test_a_message_with_a_header_named_status_is_a_message(nc: NATS, names: Names) -> None:
    # The status line of the server's answers reaches nats-py as a "Status" header; a publisher may send one too.
    async with acking_loop(nc, names, "status", capacity=4, idle_fetch_s=30) as loop:
        await loop.js.publish(loop.subject, b"odd", headers={"Status": "409", "Description": "Consumer Deleted"})
        await loop.js.publish(loop.subject, b"plain")
        assert [await asyncio.wait_for(loop.handled.get(), 10) for _ in range(2)] == [b"odd", b"plain"]


@dataclass
class Holding:
    """A handler that holds every message until ``go`` is set, then acks it; counts how many it held at once."""

    go: asyncio.Event = field(default_factory=asyncio.Event)
    running: set[bytes] = field(default_factory=set)
    most: int = 0
    done: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    async def handle(self, data: bytes, msg: Msg) -> None:
        self.running.add(data)
        self.most = max(self.most, len(self.running))
        await self.go.wait()
        self.running.discard(data)
        await msg.ack()
        self.done.put_nowait(data)


async def test_no_more_handlers_run_at_once_than_the_capacity(nc: NATS, names: Names) -> None:
    # The durable would hand out 100 at once: the loop's own capacity (2) is what limits here.
    js = nc.jetstream()
    await ensure_streams(js, names)
    subject = names.results("capacity")
    await durable(js, names, "capacity", subject)
    held = Holding()
    for i in range(5):
        await js.publish(subject, b"%d" % i)
    consumer = Consumer(nc, names, names.results_stream, "capacity", lambda data: data, held.handle, capacity=2)
    stop = asyncio.Event()
    loop = asyncio.create_task(consumer.run(stop, grace_s=0.2))
    await until(lambda: len(held.running) == 2, 10, "two handlers running")
    assert (await js.consumer_info(names.results_stream, "capacity")).num_ack_pending == 2
    held.go.set()
    assert sorted([await asyncio.wait_for(held.done.get(), 10) for _ in range(5)]) == [b"0", b"1", b"2", b"3", b"4"]
    assert held.most == 2
    stop.set()
    await asyncio.wait_for(loop, 10)


async def test_a_refused_pull_request_is_logged_and_asked_again_later(nc: NATS, names: Names,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    # The loop's request waits 30 s: one renewed meanwhile would find no consumer, not be ended by its deletion.
    async with acking_loop(nc, names, "refused", capacity=4, error_delay_s=0.05, idle_fetch_s=30) as loop:
        js = loop.js
        for _ in range(1000):
            if (await js.consumer_info(names.results_stream, "refused")).num_waiting == 1:
                break
            await asyncio.sleep(0.01)
        caplog.set_level(logging.WARNING, "shared.consumer")
        await js.delete_consumer(names.results_stream, "refused")  # the server ends the waiting request: 409
        await until(lambda: any("409 Consumer Deleted" in r.getMessage() for r in caplog.records), 10,
                    "the refusal logged")
        await durable(js, names, "refused", loop.subject)
        await js.publish(loop.subject, b"back")
        assert await asyncio.wait_for(loop.handled.get(), 10) == b"back"
        assert not loop.task.done()


async def test_the_loop_asks_again_when_its_request_was_lost_with_the_server(tmp_path: Path, names: Names) -> None:
    # A server that crashed has forgotten the waiting pull requests, and said nothing about them (one that
    # shuts down ends them with a 409).
    server = NatsServer(tmp_path / "store").start()
    own = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        async with acking_loop(own, names, "lost", capacity=4) as loop:
            await loop.js.publish(loop.subject, b"before")
            assert await asyncio.wait_for(loop.handled.get(), 10) == b"before"
            assert server.proc is not None
            server.proc.kill()
            server.proc.wait()
            server.start()
            await publish_once_back(loop.js, loop.subject, b"after")
            # The ack of "before" may have died with the server (it is flushed to disk in the background), so
            # "before" may come again first: at least once.
            again = [await asyncio.wait_for(loop.handled.get(), 15)]
            while again[-1] != b"after":
                again.append(await asyncio.wait_for(loop.handled.get(), 15))
            assert set(again[:-1]) <= {b"before"}
    finally:
        await own.close()
        server.stop()


async def test_requests_are_not_queued_while_disconnected_to_bring_more_than_the_capacity_after(
    tmp_path: Path, names: Names,
) -> None:
    # While the client knows it is disconnected, nats-py keeps what it publishes and sends it on reconnect. Pull
    # requests kept like that would all be served then, beside the ones the loop sends after reconnecting.
    server = NatsServer(tmp_path / "store").start()
    own = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    held = Holding()
    try:
        js = own.jetstream()
        await ensure_streams(js, names)
        subject = names.results("outage")
        await durable(js, names, "outage", subject)  # the durable would hand out 100 at once
        consumer = Consumer(own, names, names.results_stream, "outage", lambda data: data, held.handle, capacity=2)
        stop = asyncio.Event()
        loop = asyncio.create_task(consumer.run(stop, grace_s=0.2))
        await until(lambda: own.is_connected, 5, "connected")
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        await until(lambda: not own.is_connected, 5, "the client noticing the outage")
        # An outage of three lost-request periods: the loop takes its request as lost, and asks again, thrice.
        await asyncio.sleep(3 * (1 + 1) + 0.5)
        server.start()
        for i in range(8):
            await publish_once_back(js, subject, b"%d" % i)
        await until(lambda: len(held.running) >= 2, 10, "two handlers running")
        # Anything queued during the outage would have been served by now, on top of the two.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until(lambda: len(held.running) > 2, 10, "more than the capacity"), 3)
        assert held.most == 2
        held.go.set()
        stop.set()
        await asyncio.wait_for(loop, 10)
    finally:
        held.go.set()
        await own.close()
        server.stop()


async def test_a_dead_letter_that_cannot_be_stored_is_tried_again_soon_not_after_ack_wait(nc: NATS,
                                                                                          names: Names) -> None:
    js = nc.jetstream()
    await ensure_streams(js, names)
    subject = names.results("poison")
    await js.add_consumer(names.results_stream, ConsumerConfig(durable_name="poison", filter_subject=subject,
                                                               ack_policy=AckPolicy.EXPLICIT, ack_wait=60))
    await js.delete_stream(names.dlq_stream)  # the dead letter's publish finds no stream: no responders

    def decode(data: bytes) -> bytes:
        raise ValueError("not a message")

    async def handle(_: bytes, msg: Msg) -> None:
        raise AssertionError("a payload that does not decode reached the handler")

    failed = {"consumer": "poison", "outcome": "error"}
    before = REGISTRY.get_sample_value("openclaw_messages_total", failed) or 0.0
    consumer = Consumer(nc, names, names.results_stream, "poison", decode, handle, capacity=4,
                        error_delay_s=2)  # time to put the DLQ back before the second delivery
    stop = asyncio.Event()
    loop = asyncio.create_task(consumer.run(stop, grace_s=0.2))
    try:
        await js.publish(subject, b"garbage")
        await until(lambda: (REGISTRY.get_sample_value("openclaw_messages_total", failed) or 0.0) > before, 10,
                    "the dead letter's publish to fail")
        await ensure_streams(js, names)  # the DLQ is back
        letters = await js.subscribe(names.dlq(names.results_stream, "poison", "*"), stream=names.dlq_stream)
        letter = DeadLetter.model_validate_json((await letters.next_msg(timeout=10)).data)  # ack_wait is 60 s
        assert (letter.payload, letter.deliveries) == ("garbage", 2)
        assert letter.reason.startswith("payload does not validate: not a message")
    finally:
        stop.set()
        await asyncio.wait_for(loop, 10)


@contextlib.asynccontextmanager
async def stood_still(nc: NATS, nats_url: str, names: Names, durable: str, ack_wait: float, stall_s: float,
                      capacity: int = 1, work_s: float = 0.0) -> AsyncIterator[list[tuple[bytes, int]]]:
    """A consumer (its durable's ``ack_wait``, its requests open 2 s) that has handled "one"; then its loop stands
    still for ``stall_s`` (as a process stopped by SIGSTOP, a frozen VM), while another connection publishes "two",
    which the server delivers into the request open as the stall begins, and which expires during it. Yields what
    the handler was given, (body, delivery), each one acked after ``work_s`` for "two"; stops the loop on exit."""
    js = nc.jetstream()
    await ensure_streams(js, names)
    subject = names.results(durable)
    await js.add_consumer(names.results_stream, ConsumerConfig(durable_name=durable, filter_subject=subject,
                                                               ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait))
    handled: list[tuple[bytes, int]] = []

    async def handle(data: bytes, msg: Msg) -> None:
        handled.append((data, msg.metadata.num_delivered))
        if data == b"two":
            await asyncio.sleep(work_s)
        await msg.ack()

    async def asking() -> bool:
        return (await js.consumer_info(names.results_stream, durable)).num_waiting > 0

    def publish_elsewhere() -> None:  # from a thread of its own: this one's loop is about to stand still
        async def go() -> None:
            other = await nats.connect(nats_url)
            await other.jetstream().publish(subject, b"two")
            await other.close()
        asyncio.run(go())

    consumer = Consumer(nc, names, names.results_stream, durable, lambda data: data, handle, capacity=capacity,
                        idle_fetch_s=2, ack_wait_s=ack_wait)
    stop = asyncio.Event()
    loop = asyncio.create_task(consumer.run(stop))
    try:
        await js.publish(subject, b"one")
        await until(lambda: handled == [(b"one", 1)], 10, "the first message")
        await until(asking, 10, "the next pull request")
        publisher = threading.Thread(target=publish_elsewhere)
        publisher.start()
        time.sleep(stall_s)  # noqa: ASYNC251 - the loop stands still: the stall itself, not a wait
        publisher.join()
        yield handled
    finally:
        stop.set()
        await asyncio.wait_for(loop, 10)


async def test_a_delivery_taken_in_after_the_process_stood_still_past_ack_wait_is_left_to_its_redelivery(
    nc: NATS, nats_url: str, names: Names,
) -> None:
    # A process stopped with a pull request open: the server delivers into its socket, and after ack_wait hands the
    # message to another delivery. Taken in on waking, the first delivery ran beside (or after) the redelivery: a
    # task paid twice, past its pool's limit.
    stale = REGISTRY.get_sample_value("openclaw_messages_total", {"consumer": "still", "outcome": "stale"}) or 0
    async with stood_still(nc, nats_url, names, "still", ack_wait=2, stall_s=3) as handled:
        await until(lambda: len(handled) == 2, 10, "the message handled once")
    assert handled == [(b"one", 1), (b"two", 2)]  # the redelivery; the delivery of the stall was left alone
    assert REGISTRY.get_sample_value("openclaw_messages_total", {"consumer": "still", "outcome": "stale"}) == stale + 1


async def test_a_delivery_taken_in_after_a_shorter_stall_tells_the_broker_at_once_that_it_is_alive(
    nc: NATS, nats_url: str, names: Names,
) -> None:
    # Stood still for 3.5 s of a 6 s ack_wait: short of being handed on, but a handler that heartbeats only after a
    # third of ack_wait would be too late; the broker redelivered while the first delivery still ran (its work takes
    # it past the broker's ack_wait counted from before the stall).
    js = nc.jetstream()
    async with stood_still(nc, nats_url, names, "short", ack_wait=6, stall_s=3.5, capacity=2,
                           work_s=4.5) as handled:
        async def done() -> bool:
            info = await js.consumer_info(names.results_stream, "short")
            return info.num_ack_pending == 0 and info.num_pending == 0
        await until(done, 15, "the message acknowledged")
    assert handled == [(b"one", 1), (b"two", 1)]  # run once: no redelivery beside it
