"""Request and error shapes of the REST API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StringConstraints,
    model_validator,
)

from shared.schemas import ExecutionMode, PlanTask, not_blank

# Not only whitespace (stripped, it would be empty): the schema says so with a pattern, validation with its own message.
Message = Annotated[str, StringConstraints(strip_whitespace=True, max_length=100_000), AfterValidator(not_blank),
                    Field(json_schema_extra={"pattern": r"\S", "minLength": 1})]
# A flag or a number given as a string ("yes", "5") is refused, not guessed at: a client that sends one has a bug.
Seconds = Annotated[float, Strict()]
SESSION_KEY = "the client's session, kept with the execution (also accepted as session_key; send one of the two)"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _one_session_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sessionKey" in data and "session_key" in data:
            raise ValueError("sessionKey and session_key name the same field: send one of the two")
        return data


class ExecuteRequest(_Request):
    """POST /api/execute-parallel."""

    message: Message = Field(description="what the client wants built")
    session_key: str | None = Field(default=None, alias="sessionKey", max_length=256, description=SESSION_KEY)
    project: str | None = Field(default=None, max_length=256)
    force_parallel: StrictBool = False
    tasks: list[PlanTask] | None = Field(
        default=None, description="your own plan; skips decomposition (validated like the PM's)",
        json_schema_extra={"minItems": 1},  # an empty plan is refused with a message of its own (check_plan)
    )
    mode: ExecutionMode = Field(default="parallel", description="serial: one task at a time, in plan order")
    wait: StrictBool = Field(default=False, description="answer only when the execution is terminal (bounded)")
    timeout_s: Seconds | None = Field(default=None, gt=0, description="how long to wait when wait=true")


class ChatRequest(_Request):
    """POST /api/chat: the single-agent endpoint, routed to parallel execution when it pays."""

    message: Message
    session_key: str | None = Field(default=None, alias="sessionKey", max_length=256, description=SESSION_KEY)
    project: str | None = Field(default=None, max_length=256)
    force_parallel: StrictBool = False
    wait: StrictBool = Field(default=True, description="answer when done (bounded by timeout_s); false: 202 at once")
    timeout_s: Seconds | None = Field(default=None, gt=0)


class ChatResponse(BaseModel):
    execution_id: str
    status: str
    mode: ExecutionMode
    routing: dict[str, Any] = Field(description="parallel?, why, which pools, decision time in ms")
    response: str | None = Field(description="the final answer, once the execution is terminal")
    cost_usd: float


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    error: str
    message: str
    errors: list[FieldError] = Field(default_factory=list)
    request_id: str | None = None
