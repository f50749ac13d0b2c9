"""What model calls cost: usage × the configured price, per call, and cost events on NATS.

Every priced call is one USD figure computed once, where the call is made, from
``pricing[model]`` (input, output, cache reads, cache writes per million tokens). Attempts sum
into tasks, tasks into pools, and pools plus the decomposition and synthesis calls into the
execution (``Execution.cost``). Each call is also published as a ``CostIncurred`` event on
``events.<execution_id>.cost`` with a deterministic msg-id, so a replay is not counted twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, TypeVar

from nats.aio.client import Client as NATS

from shared import metrics
from shared.bus import emit
from shared.config import ParallelExecutionConfig
from shared.names import Names
from shared.providers import Meter, ProviderError
from shared.schemas import CostIncurred, ModelCall, TaskCompleted, TaskFailed, Usage


def usd(pe: ParallelExecutionConfig, model: str, usage: Usage) -> float:
    """The USD price of ``usage`` on ``model`` (ConfigError if the model has no price)."""
    return pe.price(model).usd(
        usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens
    )


TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")


def observe(label: str, model: str, usage: Usage, cost: float) -> None:
    """Count a billed call in the cost and token metrics (``label``: the pool, or the PM's phase)."""
    if not cost and not usage.input_tokens:
        return
    metrics.COST.labels(label, model).inc(cost)
    counts = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens)
    for kind, n in zip(TOKEN_KINDS, counts, strict=True):
        if n:
            metrics.TOKENS.labels(label, model, kind).inc(n)


def prime_costs(label: str, models: Iterable[str]) -> None:
    """The cost and token series ``observe`` counts for ``label`` on each of ``models``, exported at 0 from the start
    (see ``metrics.prime``): the first call of a series would otherwise be hidden from the cost alert's increase()."""
    for model in models:
        metrics.prime(metrics.COST, [(label, model)])
        metrics.prime(metrics.TOKENS, [(label, model, kind) for kind in TOKEN_KINDS])


def model_call(
    pe: ParallelExecutionConfig,
    phase: Literal["decomposition", "synthesis"],
    model: str,
    provider: str,
    usage: Usage | None,
    error: str | None = None,
) -> ModelCall:
    """A priced record of a decomposition or synthesis call; counted in the cost metric once, here."""
    usage = usage or Usage()
    cost = usd(pe, model, usage)
    observe(phase, model, usage, cost)
    return ModelCall(phase=phase, model=model, provider=provider, usage=usage, cost_usd=cost, error=error)


R = TypeVar("R")
Phase = Literal["decomposition", "synthesis"]
log = logging.getLogger(__name__)


CUT_BY_STOP = "cut off: the service stopped before the call ended (shutdown_grace_s)"


async def guarded_call(pe: ParallelExecutionConfig, phase: Phase, model: str, provider: str,
                       call: Callable[[Meter], Awaitable[R]], ctx: dict[str, Any],
                       on_cut: Callable[[ModelCall], Awaitable[None]] | None = None,
                       ) -> tuple[R | None, ModelCall | None]:
    """Run a PM-side model call; a failure comes back as a priced ModelCall carrying the error (its
    billed usage included), never as an exception — the caller has a fallback for it. A call cut off by the
    service's stop (cancelled) after the model had started is billed all the same: it goes to ``on_cut``, which
    records it, before the cancellation goes on (the message's redelivery makes the call again)."""
    meter = Meter()
    try:
        return await call(meter), None
    except ProviderError as e:
        return None, model_call(pe, phase, model, provider, e.usage, f"{e.kind}: {e}")
    except asyncio.CancelledError:
        if on_cut is not None and meter.billed is not None:
            try:
                await on_cut(model_call(pe, phase, model, provider, meter.billed, CUT_BY_STOP))
            except Exception as e:  # noqa: BLE001 - stopping all the same; the call's cost is what is lost
                log.warning("could not record the %s call cut off by the stop: %s", phase, e, extra=ctx)
        raise
    except Exception as e:  # noqa: BLE001 - whatever broke the call, the caller's fallback still answers
        log.exception("%s call raised", phase, extra=ctx)
        return None, model_call(pe, phase, model, provider, None, f"error: {type(e).__name__}: {e}")


def call_events(execution_id: str, calls: list[ModelCall], phase: str) -> list[CostIncurred]:
    """A cost event for each of an execution's ``phase`` calls, numbered in order (``attempt``)."""
    return [CostIncurred(execution_id=execution_id, phase=c.phase, attempt=n, model=c.model, provider=c.provider,
                         usage=c.usage, cost_usd=c.cost_usd)
            for n, c in enumerate((c for c in calls if c.phase == phase), 1)]


def attempt_event(done: TaskCompleted | TaskFailed) -> CostIncurred:
    return CostIncurred(execution_id=done.execution_id, phase="task", task_id=done.task_id, pool=done.pool,
                        attempt=done.attempt, run=done.run, model=done.model or "", provider=done.provider or "",
                        usage=done.usage, cost_usd=done.cost_usd, incurred_at=done.finished_at)


async def publish_cost(nc: NATS, names: Names, event: CostIncurred) -> None:
    """Emit one cost event; its msg-id makes a replay within the duplicate window a no-op. The call's
    cost is also stored in the execution document, which is the record a bill is made from."""
    await emit(nc, names.cost_event(event.execution_id), event, event.msg_id())
