"""Every stream, subject, consumer and bucket name, in one place.

A namespace (``OPENCLAW_NAMESPACE``) prefixes all of them so several stacks, or several
tests, can share one nats-server without seeing each other's messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Pool = Literal["codegen", "security", "database"]
POOLS: tuple[Pool, ...] = get_args(Pool)


@dataclass(frozen=True)
class Names:
    """Names for one namespace; the empty namespace gives the plain production names."""

    namespace: str = ""

    def _stream(self, base: str) -> str:
        return f"{self.namespace}_{base}" if self.namespace else base

    def _subject(self, base: str) -> str:
        return f"{self.namespace}.{base}" if self.namespace else base

    # streams
    @property
    def executions_stream(self) -> str:
        return self._stream("EXECUTIONS")

    @property
    def tasks_stream(self) -> str:
        return self._stream("TASKS")

    @property
    def results_stream(self) -> str:
        return self._stream("RESULTS")

    @property
    def events_stream(self) -> str:
        return self._stream("EVENTS")

    @property
    def dlq_stream(self) -> str:
        return self._stream("DLQ")

    @property
    def advisories_stream(self) -> str:
        return self._stream("ADVISORIES")

    @property
    def kv_bucket(self) -> str:
        return self._stream("executions").lower()

    @property
    def kv_stream(self) -> str:
        """The stream behind the KV bucket (JetStream names it after the bucket)."""
        return f"KV_{self.kv_bucket}"

    @property
    def all_streams(self) -> tuple[str, ...]:
        return (
            self.executions_stream,
            self.tasks_stream,
            self.results_stream,
            self.events_stream,
            self.dlq_stream,
            self.advisories_stream,
        )

    @property
    def consumed_streams(self) -> tuple[str, ...]:
        """Streams with durable consumers whose give-ups (max deliveries, terminations) are captured."""
        return (self.executions_stream, self.tasks_stream, self.results_stream)

    def advisory_subjects(self) -> list[str]:
        """The JetStream advisories that say a consumer gave up on a message of one of our streams."""
        kinds = ("MAX_DELIVERIES", "MSG_TERMINATED")
        return [f"$JS.EVENT.ADVISORY.CONSUMER.{k}.{s}.*" for s in self.consumed_streams for k in kinds]

    # subjects
    @property
    def executions_all(self) -> str:
        return self._subject("executions.>")

    @property
    def execution_requested(self) -> str:
        return self._subject("executions.requested")

    @property
    def execution_cancel(self) -> str:
        return self._subject("executions.cancel")

    @property
    def execution_deadline(self) -> str:
        return self._subject("executions.deadline")

    def execution_deadline_schedule(self, execution_id: str) -> str:
        """Where an execution's deadline check waits: the stream publishes it on ``execution_deadline`` then."""
        return self._subject(f"executions.deadline.{execution_id}")

    @property
    def execution_deadline_schedules(self) -> str:
        return self._subject("executions.deadline.*")

    @property
    def tasks_all(self) -> str:
        return self._subject("tasks.*")

    def tasks(self, pool: Pool) -> str:
        return self._subject(f"tasks.{pool}")

    @property
    def results_all(self) -> str:
        return self._subject("results.>")

    def results(self, execution_id: str) -> str:
        return self._subject(f"results.{execution_id}")

    @property
    def events_all(self) -> str:
        return self._subject("events.>")

    def events(self, execution_id: str, kind: str) -> str:
        return self._subject(f"events.{execution_id}.{kind}")

    def completed_event(self, execution_id: str) -> str:
        return self.events(execution_id, "completed")

    def cost_event(self, execution_id: str) -> str:
        return self.events(execution_id, "cost")

    @property
    def documents_all(self) -> str:
        return self._subject("documents.>")

    def document(self, execution_id: str) -> str:
        """Where the KV bucket republishes each stored version of an execution's document (core NATS)."""
        return self._subject(f"documents.{execution_id}")

    @property
    def dlq_all(self) -> str:
        return self._subject("dlq.>")

    def dlq(self, stream: str, consumer: str, stream_seq: int | str) -> str:
        """A dead letter's subject: one per message given up on, so its letter is found by the message's sequence
        (``"*"``: every letter of the consumer)."""
        return self._subject(f"dlq.{stream}.{consumer}.{stream_seq}")

    @property
    def durables(self) -> tuple[tuple[str, str], ...]:
        """Every durable consumer, as (stream, durable): what a message can be dead-lettered from."""
        return ((self.executions_stream, self.pm_consumer), (self.executions_stream, self.cancels_consumer),
                (self.executions_stream, self.deadlines_consumer), (self.results_stream, self.aggregator_consumer),
                (self.advisories_stream, self.dead_letters_consumer),
                *((self.tasks_stream, self.pool_consumer(p)) for p in POOLS))

    # durable consumers, named after their job
    @property
    def pm_consumer(self) -> str:
        return "pm"

    def pool_consumer(self, pool: Pool) -> str:
        return pool

    @property
    def aggregator_consumer(self) -> str:
        return "aggregator"

    @property
    def cancels_consumer(self) -> str:
        return "cancels"

    @property
    def deadlines_consumer(self) -> str:
        return "deadlines"

    @property
    def dead_letters_consumer(self) -> str:
        return "dead_letters"
