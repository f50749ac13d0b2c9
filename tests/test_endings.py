"""What a pool remembers of the executions that ended (to turn their queued tasks away without a read)."""

from __future__ import annotations

from nats.aio.msg import Msg

from shared.names import Names
from shared.pool import Endings
from shared.schemas import ExecutionCompleted

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
