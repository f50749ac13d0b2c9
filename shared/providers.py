"""Model providers behind one interface.

``simulated`` is the offline default: deterministic structured output per pool, labelled
"simulated" everywhere, with plausible token usage so every cost path runs without a key. Tests and
benchmarks shape it per task with ``context.simulate = {latency_s, fail_attempts, hang}``.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from shared.config import ParallelExecutionConfig
from shared.errors import ConfigError, OpenClawError
from shared.names import Pool
from shared.schemas import Artifact, ErrorKind, Finding, Recommendation, TaskOutput, TaskSpec, Usage


class ProviderError(OpenClawError):
    """A model call failed; ``kind`` lets the failure handler choose a strategy."""

    def __init__(self, message: str, kind: ErrorKind = "server", usage: Usage | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.usage = usage or Usage()  # a call that answered unusably is still billed


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str


class TaskReply(BaseModel):
    output: TaskOutput
    usage: Usage
    model: str
    provider: str


class ModelProvider(Protocol):
    name: str

    async def run_task(self, pool: Pool, task: TaskSpec, prompt: Prompt, model: str, attempt: int) -> TaskReply:
        """Run one attempt of a task and return the agent's structured output."""
        ...


class Simulate(BaseModel):
    """Per-task shaping of the simulated provider, read from ``context.simulate``."""

    model_config = ConfigDict(extra="forbid")
    latency_s: float | None = Field(default=None, ge=0)
    fail_attempts: int = Field(default=0, ge=0, description="attempts 1..N fail with ``error``")
    hang: bool = False
    error: ErrorKind = "simulated"
    crash_attempts: int = Field(default=0, ge=0, description="attempts 1..N kill the worker process")
    output: TaskOutput | None = Field(default=None, description="answer this instead of the pool's default")


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


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

    def __init__(self, pe: ParallelExecutionConfig) -> None:
        self.latency = pe.simulated.latency_s

    async def run_task(self, pool: Pool, task: TaskSpec, prompt: Prompt, model: str, attempt: int) -> TaskReply:
        sim = Simulate.model_validate(task.context.get("simulate") or {})
        delay = sim.latency_s if sim.latency_s is not None else self.latency.get(pool, 0.0)
        if sim.hang:
            await asyncio.Event().wait()  # until the worker's timeout cancels us
        if delay:
            await asyncio.sleep(delay)
        if attempt <= sim.crash_attempts:
            os._exit(70)  # a worker dying mid-task, as kill -9 would
        output = sim.output.model_copy(update={"simulated": True}) if sim.output else simulated_output(pool, task)
        usage = Usage(
            input_tokens=_tokens(prompt.system) + _tokens(prompt.user),
            output_tokens=_tokens(output.model_dump_json()),
        )
        if attempt <= sim.fail_attempts:
            # Busy or failed calls bill nothing; a model that answered unusably bills the tokens.
            billed = usage if sim.error in ("simulated", "invalid_output") else None
            raise ProviderError(f"simulated {sim.error} failure on attempt {attempt}", sim.error, billed)
        return TaskReply(output=output, usage=usage, model=model, provider=self.name)


def make_provider(pe: ParallelExecutionConfig, api_key: str | None) -> ModelProvider:
    """The configured provider; ``auto`` uses the offline simulation until a real provider is wired."""
    if pe.provider == "anthropic":
        raise ConfigError(
            "parallel_execution.provider 'anthropic' is not available in this version; use 'auto' or 'simulated'"
        )
    return SimulatedProvider(pe)
