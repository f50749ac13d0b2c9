"""The execution document in JetStream KV, changed only by compare-and-set."""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import metrics
from shared.schemas import Execution

log = logging.getLogger(__name__)


class ExecutionStore:
    """Read-modify-write of one execution at a time; concurrent writers re-read and retry."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, ex: Execution) -> int:
        """Store a new execution; raises KeyWrongLastSequenceError if the id exists."""
        return await self.kv.create(ex.execution_id, ex.model_dump_json().encode())

    async def get(self, execution_id: str) -> tuple[Execution, int] | None:
        try:
            entry = await self.kv.get(execution_id)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return Execution.model_validate_json(entry.value), entry.revision

    async def mutate(self, execution_id: str, change: Callable[[Execution], bool]) -> Execution | None:
        """Apply ``change`` (which returns whether it changed anything) until the write wins.

        Returns the stored document (changed or not), or None when the execution does not exist.
        ``change`` must be a pure function of the document: it may run more than once.
        """
        while True:
            current = await self.get(execution_id)
            if current is None:
                return None
            ex, revision = current
            if not change(ex):
                return ex
            try:
                await self.kv.update(execution_id, ex.model_dump_json().encode(), last=revision)
                return ex
            except KeyWrongLastSequenceError:
                metrics.KV_CONFLICTS.inc()
                log.debug("lost a compare-and-set race on %s; re-reading", execution_id)
