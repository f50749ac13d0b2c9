"""What a pool remembers of the executions that ended (to turn their queued tasks away without a read)."""

from __future__ import annotations

from pathlib import Path

import nats
from nats.aio.msg import Msg

from shared.names import Names
from shared.natsserver import NatsServer
from shared.pool import Endings
from shared.schemas import ExecutionCompleted
from tests.conftest import publish_once_back, service_runtime, until

NAMES = Names(namespace="t")


def ending(execution_id: str, status: str) -> Msg:
    return Msg(None, subject=NAMES.completed_event(execution_id),  # type: ignore[arg-type]
               headers={ExecutionCompleted.STATUS_HEADER: status})


async def test_only_executions_that_ended_early_are_remembered() -> None:
    endings = Endings(keep_s=60)
    for eid, status in (("done", "completed"), ("stopped", "cancelled"), ("late", "partial"), ("bad", "failed")):
        await endings._ended_one(ending(eid, status))
    assert [e for e in ("done", "stopped", "late", "bad", "other") if endings.ended(e)] == ["stopped", "late", "bad"]


async def test_an_ending_is_forgotten_once_older_than_the_execution_timeout() -> None:
    endings = Endings(keep_s=0)  # every earlier ending is past the timeout when the next one arrives
    await endings._ended_one(ending("first", "cancelled"))
    await endings._ended_one(ending("second", "cancelled"))
    assert not endings.ended("first") and endings.ended("second")


async def test_following_resumes_where_it_was_after_a_nats_restart_not_from_the_first_ending(tmp_path: Path) -> None:
    # nats-py's ordered consumer, recreated after an outage, resumes after the last sequence it delivered:
    # from the stream's first message if it has delivered none. Endings that are days old must not come back.
    server = NatsServer(tmp_path / "store").start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        rt = await service_runtime(nc, NAMES, tmp_path, service="codegen")
        js = rt.jetstream
        cancelled = {ExecutionCompleted.STATUS_HEADER: "cancelled"}
        for eid in ("long-ago", "latest"):
            await js.publish(NAMES.completed_event(eid), b"", headers=cancelled)
        endings = Endings(keep_s=600)
        following = await endings.follow(rt)
        await until(lambda: endings.ended("latest"), 10, "the stream's latest ending, delivered first")

        server.stop()  # the consumer (in memory on the server) is lost with it
        server.start()
        await until(lambda: nc.is_connected, 15, "the reconnection")
        await publish_once_back(js, NAMES.completed_event("during-recovery"), b"", headers=cancelled)
        await until(lambda: endings.ended("during-recovery"), 15, "the ending published after the restart")

        assert not endings.ended("long-ago")  # the recreated consumer did not start from the stream's beginning
        await following.unsubscribe()
    finally:
        await nc.close()
        server.stop()
