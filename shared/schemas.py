"""Every message that travels on NATS, and the execution document kept in KV.

Each wire model carries ``schema_version``; changes are additive (new optional fields), and
unknown fields are ignored so an older reader accepts a newer writer's message.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)

from shared.errors import PlanError, said
from shared.names import Pool

SCHEMA_VERSION = 1

TaskId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
ExecutionMode = Literal["parallel", "serial"]
ExecutionStatus = Literal["queued", "planning", "running", "completed", "partial", "failed", "cancelled"]
TERMINAL_EXECUTION: frozenset[str] = frozenset({"completed", "partial", "failed", "cancelled"})
TaskStatus = Literal["pending", "queued", "running", "retrying", "completed", "failed", "skipped", "cancelled"]
TERMINAL_TASK: frozenset[str] = frozenset({"completed", "failed", "skipped", "cancelled"})
# Why an attempt failed: the failure handler picks its strategy from this.
# "request": the endpoint refused the request itself (400, 401, 403, ...): a retry will not help.
# "truncated": the answer ran out of max_tokens (or context window); the same call would be cut again.
# "refusal": the model declined; the pool's other model is asked instead.
# "model_unavailable": the endpoint does not know the model (404: retired, misspelt, not for this key); likewise.
ErrorKind = Literal[
    "rate_limit", "overloaded", "timeout", "server", "invalid_output", "request", "truncated", "refusal",
    "model_unavailable", "simulated", "agent_error", "deadline", "dead_letter",
]


def now() -> datetime:
    return datetime.now(UTC)


class Wire(BaseModel):
    """Base of every NATS message."""

    model_config = ConfigDict(extra="ignore")
    schema_version: int = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# ---------------------------------------------------------------- plans


DESCRIPTION_MAX = 20_000
CUT = " … (cut here: the whole request is in the context of the task's message, as \"request\")"


CONTEXT_DEPTH_MAX = 32  # a task's context, and what its upstream outputs add, stay well within JSON parsers' limits


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


class TaskSpec(BaseModel):
    """One task of a plan: what to do, in which pool, after which other tasks.

    As every message between the services, it ignores a field it does not know: one a newer version added (a
    rolling upgrade, a rollback) must not make an older pool dead-letter the task. What a client or the
    decomposition model writes is ``PlanTask``, which refuses it."""

    model_config = ConfigDict(extra="ignore")
    id: TaskId
    pool: Pool
    description: str = Field(min_length=1, max_length=DESCRIPTION_MAX)
    context: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[TaskId] = Field(default_factory=list)

    @field_validator("context")
    @classmethod
    def _reserved_keys(cls, context: dict[str, Any]) -> dict[str, Any]:
        # upstream is set when a task is released: its dependencies' outputs by task id, which workers and
        # prompts rely on; simulate shapes the simulated provider.
        if _depth(context) > CONTEXT_DEPTH_MAX:  # every service parses it again, and their parsers stop deeper
            raise ValueError(f"nested deeper than {CONTEXT_DEPTH_MAX} levels")
        upstream = context.get("upstream")
        if upstream is not None and not (isinstance(upstream, dict) and all(isinstance(k, str) for k in upstream)):
            raise ValueError("context.upstream must map task ids to their outputs")
        if "simulate" in context:  # else every attempt would fail on it, as an agent error
            try:
                Simulate.model_validate(context["simulate"])
            except ValidationError as e:
                raise ValueError("context.simulate: " + "; ".join(
                    f"{'.'.join(map(str, err['loc'])) or 'value'}: {said(err)}" for err in e.errors())) from None
        return context

    @classmethod
    def for_request(cls, id: str, pool: Pool, lead: str, request: str, **fields: Any) -> Self:
        """A task described as ``lead`` followed by the client's request. A request longer than a description
        may be (a message may be five times longer) is cut there; its message gives the agent the whole request
        in the context (``run_command``), from the execution, which stores it once for all its tasks."""
        text = request.strip()
        text = text.rstrip(".") or text  # "Build a shop." reads on after a lead; "..." stays what it was
        if len(lead) + len(text) > DESCRIPTION_MAX:
            text = text[: DESCRIPTION_MAX - len(lead) - len(CUT)] + CUT
        return cls(id=id, pool=pool, description=lead + text, **fields)

    def needs_request(self) -> bool:
        """Whether its description was cut short of the client's request (``for_request``)."""
        return self.description.endswith(CUT) and "request" not in self.context


def check_plan(tasks: Sequence[TaskSpec], max_tasks: int | None = None) -> None:
    """Raise PlanError unless ids are unique, dependencies exist, there is no cycle, and the size fits."""
    if not tasks:
        raise PlanError("the plan has no tasks; omit 'tasks' to let the PM plan the work")
    if max_tasks is not None and len(tasks) > max_tasks:
        raise PlanError(f"the plan has {len(tasks)} tasks; at most {max_tasks} are allowed per execution")
    ids = [t.id for t in tasks]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise PlanError(f"duplicate task id(s): {', '.join(dupes)}")
    known = set(ids)
    for t in tasks:
        if "upstream" in t.context:
            raise PlanError(f"task {t.id!r}: context.upstream is reserved (the outputs of its dependencies, added "
                            "when it is released)")
        missing = [d for d in t.depends_on if d not in known]
        if missing:
            raise PlanError(f"task {t.id!r} depends on unknown task(s): {', '.join(missing)}")
        if t.id in t.depends_on:
            raise PlanError(f"task {t.id!r} depends on itself")
    deps = {t.id: t.depends_on for t in tasks}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for d in deps[node]:
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d] if d in path else [node, d]
                raise PlanError(f"dependency cycle: {' -> '.join(cycle)}")
            if d not in state:
                visit(d, path + [d])
        state[node] = 2

    for t in tasks:
        if t.id not in state:
            visit(t.id, [t.id])


def not_blank(text: str) -> str:
    """Refuse text that is empty or only whitespace, as ``str.strip`` sees it (pydantic's stripping leaves some)."""
    if not text.strip():
        raise ValueError("must not be empty or only whitespace")
    return text


class PlanTask(TaskSpec):
    """A task as a client's plan or the decomposition model gives it: a field it does not know is a mistake."""

    model_config = ConfigDict(extra="forbid")

    _described = field_validator("description")(not_blank)


class Plan(BaseModel):
    """A plan as the decomposition model returns it (the input of its ``submit_plan`` tool)."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[PlanTask] = Field(description="the tasks, each in one pool, with dependencies by task id")


# ---------------------------------------------------------------- commands and events


class ExecutionRequested(Wire):
    """Gateway → PM: a client asked for work."""

    kind: Literal["execution.requested"] = "execution.requested"
    execution_id: str
    message: str
    session_key: str | None = None
    project: str | None = None
    force_parallel: bool = False
    tasks: list[TaskSpec] | None = None
    mode: ExecutionMode = "parallel"
    tenant: str = "local"
    requested_at: AwareDatetime = Field(default_factory=now)
    deadline_at: AwareDatetime
    request_hash: str | None = Field(default=None, description="what makes a repeat of it the same request")
    routing: dict[str, Any] | None = Field(default=None, description="the chat router's decision, if it came that way")
    revision: int | None = Field(default=None, description="KV revision of the execution document stored for it "
                                                           "(its start, as new_execution makes it): the PM plans "
                                                           "on it without reading it first")


class RunTask(Wire):
    """PM or aggregator → pool: run this task (upstream outputs are in ``task.context``)."""

    kind: Literal["task.run"] = "task.run"
    execution_id: str
    task: TaskSpec
    deadline_at: AwareDatetime


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    # A call cut off while its answer streamed in: the input is the API's count, the output an estimate from what
    # had arrived (the API gives its count only at the end).
    estimated: bool = False


class Finding(BaseModel):
    severity: Literal["info", "low", "medium", "high", "critical"] = "info"
    topic: str
    detail: str = ""
    recommendation: str = ""


class Recommendation(BaseModel):
    topic: str
    choice: str
    rationale: str = ""


class Artifact(BaseModel):
    path: str
    kind: Literal["code", "sql", "config", "doc"] = "code"
    content: str = ""


class TaskOutput(BaseModel):
    """What an agent produced: the aggregator's conflict rules read findings and recommendations."""

    summary: str
    artifacts: list[Artifact] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    recommendations: list[Recommendation] = Field(default_factory=list)
    simulated: bool = False


class Simulate(BaseModel):
    """Per-task shaping of the simulated provider, read from ``context.simulate``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    latency_s: float | None = Field(default=None, ge=0)
    fail_attempts: int = Field(default=0, ge=0, description="attempts 1..N fail with ``error``")
    hang: bool = False
    error: ErrorKind = "simulated"
    crash_attempts: int = Field(default=0, ge=0, description="attempts 1..N kill the worker process")
    raise_attempts: int = Field(default=0, ge=0, description="attempts 1..N raise, as an agent with a bug would")
    output: TaskOutput | None = Field(default=None, description="answer this instead of the pool's default")

    def faults(self) -> list[str]:
        """The fault directives asked for: what ``simulated.faults`` off refuses."""
        asked = {"fail_attempts": self.fail_attempts, "hang": self.hang, "crash_attempts": self.crash_attempts,
                 "raise_attempts": self.raise_attempts}
        return [name for name, value in asked.items() if value]


RUN = ("the stream sequence of the task's message that this attempt is a delivery of. A task has one message, "
       "unless the broker took a repeat of it as new (a work queue forgets the msg-ids of the messages it has handed "
       "out across a restart or a leader change): the second message's run numbers its attempts from 1 again")


def _run(run: int | None) -> str:
    """What a run adds to an attempt's msg-ids: nothing for a report that names none."""
    return "" if run is None else f"r{run}:"


class _TaskResult(Wire):
    execution_id: str
    task_id: str
    pool: Pool
    attempt: int = Field(ge=1)
    worker: str
    started_at: AwareDatetime
    upstream: list[str] = Field(default_factory=list, description="dependencies whose outputs this attempt got")
    run: int | None = Field(default=None, description=RUN)

    def msg_id(self) -> str:
        kind = getattr(self, "kind", "result")
        return f"{self.execution_id}:{self.task_id}:{_run(self.run)}{self.attempt}:{kind}"


class TaskStarted(_TaskResult):
    """Sent only for an attempt still running after ``announce_start_after_s``: shows it running, and
    records it if its worker is lost."""

    kind: Literal["task.started"] = "task.started"


class TaskCompleted(_TaskResult):
    kind: Literal["task.completed"] = "task.completed"
    finished_at: AwareDatetime
    model: str
    provider: str
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    output: TaskOutput


class TaskFailed(_TaskResult):
    kind: Literal["task.failed"] = "task.failed"
    finished_at: AwareDatetime
    error: str
    error_kind: ErrorKind = "server"
    final: bool = Field(description="no attempt follows: the task has failed")
    strategy: str | None = Field(default=None, description="what the failure handler does next")
    retry_in_s: float | None = None
    model: str | None = None
    provider: str | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0


TaskResult = Annotated[TaskStarted | TaskCompleted | TaskFailed, Field(discriminator="kind")]
TaskResultAdapter: TypeAdapter[TaskStarted | TaskCompleted | TaskFailed] = TypeAdapter(TaskResult)


class DeadLetter(Wire):
    """A message that could not be processed, kept with the reason."""

    kind: Literal["dead_letter"] = "dead_letter"
    stream: str
    consumer: str
    subject: str
    stream_seq: int | None = None
    deliveries: int | None = None
    reason: str
    advisory: str | None = Field(default=None, description="the JetStream advisory that reported it, if any")
    payload: str = Field(description="the original payload, decoded as UTF-8 with replacement")
    dead_lettered_at: AwareDatetime = Field(default_factory=now)


# ---------------------------------------------------------------- execution state (KV) and final event


class Attempt(BaseModel):
    n: int
    run: int | None = Field(default=None, description=RUN)
    worker: str
    started_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    outcome: Literal["running", "completed", "failed", "lost"] = "running"
    error: str | None = None
    error_kind: str | None = None
    strategy: str | None = Field(default=None, description="the failure handler's decision after this attempt")
    upstream: list[str] = Field(default_factory=list, description="dependencies whose outputs it worked from")
    model: str | None = None
    provider: str | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds(), 4)


def same_run(a: Attempt, run: int | None) -> bool:
    """Whether ``a`` is a delivery of the message ``run`` names; one that names none (recorded from a report of a
    version that did not record runs) matches any."""
    return a.run is None or run is None or a.run == run


class TaskState(BaseModel):
    id: str
    pool: Pool
    description: str
    context: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    status: TaskStatus = "pending"
    attempts: list[Attempt] = Field(default_factory=list)
    error: str | None = None
    output: TaskOutput | None = None
    resolution: str | None = Field(default=None, description="skip or escalate, once the task gave up")
    degradation: str | None = Field(default=None, description="pending / unaudited / without optimization")

    def attempt(self, n: int, run: int | None = None) -> Attempt | None:
        return next((a for a in self.attempts if a.n == n and same_run(a, run)), None)

    def spec(self, **context: Any) -> TaskSpec:
        """The task as planned, with ``context`` added (e.g. upstream outputs)."""
        return TaskSpec(id=self.id, pool=self.pool, description=self.description,
                        context={**self.context, **context}, depends_on=self.depends_on)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def started_at(self) -> datetime | None:
        return self.attempts[0].started_at if self.attempts else None

    def shown(self) -> Attempt | None:
        """The attempt the task's own fields describe: the one that completed it (not a later delivery it
        superseded, nor another run's), else the latest."""
        latest = self.attempts[-1] if self.attempts else None
        return next((a for a in self.attempts if a.outcome == "completed"), latest)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def finished_at(self) -> datetime | None:
        shown = self.shown()
        return shown.finished_at if shown is not None and self.status in TERMINAL_TASK else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def worker(self) -> str | None:
        shown = self.shown()
        return shown.worker if shown is not None else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def model(self) -> str | None:
        shown = self.shown()
        return shown.model if shown is not None else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cost_usd(self) -> float:
        return round(sum(a.cost_usd for a in self.attempts), 8)


class ModelCall(BaseModel):
    """A model call made outside a task (decomposition, synthesis)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="this call's record, stored once")
    phase: Literal["decomposition", "synthesis"]
    model: str
    provider: str
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    error: str | None = Field(default=None, description="why its result was not used (the cost still counts)")


class Cost(BaseModel):
    total_usd: float
    by_pool: dict[str, float]
    by_phase: dict[str, float]


class PoolOutput(BaseModel):
    task_id: str
    summary: str
    artifacts: list[str] = Field(default_factory=list)


class Position(BaseModel):
    """What one agent said about a topic."""

    task_id: str
    pool: str
    says: str
    severity: str | None = None


ConflictKind = Literal["approach_vs_risk", "different_tools", "contradictory_findings"]
Rule = Literal["security_first", "merge", "flag"]


class Conflict(BaseModel):
    kind: ConflictKind
    topic: str
    positions: list[Position]
    rule: Rule = Field(description="security_first (rule 1), merge (rule 2) or flag for the PM (rule 3)")
    resolution: str


class Override(BaseModel):
    """Audit trail: a position that did not stand, the one that did, and the rule that decided."""

    rule: Rule
    topic: str
    overridden: Position
    by: Position


class ResolvedRecommendation(Recommendation):
    sources: list[str] = Field(default_factory=list, description="task ids that recommended it")
    decision_needed: bool = False


class AggregatedResult(BaseModel):
    """Everything the agents said, merged: what the final answer is written from."""

    outputs: dict[str, list[PoolOutput]] = Field(default_factory=dict)
    conflicts_detected: list[Conflict] = Field(default_factory=list)
    audit: list[Override] = Field(default_factory=list)
    decisions: list[str] = Field(default_factory=list, description="irreconcilable conflicts the client decides")
    dependencies: list[dict[str, Any]] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    recommendations: list[ResolvedRecommendation] = Field(default_factory=list)
    summary: str = ""
    quality_score: float = Field(default=0.0, ge=0, le=1)


class Execution(BaseModel):
    """The execution document: kept in KV, served by GET, carried by the final event."""

    model_config = ConfigDict(extra="ignore")
    schema_version: int = SCHEMA_VERSION
    execution_id: str
    status: ExecutionStatus = "queued"
    mode: ExecutionMode = Field(default="parallel", description="serial runs one task at a time, in plan order")
    tenant: str = "local"
    request_hash: str | None = Field(default=None, description="fingerprint of the request, for idempotency")
    message: str
    project: str | None = None
    session_key: str | None = None
    routing: dict[str, Any] | None = Field(default=None, description="the /api/chat routing decision")
    planner: Literal["client", "llm", "rules", "serial"] | None = None
    planning_request: int | None = Field(default=None, description=(
        "the stream sequence of the request message whose delivery took it to plan with the model: only that "
        "message's deliveries plan it (another copy of the request, a replay, does not pay for a second plan)"))
    created_at: AwareDatetime
    updated_at: AwareDatetime
    deadline_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    tasks: list[TaskState] = Field(default_factory=list)
    calls: list[ModelCall] = Field(default_factory=list)
    error: str | None = None
    final_response: str | None = None
    aggregated: AggregatedResult | None = None

    def task(self, task_id: str) -> TaskState | None:
        return next((t for t in self.tasks if t.id == task_id), None)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_EXECUTION

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cost(self) -> Cost:
        by_pool: dict[str, float] = {}
        for t in self.tasks:
            by_pool[t.pool] = round(by_pool.get(t.pool, 0.0) + t.cost_usd, 8)
        by_phase = {"tasks": round(sum(by_pool.values()), 8)}
        for c in self.calls:
            by_phase[c.phase] = round(by_phase.get(c.phase, 0.0) + c.cost_usd, 8)
        return Cost(total_usd=round(sum(by_phase.values()), 8), by_pool=by_pool, by_phase=by_phase)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def refund_usd(self) -> float:
        """What the work that failed, was skipped or was cancelled cost: the partial refund figure."""
        return round(sum(t.cost_usd for t in self.tasks if t.status in ("failed", "skipped", "cancelled")), 8)

    @model_validator(mode="after")
    def _unique_tasks(self) -> Execution:
        ids = [t.id for t in self.tasks]
        if len(ids) != len(set(ids)):
            raise ValueError("duplicate task ids in execution state")
        return self


class CancelExecution(Wire):
    """Gateway → aggregator: stop this execution; queued tasks never run, running ones are abandoned."""

    kind: Literal["execution.cancel"] = "execution.cancel"
    execution_id: str
    reason: str = "cancelled by the client"
    requested_at: AwareDatetime = Field(default_factory=now)


class LifecycleEvent(Wire):
    """Aggregator → events.<execution>.<kind>: one step of an execution, for streaming and audit."""

    kind: str = Field(description="started, retrying, task_completed, task_failed, skipped, released, conflict")
    execution_id: str
    at: AwareDatetime = Field(default_factory=now)
    task_id: str | None = None
    pool: str | None = None
    status: str | None = None
    attempt: int | None = None
    worker: str | None = None
    model: str | None = None
    error: str | None = None
    cost_usd: float | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    run: int | None = Field(default=None, description=RUN)

    def msg_id(self) -> str:
        return f"{self.execution_id}:{self.task_id}:{self.kind}:{_run(self.run)}{self.attempt}"


class ExecutionDeadline(Wire):
    """PM → aggregator: check this execution at its deadline (the broker holds the message until then)."""

    kind: Literal["execution.deadline"] = "execution.deadline"
    execution_id: str
    deadline_at: AwareDatetime


class ConsumerAdvisory(BaseModel):
    """The server's MAX_DELIVERIES / MSG_TERMINATED advisory (its format, not ours)."""

    model_config = ConfigDict(extra="ignore")
    type: str
    stream: str
    consumer: str
    stream_seq: int
    deliveries: int = 0
    reason: str | None = None

    # The server's own reason when a message pending on a consumer leaves the stream by a deletion: after a crash, one
    # whose acknowledgement the restarted server had not stored (the message was handled); or a purge.
    DELETED: ClassVar[str] = "Unacknowledged message was deleted"

    @property
    def exhausted(self) -> bool:
        return self.type.endswith(".max_deliver")

    @property
    def deleted(self) -> bool:
        """Whether no consumer gave up on the message: it was deleted while pending, and there is nothing to keep."""
        return not self.exhausted and self.reason == self.DELETED

    def describe(self) -> str:
        if self.exhausted:
            return f"consumer {self.consumer} gave up after {self.deliveries} deliveries (max_deliver)"
        return f"consumer {self.consumer} terminated it: {self.reason or 'no reason given'}"


class ExecutionCompleted(Wire):
    """The aggregator's final response event, carrying the terminal execution document byte for byte as stored
    (and its status in the ``STATUS_HEADER`` header, for those that follow endings without reading the
    document): for event streams, the pools' record of endings and replays. The gateway answers from the same
    version as the KV bucket republishes it."""

    STATUS_HEADER: ClassVar[str] = "Openclaw-Status"

    kind: Literal["execution.completed"] = "execution.completed"
    execution: Execution

    @staticmethod
    def around(document: bytes) -> bytes:
        """The event's bytes around an execution document as stored, without serialising it again."""
        return b"%b%b}" % (_COMPLETED_HEAD, document)


_COMPLETED_HEAD = b'{"schema_version":%d,"kind":"execution.completed","execution":' % SCHEMA_VERSION


class CostIncurred(Wire):
    """A model call's usage and price: one per task attempt with usage, decomposition and synthesis."""

    kind: Literal["cost.incurred"] = "cost.incurred"
    execution_id: str
    phase: Literal["decomposition", "task", "synthesis"]
    task_id: str | None = None
    pool: Pool | None = None
    attempt: int | None = None
    run: int | None = Field(default=None, description=RUN)
    model: str
    provider: str
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float
    incurred_at: AwareDatetime = Field(default_factory=now)

    def msg_id(self) -> str:
        # The phase's n-th call is "#n": no task id has a "#", so a task named "synthesis" has ids of its own.
        if self.phase == "task":
            return f"{self.execution_id}:{self.task_id}:{_run(self.run)}{self.attempt}:cost"
        return f"{self.execution_id}:{self.phase}#{self.attempt or 1}:cost"


class ExecutionPlanned(Wire):
    """PM → events: the plan the execution will run."""

    kind: Literal["execution.planned"] = "execution.planned"
    execution_id: str
    planner: str
    tasks: list[TaskSpec]
