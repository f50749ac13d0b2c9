"""The execution document in JetStream KV, changed only by compare-and-set."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import metrics
from shared.schemas import Execution
from shared.sizes import document_slots, fit

log = logging.getLogger(__name__)

Stored = tuple[bytes, int]  # a document as stored, and its KV revision
Known = tuple[Execution, int]  # a document as this process last wrote or read it, parsed, and its KV revision


class ExecutionStore:
    """Read-modify-write of one execution at a time; concurrent writers re-read and retry."""

    def __init__(self, kv: KeyValue, limit: int) -> None:
        self.kv = kv
        self.limit = limit  # bytes a document may take (shared.sizes.message_limit)

    async def create(self, ex: Execution) -> int:
        """Store a new execution; raises KeyWrongLastSequenceError if the id exists."""
        return await self.kv.create(ex.execution_id, ex.model_dump_json().encode())

    async def get(self, execution_id: str) -> Known | None:
        stored = await self.read(execution_id)
        return (Execution.model_validate_json(stored[0]), stored[1]) if stored else None

    async def mutate(self, execution_id: str, change: Callable[[Execution], bool]) -> Execution | None:
        """Apply ``change`` (which returns whether it changed anything) until the write wins.

        Returns the stored document (changed or not), or None when the execution does not exist.
        ``change`` must be a pure function of the document: it may run more than once.
        """
        result = await self.mutate_from(execution_id, change, None)
        return result[0] if result else None

    async def mutate_from(self, execution_id: str, change: Callable[[Execution], bool], known: Known | None,
                          then: Callable[[Execution], Awaitable[bool]] | None = None,
                          sends: Callable[[Execution], list[Awaitable[Any]]] | None = None,
                          ) -> tuple[Execution, int, bytes | None] | None:
        """``mutate``, starting from ``known`` (a version this process stored or read) instead of a read.

        ``known``'s document is changed in place (the caller hands it over), so a writer that applies
        several changes to one execution in a row neither reads nor parses before each write; if
        ``known`` is stale the write loses the compare-and-set and the loop re-reads as usual. ``then``
        runs after ``change`` on the same version and may change it further, in the same write (it is
        awaited, and like ``change`` re-run on a retry). Returns the document, its revision (the next
        call's ``known``) and the bytes written (None when nothing changed).

        ``sends(ex)`` lists the publishes the version implies (the tasks it releases). They go out right
        behind its write instead of a round trip after it, and are awaited before this returns; with no
        change, they go out on their own. So they must carry msg-ids: a version that loses the
        compare-and-set has sent its own, and the retry sends them again.
        """
        in_flight: list[asyncio.Future[Any]] = []
        try:
            while True:
                if known is None:
                    known = await self.get(execution_id)
                    if known is None:
                        return None
                ex, revision = known
                changed = change(ex)
                if then is not None:
                    changed = await then(ex) or changed
                if not changed:
                    await asyncio.gather(*(sends(ex) if sends else []))
                    return ex, revision, None
                new = ex.model_dump_json().encode()
                if len(new) > self.limit:
                    new = self._cut(ex)
                write = asyncio.ensure_future(self.kv.update(execution_id, new, last=revision))  # sent first
                in_flight.extend(asyncio.ensure_future(s) for s in (sends(ex) if sends else []))
                try:
                    revision = await write
                except KeyWrongLastSequenceError:
                    metrics.KV_CONFLICTS.inc()
                    log.debug("lost a compare-and-set race on %s; re-reading", execution_id)
                    known = None
                    continue
                await asyncio.gather(*in_flight)
                return ex, revision, new
        finally:
            for f in in_flight:
                f.cancel()  # only those of a failed write are still pending: the retry sends them again

    def _cut(self, ex: Execution) -> bytes:
        """``ex``'s bytes with the agents' longest texts cut to fit. Cut in a copy: ``ex`` keeps them whole, and so
        do the results and answers it shares objects with, for the next write (which cuts again if it must) and
        for the tasks it releases (cut to fit their own messages)."""
        copy = ex.model_copy(deep=True)
        new, cut = fit(lambda: copy.model_dump_json().encode(), document_slots(copy), self.limit,
                       "an execution document")
        metrics.TEXTS_CUT.labels("document").inc()
        log.warning("execution document over %d bytes: %d characters of the agents' output cut to fit", self.limit,
                    cut, extra={"execution_id": ex.execution_id})
        return new

    async def read(self, execution_id: str) -> Stored | None:
        """The stored document as bytes, and its revision; None when there is none."""
        try:
            entry = await self.kv.get(execution_id)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return entry.value, entry.revision
