"""The ``parallel_execution`` section of config.json, as a validated model.

Defaults follow the seed (codegen 3/300 s, security 2/300 s, database 2/180 s); unknown keys, values of
another JSON type ("yes" for a boolean) and a file without the section are rejected, so a typo fails at
start-up instead of silently using a default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import ConfigError, said
from shared.names import POOLS, Pool

DAY_S = 86_400.0  # no duration in the configuration may be longer (nor infinite, nor NaN)
Seconds = Annotated[float, Field(ge=0, le=DAY_S)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PoolConfig(_Strict):
    max_concurrent: int = Field(ge=1, le=1000)
    timeout: float = Field(gt=0, le=DAY_S, description="seconds one attempt of a task may run")
    model: str = "claude-sonnet-4-6"
    fallback_model: str = "claude-haiku-4-5"


POOL_DEFAULTS: dict[str, dict[str, Any]] = {"codegen": {"max_concurrent": 3, "timeout": 300},
                                            "security": {"max_concurrent": 2, "timeout": 300},
                                            "database": {"max_concurrent": 2, "timeout": 180}}


class WorkerPools(_Strict):
    codegen: PoolConfig = PoolConfig(**POOL_DEFAULTS["codegen"])
    security: PoolConfig = PoolConfig(**POOL_DEFAULTS["security"])
    database: PoolConfig = PoolConfig(**POOL_DEFAULTS["database"])

    @model_validator(mode="before")
    @classmethod
    def _over_the_defaults(cls, data: Any) -> Any:
        """A pool's section changes what it names: ``{"codegen": {"max_concurrent": 5}}`` keeps its timeout."""
        if not isinstance(data, dict):
            return data
        return {pool: {**POOL_DEFAULTS[pool], **section} if pool in POOL_DEFAULTS and isinstance(section, dict)
                else section for pool, section in data.items()}

    def get(self, pool: Pool) -> PoolConfig:
        cfg: PoolConfig = getattr(self, pool)
        return cfg


class PMCoordinator(_Strict):
    decomposition_model: str = "claude-opus-4-6"
    reasoning_effort: Literal["low", "medium", "high", "max"] = "high"
    synthesis_model: str = "claude-sonnet-4-6"
    name: str = "Pixel"
    signature: str = "— Pixel, your OpenClaw PM"
    tone: str = Field(default="warm, clear and concise", min_length=1, max_length=200,
                      description="how the model-written final answer sounds")
    emoji: bool = True


class ResultAggregation(_Strict):
    strategy: Literal["merge"] = "merge"
    conflict_resolution: Literal["security_first", "flag_all"] = "security_first"


class Retries(_Strict):
    max_retries: int = Field(default=2, ge=0, le=10)
    backoff_s: tuple[Seconds, ...] = (1.0, 3.0, 9.0)

    @model_validator(mode="after")
    def _enough_delays(self) -> Retries:
        if self.max_retries > 0 and not self.backoff_s:
            raise ValueError("backoff_s needs at least one delay when max_retries > 0")
        return self

    def delay(self, attempt: int) -> float:
        """Delay before the attempt after ``attempt`` (1-based); the last delay repeats."""
        return self.backoff_s[min(attempt, len(self.backoff_s)) - 1]


SIMULATED_LATENCY_S = {"codegen": 1.2, "security": 0.9, "database": 0.7, "pm": 0.0}


class Simulated(_Strict):
    """Timings of the offline provider, per pool and for the PM's own calls."""

    latency_s: dict[str, Seconds] = Field(default_factory=lambda: dict(SIMULATED_LATENCY_S))
    faults: bool = Field(default=True, description="whether a client's context.simulate may ask for faults (a worker "
                         "that dies, hangs, raises or fails): for tests and demonstrations; off where clients are not "
                         "trusted, as one tenant's directive would kill the workers every tenant shares")

    @field_validator("latency_s", mode="before")
    @classmethod
    def _over_the_default_latencies(cls, value: Any) -> Any:
        """``{"codegen": 0.1}`` changes codegen's latency and keeps the others'."""
        return {**SIMULATED_LATENCY_S, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _known_roles(self) -> Simulated:
        unknown = set(self.latency_s) - {*POOLS, "pm"}
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}; use {[*POOLS, 'pm']}")
        if any(v < 0 for v in self.latency_s.values()):
            raise ValueError("latencies must be >= 0")
        return self


class Price(_Strict):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)

    def usd(self, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0) -> float:
        cr = self.cache_read if self.cache_read is not None else self.input * 0.1
        cw = self.cache_write if self.cache_write is not None else self.input * 1.25
        return (input_tokens * self.input + output_tokens * self.output + cache_read * cr + cache_write * cw) / 1e6


def _default_prices() -> dict[str, Price]:
    return {
        "claude-opus-4-6": Price(input=5, output=25),
        "claude-sonnet-4-6": Price(input=3, output=15),
        "claude-sonnet-4-5": Price(input=3, output=15),
        "claude-haiku-4-5": Price(input=1, output=5),
    }


class AnthropicConfig(_Strict):
    """How the ``anthropic`` provider reaches a Messages API endpoint (the key comes from ANTHROPIC_API_KEY)."""

    base_url: str | None = Field(
        default=None, pattern=r"^https?://", description="any Messages-API-compatible endpoint; default: the SDK's"
    )
    timeout_s: float = Field(default=600, gt=0, le=DAY_S, description="per call, the whole of it; a timeout is a "
                             "failed attempt")
    connect_timeout_s: float = Field(default=5, gt=0, le=DAY_S, description="to open a connection (the SDK's own "
                                     "default; timeout_s if that is shorter): an endpoint that does not answer is a "
                                     "failed attempt this soon, not after timeout_s")
    max_tokens: int = Field(default=16_000, ge=1, le=128_000, description="per call, thinking included")


TASK_DEDUP_WINDOW_S = 3600.0  # the tasks stream's duplicate window: a released task's msg-id, remembered


class Gateway(_Strict):
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="a request's execution lives in one NATS "
                                "message: with the server's default max_payload (1 MiB) a request may take a quarter")
    default_wait_s: float = Field(default=60, gt=0, le=DAY_S)
    max_wait_s: float = Field(default=600, gt=0, le=DAY_S)
    rate_limit_per_minute: int = Field(default=600, ge=1, description="per API key (not in local mode)")
    rate_limit_burst: int = Field(default=60, ge=1)
    max_open_per_key: int = Field(default=100, ge=1, description="event streams and waiting requests one API key "
                                  "may hold open at once, per gateway replica (not in local mode)")

    @model_validator(mode="after")
    def _default_within_max(self) -> Gateway:
        if self.default_wait_s > self.max_wait_s:
            raise ValueError(f"default_wait_s ({self.default_wait_s:g}) is above max_wait_s ({self.max_wait_s:g})")
        return self


class ParallelExecutionConfig(_Strict):
    enabled: bool = True
    max_tasks_per_execution: int = Field(default=6, ge=1, le=100)
    provider: Literal["auto", "simulated", "anthropic"] = "auto"
    anthropic: AnthropicConfig = AnthropicConfig()
    execution_timeout_s: float = Field(
        default=1800, gt=0, le=TASK_DEDUP_WINDOW_S, description="an execution still running then fails; at most "
        "the tasks stream's duplicate window, which keeps a released task from being queued twice while it runs")
    ack_wait_s: float = Field(default=30, ge=1, le=DAY_S,
                              description="crash-detection window of every durable consumer; heartbeats come "
                              "three times in it, so at least a second")
    announce_start_after_s: float = Field(
        default=0.1, gt=0, le=DAY_S, description="a task attempt still running after this long is announced as "
        "started; a quicker one is recorded from its result alone")
    coalesce_results_s: float = Field(
        default=0.1, ge=0, le=DAY_S, description="a task's result that releases no task while others are still open "
        "waits up to this long for the execution's next change, to be stored with it (one write instead of several); "
        "0 stores each at once")
    shutdown_grace_s: float = Field(
        default=10, ge=0, le=DAY_S, description="on SIGTERM a service asks for no new message (one already on its "
        "way is run too) and gives the running ones this long to finish; what still runs then (a model call) is "
        "handed back for another replica, which counts as a delivery, so as one of the task's attempts. Above the "
        "pools' timeout, a rollout never cuts an attempt short (the Kubernetes config does so). Keep the "
        "Deployments' terminationGracePeriodSeconds above it")
    worker_pools: WorkerPools = WorkerPools()
    pm_coordinator: PMCoordinator = PMCoordinator()
    result_aggregation: ResultAggregation = ResultAggregation()
    retries: Retries = Retries()
    simulated: Simulated = Simulated()
    pricing: dict[str, Price] = Field(default_factory=_default_prices)

    @field_validator("pricing", mode="before")
    @classmethod
    def _over_the_built_in_prices(cls, value: Any) -> Any:
        """A model named here gets this price; the built-in ones keep theirs (a new model is one entry)."""
        return {**_default_prices(), **value} if isinstance(value, dict) else value
    gateway: Gateway = Gateway()

    def price(self, model: str) -> Price:
        try:
            return self.pricing[model]
        except KeyError:
            raise ConfigError(f"no price for model {model!r}: add it under parallel_execution.pricing") from None

    @model_validator(mode="after")
    def _within_ack_wait(self) -> ParallelExecutionConfig:
        if self.announce_start_after_s > self.ack_wait_s / 3:
            raise ValueError(
                f"announce_start_after_s ({self.announce_start_after_s:g}) must be at most ack_wait_s / 3 "
                f"({self.ack_wait_s / 3:g}): a running attempt's heartbeat starts after its announcement, and "
                "the broker redelivers a task it has not heard from within ack_wait_s")
        if self.coalesce_results_s > self.ack_wait_s / 3:
            raise ValueError(
                f"coalesce_results_s ({self.coalesce_results_s:g}) must be at most ack_wait_s / 3 "
                f"({self.ack_wait_s / 3:g}): a result waiting to be stored is not yet acknowledged")
        return self

    @model_validator(mode="after")
    def _priced_models(self) -> ParallelExecutionConfig:
        models = {self.pm_coordinator.decomposition_model, self.pm_coordinator.synthesis_model}
        for pool in POOLS:
            models |= {self.worker_pools.get(pool).model, self.worker_pools.get(pool).fallback_model}
        missing = sorted(models - set(self.pricing))
        if missing:
            raise ValueError(f"pricing has no entry for model(s) {missing}")
        return self


MISSING_API_KEY = (
    "the provider is 'anthropic' (parallel_execution.provider, or OPENCLAW_PROVIDER) but ANTHROPIC_API_KEY is not "
    "set, or empty: set ANTHROPIC_API_KEY (or use provider 'auto' to fall back to the simulated provider)"
)


class ConfigFile(BaseModel):
    """The whole config.json: other sections belong to other programs and are ignored."""

    model_config = ConfigDict(extra="ignore")
    parallel_execution: ParallelExecutionConfig = ParallelExecutionConfig()


def describe_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {said(e)}" if loc else said(e))
    return "; ".join(parts)


def load_config(path: str | Path | None) -> ParallelExecutionConfig:
    """Read and validate config.json; ``None`` means the built-in defaults."""
    if path is None or str(path) == "":
        return ParallelExecutionConfig()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        raw = json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist (set --config or OPENCLAW_CONFIG)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {p} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text: {e}") from None
    except OSError as e:  # a directory, no permission
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a JSON object")
    if "parallel_execution" not in raw:  # a misspelt section would leave every setting at its default, silently
        raise ConfigError(f"config file {p} has no parallel_execution section (its top-level keys: "
                          f"{', '.join(map(repr, raw)) or 'none'}); add one, {{}} for the defaults")
    try:
        # Strict: JSON's own types only, so "yes" is no boolean and true no number of tasks.
        return ConfigFile.model_validate_json(text, strict=True).parallel_execution
    except ValidationError as e:
        raise ConfigError(f"invalid config {p}: {describe_errors(e)}") from None
