"""Task results → execution state → released tasks → (when all are terminal) the final response."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.errors import NotFoundError

from services.aggregator.aggregate import aggregate
from services.aggregator.synthesis import Render, compose_answer
from shared import metrics
from shared.bus import emit, publish
from shared.consumer import keep_alive, persist, redelivered
from shared.costs import call_events, publish_cost
from shared.execution import (
    TaskMarks,
    all_tasks_terminal,
    apply_result,
    cancel,
    expire,
    fail_execution,
    lifecycle_events,
    marks,
    outcome,
    queued,
    run_bytes,
    run_msg_id,
)
from shared.failures import ON_EXHAUSTED
from shared.names import POOLS
from shared.providers import ModelProvider
from shared.schemas import (
    TERMINAL_TASK,
    AggregatedResult,
    CancelExecution,
    ConsumerAdvisory,
    DeadLetter,
    Execution,
    ExecutionDeadline,
    LifecycleEvent,
    ModelCall,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
    now,
)
from shared.service import Runtime
from shared.sizes import fit
from shared.state import Known
from shared.topology import EVENTS_DUPLICATE_WINDOW_S

log = logging.getLogger(__name__)

SUPERSEDED = "superseded: the execution changed before this answer was stored"


@dataclass
class _Change:
    """A change waiting for its execution's next write, and the message that asked for it."""

    apply: Callable[[Execution], bool]
    msg: Msg
    done: asyncio.Future[Execution | None]
    result: TaskStarted | TaskCompleted | TaskFailed | None  # None: not a task's result (cancel, deadline…)


@dataclass
class _Queue:
    """The changes of one execution waiting for its next write, and a signal that one more arrived."""

    changes: list[_Change]
    more: asyncio.Event
    fresh: bool  # one of them must start from a read (see _apply)


@dataclass
class _Unacknowledged:
    """A try of a write that failed after sending it, and what that write was to announce."""

    updated_at: datetime  # its version's: the same on the version read next if it was stored and nothing since
    events: list[LifecycleEvent]
    concluded: bool
    ended_before: bool
    ended_elsewhere: bool


@dataclass
class _Answer:
    """The end of an execution: status, aggregated results, the PM's answer and the call that wrote it."""

    status: str
    aggregated: AggregatedResult
    render: Render  # the answer as written for the version it is stored with: its cost line is that version's
    call: ModelCall | None
    suffix: str = ""

    def apply(self, ex: Execution) -> None:
        ex.status, ex.aggregated = self.status, self.aggregated  # type: ignore[assignment]
        if self.call is not None:
            ex.calls.append(self.call)  # in the same compare-and-set write as the answer: counted once
        ex.final_response = self.render(ex) + self.suffix
        ex.finished_at = ex.updated_at = now()


def _can_wait(ex: Execution, changes: list[_Change]) -> bool:
    """Whether storing ``changes`` may wait for the execution's next change: all are results that release
    no task (nothing depends on theirs, and the plan is not serial) while another task stays open. Not a
    failure that will be retried: the retry reads the document to learn how the attempt failed."""
    if ex.mode == "serial" or ex.terminal:
        return False
    depended_on = {d for t in ex.tasks for d in t.depends_on}
    ending = set()
    for c in changes:
        r = c.result
        if r is None or r.task_id in depended_on or (isinstance(r, TaskFailed) and not r.final):
            return False
        if isinstance(r, TaskCompleted) or (isinstance(r, TaskFailed) and r.final):
            ending.add(r.task_id)
    return any(t.status not in TERMINAL_TASK and t.id not in ending for t in ex.tasks)


def _count_finished(ex: Execution) -> None:
    metrics.execution_ended(ex.mode, ex.status, (ex.updated_at - ex.created_at).total_seconds())
    for c in ex.aggregated.conflicts_detected if ex.aggregated else []:
        metrics.CONFLICTS.labels(c.rule, c.kind).inc()
    log.info("execution %s, $%.4f: %s", ex.status, ex.cost.total_usd, ex.aggregated.summary if ex.aggregated else "",
             extra={"execution_id": ex.execution_id})


class AggregatorHandlers:
    def __init__(self, rt: Runtime, provider: ModelProvider) -> None:
        self.rt, self.provider = rt, provider
        # Per execution, the changes waiting while a write of it is in flight (see _apply).
        self._waiting: dict[str, _Queue] = {}
        # Per running execution, the version this replica last stored, parsed: the next write changes it in
        # place instead of reading and parsing (a stale one — another replica wrote since — loses the
        # compare-and-set and re-reads). Callers of a write get the same object; they only look at whether
        # it is terminal, which no later write changes.
        self._known: OrderedDict[str, Known] = OrderedDict()
        # Executions in flight on this replica. Each holds its document parsed (≈ 60 KiB for a 12 kB
        # document): at most ≈ 60 MiB; beyond it the oldest go back to a read.
        self._known_limit = 1_000

    async def _apply(self, execution_id: str, change: Callable[[Execution], bool], msg: Msg,
                     fresh: bool = False, result: TaskStarted | TaskCompleted | TaskFailed | None = None,
                     ) -> Execution | None:
        """Store ``change`` (compare-and-set) with the tasks it released, then publish its lifecycle events.

        The released tasks go out right behind the write, not a round trip after it; the events once it is
        stored. All of it before the caller acks: a crash in between replays the message, and msg-id dedup
        makes a second publish a no-op, as it does for the tasks of a version that lost the compare-and-set.

        Group commit: the results of one execution arrive together (a fan-out's tasks finish at once),
        and one compare-and-set write each made them race for the same key, re-reading and rewriting
        the document after every lost race. Here the first caller becomes the execution's writer; what
        arrives while it writes is applied, in arrival order, in its next write. Every change still sees
        the document as the previous one left it, so events and released tasks are exactly those of
        one-at-a-time processing; other replicas are still kept honest by the compare-and-set.

        ``fresh``: start from a read, not from the version this replica last stored. Cancel and deadline end
        every open task, so on a version another replica has moved past they would conclude (and answer, maybe
        with a billed model call) before the compare-and-set told them so. A fresh change that joins others
        waiting for a write makes that write start from a read too.

        Coalescing: a task's ``result`` that releases nothing and leaves other tasks open changes nothing
        anyone waits on, so it waits up to ``coalesce_results_s`` for the execution's next change and is
        stored with it. A fan-out's results then take one write, not one each. Its message stays unacked
        meanwhile: a crash replays it.
        """
        pending = _Change(change, msg, asyncio.get_running_loop().create_future(), result)
        queue = self._waiting.get(execution_id)
        if queue is not None:
            queue.changes.append(pending)  # a write of this execution is in flight: ride on the next one
            queue.fresh |= fresh
            queue.more.set()
            return await pending.done
        queue = self._waiting[execution_id] = _Queue([pending], asyncio.Event(), fresh)
        known = self._known.pop(execution_id, None)  # taken out either way: a stale one must not come back
        batch: list[_Change] = []
        try:
            await asyncio.sleep(0)  # results of this execution that arrived in the same fetch join the first write
            while queue.changes:
                if known is None or queue.fresh:  # and so do those that arrive while it is read
                    known, queue.fresh = None, False
                    with contextlib.suppress(Exception):  # else the write reads; its failure reaches every caller
                        known = await self.rt.executions.get(execution_id)
                if known is not None:
                    await self._coalesce(queue, known[0])
                    if queue.fresh:  # a cancel or deadline came while the others waited: read first
                        continue
                batch, queue.changes = queue.changes, []
                try:
                    ex, known = await self._write(execution_id, batch, known)
                except Exception as e:  # noqa: BLE001 - every caller of the batch sees the failure (and naks)
                    known = None
                    for c in batch:
                        c.done.set_exception(e)
                    continue
                for c in batch:
                    c.done.set_result(ex)
            if known is not None:  # None once finished (or unknown): nothing more to write from here
                self._known[execution_id] = known
                if len(self._known) > self._known_limit:
                    self._known.popitem(last=False)
        finally:
            del self._waiting[execution_id]
            for c in [*batch, *queue.changes]:
                if not c.done.done():  # only when cancelled mid-write (shutdown): the callers nak
                    c.done.cancel()
        return await pending.done

    async def _coalesce(self, queue: _Queue, ex: Execution) -> None:
        """Wait while the queued changes may wait (see _apply), for at most ``coalesce_results_s``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.rt.pe.coalesce_results_s
        held = 0
        try:
            while (left := until - loop.time()) > 0 and _can_wait(ex, queue.changes):
                metrics.RESULTS_COALESCING.inc(len(queue.changes) - held)
                held = len(queue.changes)
                queue.more.clear()
                try:
                    await asyncio.wait_for(queue.more.wait(), left)
                except TimeoutError:
                    return
        finally:
            metrics.RESULTS_COALESCING.dec(held)

    async def _write(self, execution_id: str, batch: list[_Change],
                     known: Known | None) -> tuple[Execution | None, Known | None]:
        """One compare-and-set write of ``batch`` — with the final answer when it leaves no task open —
        then its events, the tasks it released, and the final event."""
        events: list[LifecycleEvent] = []
        # The answer, with what it was computed from: reused by a retry after a lost compare-and-set only if the
        # version read then has the same task statuses and attempts, and the same attempts completed the tasks
        # (their outputs are what it sums up), else computed again. A change to the cost alone (a late report's, a
        # call another replica cut off and recorded) is only the cost line's, written for the version stored.
        answer: list[tuple[tuple[TaskMarks, dict[str, tuple[int | None, int]]], _Answer]] = []
        concluded = False
        ended_before = False
        ended_elsewhere = False  # the write stores calls of answers to a version another replica had ended
        superseded: set[str] = set()  # the ids of those calls (their cost events are this write's to publish)
        # A try whose write failed may have been stored all the same (NATS lost the acknowledgement): what it was to
        # announce, kept for the try that then finds nothing left to change. The retries of persist re-run the closures.
        latest: Execution | None = None  # the version of the latest try
        writing = False  # whether the latest try had anything to write
        unacknowledged: list[_Unacknowledged] = []

        def recorded(ex: Execution) -> bool:
            nonlocal ended_before, writing
            events.clear()
            ended_before = ex.terminal
            changed = False
            for c in batch:
                before = marks(ex)
                if c.apply(ex):
                    changed = True
                    events.extend(lifecycle_events(before, ex))
            writing = changed
            return changed

        async def conclude(ex: Execution) -> bool:
            nonlocal concluded, ended_elsewhere, writing, latest
            latest = ex
            concluded = all_tasks_terminal(ex) and not ex.terminal  # re-run on every retry: the last run tells
            basis = (marks(ex), {t.id: (a.run, a.n) for t in ex.tasks for a in t.attempts if a.outcome == "completed"})
            reuse = concluded and bool(answer) and answer[-1][0] == basis
            # Answers to versions that lost their write (all of them when another replica ended the execution
            # first: its answer and its call stand): their calls were made all the same, so they are recorded
            # before a new answer is written, whose cost line counts them. Not one this version already has: its
            # own write, stored although NATS failed to acknowledge it.
            recorded = {c.id for c in ex.calls}
            unused = [a.call for _, a in (answer[:-1] if reuse else answer)
                      if a.call is not None and a.call.id not in recorded]
            ex.calls.extend(call.model_copy(update={"error": SUPERSEDED}) for call in unused)
            if concluded:
                if not reuse:
                    answer.append((basis, await self._answer(ex, held)))
                answer[-1][1].apply(ex)
            ended_elsewhere = bool(unused) and not concluded
            superseded.update(c.id for c in unused)
            writing = writing or concluded or ended_elsewhere
            return concluded or ended_elsewhere

        js, names, limit = self.rt.jetstream, self.rt.names, self.rt.executions.limit
        queue = self._waiting[execution_id]  # _apply's, whose write this is

        def held() -> list[Msg]:
            """The batch's messages, and those that came to wait for the next write meanwhile: while a long
            synthesis call or a write through an outage holds this one, none of them may be redelivered."""
            return [c.msg for c in (*batch, *queue.changes)]

        def released(ex: Execution) -> list[Awaitable[PubAck]]:  # the PM publishes the first ones
            return [publish(js, names.tasks(t.pool), run_bytes(ex, t, limit), run_msg_id(execution_id, t.id))
                    for t in queued(ex) if t.depends_on or ex.mode == "serial"]

        # A write NATS cannot take (an outage, no quorum) is tried again rather than handed back: the answer, with
        # its model call, is reused as long as the version read adds up to the same. A try after a failed one
        # starts from a read: the failed one may have changed ``known`` in place.
        start = [known]

        async def write() -> tuple[Execution, int, bytes | None] | None:
            try:
                return await self.rt.executions.mutate_from(execution_id, recorded, start.pop() if start else None,
                                                            conclude, released)
            except Exception:
                if latest is not None and writing:  # not a try that had nothing to write (its sends or read failed)
                    unacknowledged.append(_Unacknowledged(latest.updated_at, list(events), concluded, ended_before,
                                                          ended_elsewhere))
                raise

        until = known[0].deadline_at if known is not None else now()
        result = await persist(write, held, until, self.rt.pe.ack_wait_s / 3, "store the execution",
                               {"execution_id": execution_id})
        if result is None:
            return None, None
        ex, revision, written = result
        stored_unseen = written is None and bool(unacknowledged)
        if stored_unseen:
            # Nothing was left to change: the last write that failed was stored after all (or another replica stored
            # the same changes). What it was to announce is announced now; what did go out, its msg-ids drop.
            last = unacknowledged[-1]
            events[:] = last.events
            ended_elsewhere = ended_elsewhere or last.ended_elsewhere
            if last.updated_at == ex.updated_at:  # its own version, not one written on top of it: it ended it if it
                concluded, ended_before = last.concluded, last.ended_before  # concluded (counted once, here)
        for e in events:
            await emit(self.rt.nats, names.events(execution_id, e.kind), e, e.msg_id())
        if ex.terminal and not ended_before:  # this write ended it: concluded, cancelled or failed before a plan
            _count_finished(ex)
        if ex.terminal and (not ended_before or await self._unannounced(ex, batch, stored_unseen)):
            await self._announce(ex, written)
        elif ended_elsewhere:  # the announcement was made without these calls: their cost events, and only theirs
            # (the others went out with it; past the events' duplicate window a repeat would be stored again)
            calls = [c for c in ex.calls if c.phase == "synthesis"]
            for call, event in zip(calls, call_events(execution_id, ex.calls, "synthesis"), strict=True):
                if call.id in superseded:
                    await publish_cost(self.rt.nats, names, event)
        return ex, None if ex.terminal else (ex, revision)

    async def _unannounced(self, ex: Execution, batch: list[_Change], stored_unseen: bool = False) -> bool:
        """Whether the final event of ``ex``, finished before this write, may never have been published.

        Only a redelivery can tell, or a write of this batch that failed and may have been stored
        (``stored_unseen``): the message that finished it is handed back when the announcement failed. A first
        delivery that finds it finished (its deadline check, 30 minutes on) announces nothing. Within the events
        stream's duplicate window a repeat is harmless (dropped); past it, it
        would be stored as a second final event, so the stream is asked whether the first one is there.
        """
        if not stored_unseen and not any(redelivered(c.msg) for c in batch):
            return False
        if ex.finished_at is not None and (now() - ex.finished_at).total_seconds() < EVENTS_DUPLICATE_WINDOW_S / 2:
            return True
        try:
            await self.rt.jetstream.get_last_msg(self.rt.names.events_stream,
                                                 self.rt.names.completed_event(ex.execution_id))
        except NotFoundError:
            return True
        return False

    async def on_result(self, r: TaskStarted | TaskCompleted | TaskFailed, msg: Msg) -> None:
        """Apply one result; release what it unblocks; finish the execution when nothing is left."""
        if await self._apply(r.execution_id, lambda ex: apply_result(ex, r), msg, result=r) is None:
            log.warning("result for unknown execution", extra={"execution_id": r.execution_id})
        await msg.ack()

    async def on_cancel(self, cmd: CancelExecution, msg: Msg) -> None:
        """Cancel: open tasks end cancelled, the execution finishes with what it has and its cost so far."""
        await self._apply(cmd.execution_id, lambda ex: cancel(ex, cmd.reason), msg, fresh=True)
        log.info("cancel: %s", cmd.reason, extra={"execution_id": cmd.execution_id})
        await msg.ack()

    async def on_deadline(self, check: ExecutionDeadline, msg: Msg) -> None:
        """At the deadline (when the stream's schedule publishes the check), finish the execution with what
        it has. A check that comes early by this process's clock is handed back until then."""
        left = (check.deadline_at - now()).total_seconds()
        if left > 0:
            await msg.nak(delay=left)
            return

        eid = check.execution_id

        def expire_or_fail(ex: Execution) -> bool:
            if not ex.tasks:
                failed = fail_execution(ex, "no plan was made before the execution deadline")
                if failed:
                    log.warning("execution failed at its deadline: %s", ex.error, extra={"execution_id": eid})
                return failed
            return expire(ex, "execution deadline exceeded")

        await self._apply(eid, expire_or_fail, msg, fresh=True)
        await msg.ack()

    async def on_advisory(self, adv: ConsumerAdvisory, msg: Msg) -> None:
        """A consumer gave up on a message: keep it in the DLQ with the reason, and tell its execution."""
        js, names = self.rt.jetstream, self.rt.names
        if adv.deleted:  # not a dead letter: the message is gone, and no one gave up on it
            log.info("%s seq %d was deleted while pending on consumer %s (a NATS restart that had not stored its "
                     "acknowledgement, or a purge): not a dead letter", adv.stream, adv.stream_seq, adv.consumer)
            await msg.ack()
            return
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
        # Same msg-id as the consumer's own copy of a poison message: one dead letter per message, counted once.
        data, _ = fit(letter.to_bytes, [[(letter, "payload")]], self.rt.executions.limit, "a dead letter")
        ack = await publish(js, names.dlq(adv.stream, adv.consumer, adv.stream_seq), data,
                            f"{adv.stream}:{adv.stream_seq}:dead")
        if not ack.duplicate:
            metrics.DEAD_LETTERS.labels(adv.stream, adv.consumer).inc()
        data, subject, reason = (original.data or b"") if original else b"", letter.subject, adv.describe()
        if not adv.exhausted:  # terminated by its consumer, whose own dead letter has the payload and the reason
            kept = await self._kept_letter(adv)
            if kept is not None:
                data, subject = data or kept.payload.encode(), subject or kept.subject
                reason = f"consumer {adv.consumer} terminated it: {kept.reason}"
        if data and adv.stream == names.tasks_stream:
            await self._task_dead(adv, data, reason)
            if original is not None and adv.exhausted:
                await js.delete_msg(adv.stream, adv.stream_seq)  # a work queue keeps what ran out of deliveries
        elif data and adv.stream == names.executions_stream and subject == names.execution_requested:
            await self._request_dead(data, reason, msg)
        log.warning("dead-lettered %s seq %d: %s", letter.subject or adv.stream, adv.stream_seq, letter.reason)
        await msg.ack()

    async def _kept_letter(self, adv: ConsumerAdvisory) -> DeadLetter | None:
        """The dead letter the consumer stored before it terminated the message (on the message's own subject)."""
        names = self.rt.names
        try:
            raw = await self.rt.jetstream.get_last_msg(names.dlq_stream,
                                                       names.dlq(adv.stream, adv.consumer, adv.stream_seq))
            return DeadLetter.model_validate_json(raw.data or b"")
        except (NotFoundError, ValueError):
            return None

    async def _task_dead(self, adv: ConsumerAdvisory, data: bytes, reason: str) -> None:
        """The task will never report: record its last attempt as failed for good. Read loosely: a message its
        pool refused as invalid still names its execution and task."""
        eid, tid, pool = _loosely(data, "execution_id", "task.id", "task.pool")
        if eid is None or tid is None or pool not in POOLS:
            return
        at = now()
        try:
            failed = TaskFailed(execution_id=eid, task_id=tid, pool=pool, attempt=max(1, adv.deliveries),
                                run=adv.stream_seq, worker="dead-letter", started_at=at, finished_at=at,
                                error=f"dead-lettered: {reason}", error_kind="dead_letter", final=True,
                                strategy=ON_EXHAUSTED[pool].value)
        except ValueError:  # ids no execution could have
            return
        # Its own msg-id: the worker may be alive after all (heartbeats that could not reach NATS) and report its
        # attempt, paid, with the attempt's msg-id. Dropped as a repeat of this one, its cost would be lost.
        await publish(self.rt.jetstream, self.rt.names.results(eid), failed, f"{failed.msg_id()}:dead")

    async def _request_dead(self, data: bytes, reason: str, msg: Msg) -> None:
        [eid] = _loosely(data, "execution_id")  # loosely too: the PM may have refused the request as invalid
        if eid is None:
            return

        def end(ex: Execution) -> bool:
            if not ex.tasks:
                return fail_execution(ex, f"could not be planned: {reason}")
            # Planned, then the PM gave up on it (its tasks could not all be sent): what is still open ends as at
            # the deadline, running attempts given up as lost (their late reports still add their cost), and the
            # answer is made from what is done.
            return expire(ex, f"its request was given up after it was planned: {reason}")

        await self._apply(eid, end, msg, fresh=True)

    async def _answer(self, snapshot: Execution, msgs: Callable[[], Iterable[Msg]]) -> _Answer:
        """Aggregate and synthesize the final answer of ``snapshot``, whose tasks are all terminal."""
        status = outcome(snapshot)
        agg = aggregate(snapshot, self.rt.pe.result_aggregation.conflict_resolution)
        # A long model call does not get the messages waiting on it redelivered (the template makes no call).
        alive = keep_alive(msgs, self.rt.pe.ack_wait_s / 3) if self.provider.writes else contextlib.nullcontext()
        async with alive:
            render, call = await compose_answer(snapshot, agg, status, self.rt.pe, self.provider,
                                                lambda cut: self.rt.record_call(snapshot.execution_id, cut))
        suffix = f"\n\n(Cancelled: {snapshot.error}.)" if status == "cancelled" and snapshot.error else ""
        return _Answer(status, agg, render, call, suffix)

    async def _announce(self, ex: Execution, document: bytes | None) -> None:
        """Conflict events, the synthesis call's cost event, then the final event (acknowledged: it is what
        callers wait for, and a failed publish replays the message). Msg-ids make repeats harmless."""
        nc, names, eid = self.rt.nats, self.rt.names, ex.execution_id
        for event in call_events(eid, ex.calls, "synthesis"):
            await publish_cost(nc, names, event)
        for i, conflict in enumerate(ex.aggregated.conflicts_detected if ex.aggregated else []):
            await emit(nc, names.events(eid, "conflict"),
                       LifecycleEvent(kind="conflict", execution_id=eid, data=conflict.model_dump()),
                       f"{eid}:conflict:{i}")
        await self.rt.announce_completed(ex, document)


def _loosely(data: bytes, *paths: str) -> list[str | None]:
    """Text fields (dotted paths) of a message that may not validate as a whole (what names its execution and task);
    None for one it does not have."""
    try:
        message: Any = json.loads(data)
    except ValueError:
        message = None
    found: list[str | None] = []
    for path in paths:
        value = message
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        found.append(value if isinstance(value, str) else None)
    return found
