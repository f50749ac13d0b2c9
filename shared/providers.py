"""Model providers behind one interface.

``anthropic`` calls the Messages API through the official SDK (one ``AsyncAnthropic`` per process,
``max_retries=0``: the caller's failure handling owns retries), streamed, so that a ``Meter`` knows what a call
cut off part-way had used; structured results come back as the input of a tool. ``simulated`` is the offline
default: deterministic structured output per pool, labelled "simulated" everywhere, with plausible token usage so
every cost path runs without a key. Tests and benchmarks shape it per task with
``context.simulate = {latency_s, fail_attempts, hang}``. The
simulated provider does not plan or write the final answer (``writes`` is False): the PM uses its rules,
the aggregator its template (neither costs anything), and neither builds a prompt for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import email.utils
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import jiter
from pydantic import BaseModel, ValidationError

from shared.config import MISSING_API_KEY, ParallelExecutionConfig
from shared.errors import ConfigError, OpenClawError, said
from shared.names import Pool
from shared.schemas import Artifact, ErrorKind, Finding, Plan, Recommendation, Simulate, TaskOutput, TaskSpec, Usage

if TYPE_CHECKING:  # the SDK takes seconds to import: only a process that uses it pays for that (at start)
    from anthropic.types import Message, MessageParam, TextBlockParam, ToolChoiceParam, ToolParam

log = logging.getLogger(__name__)
Effort = Literal["low", "medium", "high", "max"]
MODELS_CHECK_TIMEOUT_S = 10.0  # a start-up lookup of the configured models; no answer by then: not checked


@dataclass(frozen=True)
class ModelUse:
    """A configured model, the setting that names it, and what it is called for (``effort``: planning's)."""

    setting: str
    model: str
    effort: Effort | None = None


class ProviderError(OpenClawError):
    """A model call failed; ``kind`` lets the failure handler choose a strategy.

    ``usage`` is set when the call itself went through (and was billed) but its output was unusable.
    """

    def __init__(self, message: str, kind: ErrorKind = "server", usage: Usage | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.usage = usage
        self.retry_after_s = retry_after_s  # how long the endpoint asked us to wait (Retry-After), if it did


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str


class TaskReply(BaseModel):
    output: TaskOutput
    usage: Usage
    model: str
    provider: str


class PlanReply(BaseModel):
    plan: Plan
    usage: Usage
    model: str
    provider: str


class TextReply(BaseModel):
    text: str
    usage: Usage
    model: str
    provider: str


class ModelProvider(Protocol):
    name: str
    writes: bool  # whether decompose and synthesize call a model; callers ask before building their prompts

    async def run_task(self, pool: Pool, task: TaskSpec, prompt: Prompt, model: str, attempt: int,
                       meter: Meter | None = None) -> TaskReply:
        """Run one attempt of a task and return the agent's structured output; ``meter`` follows its usage."""
        ...

    async def decompose(self, prompt: Prompt, model: str, effort: Effort, meter: Meter | None = None) -> PlanReply:
        """The model's plan for a request (not yet checked). Only when ``writes``."""
        ...

    async def synthesize(self, prompt: Prompt, model: str, meter: Meter | None = None) -> TextReply:
        """The client-facing answer. Only when ``writes``."""
        ...

    async def check_models(self, uses: Sequence[ModelUse]) -> None:
        """At start-up: refuse (ConfigError) a configured model the endpoint says cannot do what it is set for."""
        ...

    async def aclose(self) -> None:
        """Release the provider's connections (at process stop)."""
        ...


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


# The deltas that write a block's text, thinking or tool input: the block's field, and the delta's.
DELTAS = {"text_delta": ("text", "text"), "thinking_delta": ("thinking", "thinking"),
          "input_json_delta": ("input", "partial_json")}


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: no character, not UTF-8 text


class Meter:
    """What one model call has produced so far, kept up to date as it runs, so that a caller that cuts the call off
    (the pool's timeout) still records what was consumed. The input is counted once the model has started (the
    API's ``message_start``); until the API gives the output count at the end (``message_delta``), the output is
    estimated from what has arrived, at about four characters a token. Fed a Messages API stream's events, it also
    puts the message together: each tool's input is parsed once, at the end of its block (the SDK's own helper
    parses the input so far at every delta, which costs the square of its length)."""

    def __init__(self) -> None:
        self._start: Usage | None = None
        self._chars = 0
        self._output: int | None = None
        self._message: Message | None = None
        self._parts: dict[int, tuple[str, list[str]]] = {}  # block index → (the field being written, its pieces)

    def start(self, usage: Usage) -> None:
        self._start = usage

    def see(self, event: Any) -> None:
        """One event of a Messages API stream (an event out of place raises: the stream is malformed)."""
        kind = event.type
        if kind == "message_start":
            self._message = msg = event.message
            u = msg.usage
            self.start(Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens or 0,
                             cache_read_tokens=u.cache_read_input_tokens or 0,
                             cache_write_tokens=u.cache_creation_input_tokens or 0))
            return
        if kind in ("ping", "message_stop"):
            return
        msg = self._message
        if msg is None:
            raise ValueError(f"{kind} before message_start")
        if kind == "content_block_start":
            msg.content.append(event.content_block)
        elif kind == "content_block_delta":
            block, d = msg.content[event.index], event.delta
            if d.type == "signature_delta":
                block.signature = d.signature
            elif d.type in DELTAS:  # pieces joined once, at the block's end: appending to a string copies it
                field, attr = DELTAS[d.type]
                text = getattr(d, attr)
                self._parts.setdefault(event.index, (field, []))[1].append(text)
                self._chars += len(text)
        elif kind == "content_block_stop":
            block = msg.content[event.index]
            field, parts = self._parts.pop(event.index, ("", []))
            if field == "input":
                # jiter, as the SDK parses: it refuses what no UTF-8 text can hold (a lone surrogate), json does not
                block.input = jiter.from_json("".join(parts).encode() or b"{}")
            elif field:  # text as UTF-8 can hold it (a lone surrogate, escaped in the stream's JSON, json takes): its
                # document could not be stored otherwise, and every redelivery would pay for another answer
                setattr(block, field, LONE_SURROGATE.sub("\ufffd", getattr(block, field) + "".join(parts)))
        elif kind == "message_delta":
            msg.stop_reason, msg.stop_sequence = event.delta.stop_reason, event.delta.stop_sequence
            self._output = msg.usage.output_tokens = event.usage.output_tokens
            for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
                if getattr(event.usage, name, None) is not None:  # counts given again at the end are the totals
                    setattr(msg.usage, name, getattr(event.usage, name))

    def answer(self) -> Message | None:
        """The message as it stands (the whole of it once the stream has ended)."""
        return self._message

    @property
    def usage(self) -> Usage:
        """Zero until the model has started (nothing is known to be billed before)."""
        return self.billed or Usage()

    @property
    def billed(self) -> Usage | None:
        """What a ProviderError carries: None until the model has started."""
        if self._start is None:
            return None
        if self._output is not None:
            return self._start.model_copy(update={"output_tokens": self._output})
        so_far = (self._chars + 3) // 4  # as _tokens counts, from the characters alone
        return self._start.model_copy(update={"output_tokens": max(self._start.output_tokens, so_far),
                                              "estimated": True})


def simulated_output(pool: Pool, task: TaskSpec) -> TaskOutput:
    """Deterministic, pool-shaped output for a task: same task, same answer."""
    d = task.description.lower()
    if pool == "codegen":
        head = set(re.findall(r"[a-z]+", d.split(":")[0]))
        ui = bool(head & {"frontend", "ui", "page", "pages", "react", "form", "forms", "component"})
        path = f"web/src/{task.id}.tsx" if ui else f"api/{task.id}.py"
        return TaskOutput(
            simulated=True,
            summary=f"[simulated] wrote {path}.",
            artifacts=[Artifact(path=path, kind="code", content=f"# simulated: {task.description}\n")],
            recommendations=[
                # The seed's CSRF example: a convenient approach that the security review will overrule.
                Recommendation(topic="csrf", choice="SameSite=Lax cookies only, no CSRF tokens",
                               rationale="[simulated] fewer moving parts for the JSON API"),
                Recommendation(topic="session handling", choice="server-side sessions with cookies",
                               rationale="[simulated] simplest fit for the requested flow"),
            ],
        )
    if pool == "security":
        findings = [
            Finding(
                severity="high",
                topic="csrf",
                detail="[simulated] state-changing forms accept cross-site requests",
                recommendation="Require CSRF tokens (or SameSite=strict cookies) on every state-changing request",
            )
        ]
        if any(w in d for w in ("payment", "checkout", "card", "order")):
            findings.append(
                Finding(
                    severity="critical",
                    topic="payments",
                    detail="[simulated] card data must never touch the application servers",
                    recommendation="Use the payment provider's hosted fields; keep the app out of PCI scope",
                )
            )
        return TaskOutput(
            simulated=True,
            summary=f"[simulated] audit found {len(findings)} issue(s), worst: {findings[-1].severity}.",
            findings=findings,
            recommendations=[
                Recommendation(
                    topic="session handling",
                    choice="server-side sessions with cookies",
                    rationale="[simulated] tokens in localStorage are readable by any injected script",
                )
            ],
        )
    table = "orders" if "order" in d else "items"
    path = f"db/migrations/001_{task.id}.sql"
    return TaskOutput(
        simulated=True,
        summary=f"[simulated] schema with table {table!r}, migration {path}.",
        artifacts=[
            Artifact(
                path=path,
                kind="sql",
                content=f"-- simulated\nCREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, created_at TIMESTAMPTZ);\n",
            )
        ],
        recommendations=[
            Recommendation(topic="database", choice="PostgreSQL", rationale="[simulated] relational data")
        ],
    )


class SimulatedProvider:
    """Offline provider: latency from config (or ``context.simulate``), deterministic output."""

    name = "simulated"
    writes = False

    def __init__(self, pe: ParallelExecutionConfig) -> None:
        self.latency = pe.simulated.latency_s

    async def run_task(self, pool: Pool, task: TaskSpec, prompt: Prompt, model: str, attempt: int,
                       meter: Meter | None = None) -> TaskReply:
        sim = Simulate.model_validate(task.context.get("simulate") or {})
        delay = sim.latency_s if sim.latency_s is not None else self.latency.get(pool, 0.0)
        prompt_tokens = _tokens(prompt.system) + _tokens(prompt.user)
        if meter is not None:
            meter.start(Usage(input_tokens=prompt_tokens))  # as a model that has read the prompt
        if sim.hang:
            await asyncio.Event().wait()  # until the worker's timeout cancels us
        if delay:
            await asyncio.sleep(delay)
        if attempt <= sim.crash_attempts:
            os._exit(70)  # a worker dying mid-task, as kill -9 would
        if attempt <= sim.raise_attempts:
            raise RuntimeError("simulated agent bug")
        output = sim.output.model_copy(update={"simulated": True}) if sim.output else simulated_output(pool, task)
        usage = Usage(input_tokens=prompt_tokens, output_tokens=_tokens(output.model_dump_json()))
        if attempt <= sim.fail_attempts:
            # Busy or failed calls bill nothing; a model that answered unusably bills the tokens.
            billed = usage if sim.error in ("simulated", "invalid_output", "truncated", "refusal") else None
            kind = "" if sim.error == "simulated" else f" {sim.error}"
            raise ProviderError(f"simulated{kind} failure on attempt {attempt}", sim.error, billed)
        return TaskReply(output=output, usage=usage, model=model, provider=self.name)

    async def decompose(self, prompt: Prompt, model: str, effort: Effort, meter: Meter | None = None) -> PlanReply:
        raise NotImplementedError("the simulated provider does not plan: the PM's rules stand in, at no cost")

    async def synthesize(self, prompt: Prompt, model: str, meter: Meter | None = None) -> TextReply:
        raise NotImplementedError("the simulated provider does not write: the aggregator's template stands in")

    async def check_models(self, uses: Sequence[ModelUse]) -> None:
        return None  # it calls no model

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------- anthropic

RESULT_TOOL = "submit_result"
PLAN_TOOL = "submit_plan"


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined, so a tool's input_schema stands on its own."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]]))
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


def _result_schema() -> dict[str, Any]:
    schema = _inline_refs(TaskOutput.model_json_schema())
    schema["properties"].pop("simulated")  # ours to set, not the model's
    return schema


RESULT_TOOL_PARAM: ToolParam = {
    "name": RESULT_TOOL,
    "description": "Submit the structured result of the task: summary, artifacts, findings, recommendations.",
    "input_schema": _result_schema(),
}
PLAN_TOOL_PARAM: ToolParam = {
    "name": PLAN_TOOL,
    "description": "Submit the plan: the tasks, each for one pool, with the ids of the tasks it depends on.",
    "input_schema": _inline_refs(Plan.model_json_schema()),
}


def _status_kind(status: int, should_retry: str | None = None, error_code: str | None = None) -> ErrorKind:
    """What an HTTP error says about trying again. ``x-should-retry`` is the API's own word on it, as the SDK
    takes it; a 409 (a lock that timed out) is worth another try, as it is to the SDK. A 404 on the Messages API
    is a model the endpoint does not know (retired, misspelt, not open to this key): worth asking the other model,
    whatever the header says about asking this one again. A spend limit reached (a 429 whose ``error_code`` says
    so) lasts until someone raises it or the month turns: no retry, nor the other model, gets past it. 504 is the
    API's ``timeout_error``, as it is in a stream."""
    if status == 404:
        return "model_unavailable"
    if should_retry == "false" or (error_code or "").endswith("_spend_limit_reached"):
        return "request"
    if status == 429:
        return "rate_limit"
    if status == 529:
        return "overloaded"
    if status in (408, 504):
        return "timeout"
    return "server" if status >= 500 or status == 409 or should_retry == "true" else "request"


# The error types an error event in a stream names (the body an HTTP status would have carried).
STREAM_ERRORS: dict[str, ErrorKind] = {"overloaded_error": "overloaded", "rate_limit_error": "rate_limit",
                                       "api_error": "server", "timeout_error": "timeout",
                                       "invalid_request_error": "request", "authentication_error": "request",
                                       "permission_error": "request", "billing_error": "request",
                                       "not_found_error": "model_unavailable"}


def _stream_error_kind(body: object) -> ErrorKind:
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return STREAM_ERRORS.get(kind, "server") if isinstance(kind, str) else "server"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """How long the endpoint asks the client to wait, read as the SDK reads it: ``retry-after-ms``, else
    ``retry-after`` in seconds (the Messages API's form), else ``retry-after`` as an HTTP date."""
    seconds: float | None = None
    with contextlib.suppress(TypeError, ValueError):
        seconds = float(headers["retry-after-ms"]) / 1000 if "retry-after-ms" in headers else None
    value = headers.get("retry-after")
    if seconds is None and value is not None:
        try:
            seconds = float(value)
        except ValueError:
            with contextlib.suppress(TypeError, ValueError):
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def _supports(caps: object, *path: str) -> bool | None:
    """``supported`` of the capability at ``path``; None when the endpoint did not say."""
    for name in path:
        caps = getattr(caps, name, None)
    supported = getattr(caps, "supported", None)
    return supported if isinstance(supported, bool) else None


def _short_error(e: Exception) -> str:
    """An API error by its status (its message may repeat the body), anything else as it is."""
    status = getattr(e, "status_code", None)
    return f"HTTP {status}" if status is not None else f"{type(e).__name__}: {e}"


def _usage(msg: Message, meter: Meter) -> Usage:
    u = msg.usage
    if not isinstance(getattr(u, "input_tokens", None), int) or not isinstance(msg.content, list):
        raise ProviderError("malformed response: no usage or no content", "invalid_output")
    if not isinstance(u.output_tokens, int):  # the input is billed all the same, the output estimated
        raise ProviderError("malformed response: no output token count", "invalid_output", meter.billed)
    return Usage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_tokens=u.cache_read_input_tokens or 0,
        cache_write_tokens=u.cache_creation_input_tokens or 0,
    )


def _tool_input(msg: Message, tool: str, usage: Usage) -> dict[str, Any]:
    """The input of the model's one call of ``tool``. Asked for one (``disable_parallel_tool_use``), an answer
    split over several is not used: taking the first would drop the rest of it (a finding, a later plan)."""
    calls = [block for block in msg.content if block.type == "tool_use" and block.name == tool]
    if not calls:
        raise ProviderError(f"the model did not call {tool} (stop_reason {msg.stop_reason})", "invalid_output", usage)
    if len(calls) > 1:
        raise ProviderError(f"the model called {tool} {len(calls)} times; one answer was asked for", "invalid_output",
                            usage)
    if not isinstance(calls[0].input, dict):
        raise ProviderError(f"{tool} input is not an object", "invalid_output", usage)
    return calls[0].input


def _validation(tool: str, e: ValidationError) -> str:
    where = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'input'}: {said(x)}" for x in e.errors()[:5])
    return f"invalid {tool} input: {where}"


class AnthropicProvider:
    """Claude through the official SDK; any Messages-API-compatible endpoint via ``anthropic.base_url``."""

    name = "anthropic"
    writes = True

    def __init__(self, pe: ParallelExecutionConfig, api_key: str) -> None:
        import anthropic

        self.cfg = pe.anthropic
        self._connect_s = min(self.cfg.connect_timeout_s, self.cfg.timeout_s)
        # max_retries=0: a failed call goes back to its caller at once; the pool worker's nak/backoff and
        # the PM's and aggregator's fallbacks decide what happens next, not a retry loop hidden in the SDK.
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=self.cfg.base_url, max_retries=0,
            timeout=anthropic.Timeout(self.cfg.timeout_s, connect=self._connect_s),
        )

    @staticmethod
    def _system(text: str) -> list[TextBlockParam]:
        # The system prompts are static per role, so they (and the tools before them) are a cacheable prefix.
        return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]

    async def _call(self, model: str, prompt: Prompt, meter: Meter | None = None,
                    **extra: Any) -> tuple[Message, Usage]:
        """One Messages API call that ran to its end: the message and its (billed) usage. A reply the model
        declined (``refusal``) or that ran out of room (``max_tokens``, ``model_context_window_exceeded``) is a
        failure that carries its usage: whatever it holds is not the whole answer, even when it validates."""
        meter = meter or Meter()
        msg = await self._create(model, prompt, meter, **extra)
        usage = _usage(msg, meter)
        if msg.stop_reason == "refusal":
            raise ProviderError(f"{model} declined to answer (stop_reason refusal)", "refusal", usage)
        if msg.stop_reason in ("max_tokens", "model_context_window_exceeded"):
            raise ProviderError(
                f"{model} was cut off after {usage.output_tokens} output tokens (stop_reason {msg.stop_reason}): "
                f"the answer is incomplete; raise anthropic.max_tokens (now {self.cfg.max_tokens}) or ask for less",
                "truncated", usage)
        return msg, usage

    async def _create(self, model: str, prompt: Prompt, meter: Meter, **extra: Any) -> Message:
        """The call, streamed, so that ``meter`` follows what it uses as it goes (a call cut off is still paid
        for) and puts the message together; ``anthropic.timeout_s`` bounds the whole of it."""
        import anthropic  # already loaded by __init__
        import httpx2  # the SDK's HTTP client: what breaks while a stream is read comes from it unwrapped

        messages: list[MessageParam] = [{"role": "user", "content": prompt.user}]
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                stream = await self.client.messages.create(
                    model=model, max_tokens=self.cfg.max_tokens, system=self._system(prompt.system),
                    messages=messages, stream=True, **extra,
                )
                async with stream:
                    async for event in stream:
                        meter.see(event)
        except (anthropic.APITimeoutError, httpx2.TimeoutException, TimeoutError) as e:
            if isinstance(e.__cause__ if isinstance(e, anthropic.APITimeoutError) else e, httpx2.ConnectTimeout):
                raise ProviderError(f"{model}: cannot reach the Messages API: no connection within "
                                    f"{self._connect_s:g}s", "server") from None
            raise ProviderError(f"{model} did not answer within {self.cfg.timeout_s:g}s", "timeout",
                                meter.billed) from None
        except anthropic.APIStatusError as e:
            if e.status_code < 400:  # an error event in the stream, after its 200
                kind = _stream_error_kind(e.body)
                raise ProviderError(f"{model}: error in the stream: {e.message}", kind, meter.billed) from None
            kind = _status_kind(e.status_code, e.response.headers.get("x-should-retry"), e.error_code)
            raise ProviderError(f"{model}: HTTP {e.status_code}: {e.message}", kind,
                                retry_after_s=_retry_after(e.response.headers)) from None
        except (anthropic.APIConnectionError, httpx2.TransportError) as e:
            raise ProviderError(f"{model}: cannot reach the Messages API: {e}", "server", meter.billed) from None
        except (anthropic.APIResponseValidationError, httpx2.DecodingError, ValueError, RuntimeError, AttributeError,
                IndexError, KeyError, TypeError) as e:
            # An event that is not JSON (ValueError), events out of order (RuntimeError, the SDK's own word on it),
            # an event without the fields the SDK or the meter read (no usage, a block index that has no block), a
            # body that does not decompress: whatever an endpoint sent, it is not an answer.
            raise ProviderError(f"{model}: malformed response: {type(e).__name__}: {e}", "invalid_output",
                                meter.billed) from None
        msg = meter.answer()
        if msg is None:
            raise ProviderError(f"{model}: malformed response: no message in the stream", "invalid_output")
        if msg.stop_reason is None:  # the stream closed before the message did: not the whole answer
            raise ProviderError(f"{model}: the stream ended before the answer did", "server", meter.billed)
        return msg

    async def run_task(self, pool: Pool, task: TaskSpec, prompt: Prompt, model: str, attempt: int,
                       meter: Meter | None = None) -> TaskReply:
        tool_choice: ToolChoiceParam = {"type": "tool", "name": RESULT_TOOL, "disable_parallel_tool_use": True}
        msg, usage = await self._call(model, prompt, meter, tools=[RESULT_TOOL_PARAM], tool_choice=tool_choice)
        try:
            output = TaskOutput.model_validate(_tool_input(msg, RESULT_TOOL, usage))
        except ValidationError as e:
            raise ProviderError(_validation(RESULT_TOOL, e), "invalid_output", usage) from None
        # Priced by the configured model name: the response may name a dated snapshot instead.
        return TaskReply(output=output.model_copy(update={"simulated": False}), usage=usage, model=model,
                         provider=self.name)

    async def decompose(self, prompt: Prompt, model: str, effort: Effort, meter: Meter | None = None) -> PlanReply:
        # Thinking does not combine with a forced tool choice, so the plan tool is offered with "auto" and
        # the system prompt asks for it; an answer without the tool call is invalid output.
        tool_choice: ToolChoiceParam = {"type": "auto", "disable_parallel_tool_use": True}
        msg, usage = await self._call(
            model, prompt, meter, tools=[PLAN_TOOL_PARAM], tool_choice=tool_choice,
            thinking={"type": "adaptive"}, output_config={"effort": effort},
        )
        try:
            plan = Plan.model_validate(_tool_input(msg, PLAN_TOOL, usage))
        except ValidationError as e:
            raise ProviderError(_validation(PLAN_TOOL, e), "invalid_output", usage) from None
        return PlanReply(plan=plan, usage=usage, model=model, provider=self.name)

    async def synthesize(self, prompt: Prompt, model: str, meter: Meter | None = None) -> TextReply:
        msg, usage = await self._call(model, prompt, meter)
        text = "".join(b.text for b in msg.content if b.type == "text").strip()
        if not text:
            raise ProviderError(f"{model} wrote no answer (stop_reason {msg.stop_reason})", "invalid_output", usage)
        return TextReply(text=text, usage=usage, model=model, provider=self.name)

    async def check_models(self, uses: Sequence[ModelUse]) -> None:
        """Look each model up in the Models API. A model that cannot take this configuration's calls (``max_tokens``
        above its limit; planning without adaptive thinking or the configured effort) stops start-up, naming the
        setting; a retired or deprecated one is logged. An endpoint that gives no model's entry (no Models API behind a
        compatible ``base_url``, a network error, a body that is not one) checks nothing: the first call tells."""
        for use in uses:
            try:
                info = await self.client.models.retrieve(use.model, timeout=MODELS_CHECK_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - an API error, or an answer that is not a model's entry
                log.warning("could not look up %s (%s) in the Models API: %s; not checked", use.model, use.setting,
                            _short_error(e))
                continue
            where = f"parallel_execution.{use.setting} ({use.model})"
            limit = getattr(info, "max_tokens", None)
            if isinstance(limit, int) and self.cfg.max_tokens > limit:
                raise ConfigError(f"parallel_execution.anthropic.max_tokens ({self.cfg.max_tokens}) is above what "
                                  f"{where} allows ({limit}): lower it, or choose another model")
            caps = getattr(info, "capabilities", None)
            if use.effort is not None and caps is not None:
                if _supports(caps, "thinking", "types", "adaptive") is False:
                    raise ConfigError(f"{where} does not support adaptive thinking, which planning uses: choose a "
                                      "model that does (claude-opus-4-6, claude-sonnet-4-6)")
                if False in (_supports(caps, "effort"), _supports(caps, "effort", use.effort)):
                    raise ConfigError(f"parallel_execution.pm_coordinator.reasoning_effort ({use.effort}) is not an "
                                      f"effort level {where} supports: choose another level or model")
            lifecycle = getattr(info, "lifecycle", None)
            if lifecycle in ("retired", "deprecated"):
                level = logging.ERROR if lifecycle == "retired" else logging.WARNING
                retires = getattr(info, "retires_at", None)
                log.log(level, "%s is %s%s: its calls %s; set another model", where, lifecycle,
                        f" (retires {retires:%Y-%m-%d})" if isinstance(retires, datetime) else "",
                        "fail (a pool's go to its fallback model)" if lifecycle == "retired" else "still run")

    async def aclose(self) -> None:
        await self.client.close()


def make_provider(pe: ParallelExecutionConfig, api_key: str | None) -> ModelProvider:
    """The configured provider: ``auto`` is anthropic when a key is set, else the offline simulation."""
    if pe.provider == "anthropic" and not api_key:
        raise ConfigError(MISSING_API_KEY)
    if pe.provider == "simulated" or not api_key:
        log.log(logging.INFO if pe.provider == "simulated" else logging.WARNING,
                "model provider: simulated (%s): answers are labelled [simulated], no model is called",
                "configured" if pe.provider == "simulated" else "provider 'auto' and no ANTHROPIC_API_KEY")
        return SimulatedProvider(pe)
    log.info("model provider: anthropic (%s)", pe.anthropic.base_url or "api.anthropic.com")
    return AnthropicProvider(pe, api_key)
