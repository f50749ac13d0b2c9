"""The failure handler: what to do after an attempt fails, and how a pool degrades when it gives up.

RETRY while attempts remain (the broker spaces them: ``nak(delay=1, 3, 9 s)``). FALLBACK: when the
failure says the model was busy or slow (rate limit, overloaded, timeout), the last attempt runs on
the pool's lighter model, and the next one does when the endpoint asks to wait past the execution's deadline;
when the model declined the task (refusal) or the endpoint does not know it (model_unavailable), the next one
does. Once an attempt has gone to the lighter model, every one after it stays there. A request the
endpoint refused (4xx) or an answer cut off at ``max_tokens`` would fail the same way again, paid again:
no retry. Exhausted: SKIP (deliver the rest without this result) or ESCALATE (the client must decide) by
pool, with the seed's degradation labels; REFUND is reported per execution as the cost of the work that
failed, was skipped or was cancelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from shared.config import ParallelExecutionConfig
from shared.names import Pool


class Strategy(StrEnum):
    RETRY = "retry"
    FALLBACK = "fallback"
    SKIP = "skip"
    ESCALATE = "escalate"


FALLBACK_KINDS = frozenset({"rate_limit", "overloaded", "timeout"})
FINAL_KINDS = frozenset({"request", "truncated"})  # the same call again would fail the same way
SWITCH_KINDS = frozenset({"refusal", "model_unavailable"})  # the same call on the other model may not

# What the client gets when a pool cannot deliver (seed: graceful degradation).
DEGRADATION: dict[Pool, str] = {
    "codegen": "pending",
    "security": "unaudited",
    "database": "without optimization",
}
# Missing code is a hole in the deliverable: the client decides. A missing audit or optimization
# degrades the answer but does not block it.
ON_EXHAUSTED: dict[Pool, Strategy] = {
    "codegen": Strategy.ESCALATE,
    "security": Strategy.SKIP,
    "database": Strategy.SKIP,
}


@dataclass(frozen=True)
class Decision:
    strategy: Strategy
    final: bool
    delay_s: float | None = None  # before the next attempt


def attempts_allowed(pe: ParallelExecutionConfig) -> int:
    return pe.retries.max_retries + 1


RETRY_AFTER_MAX_S = 60.0  # an endpoint's Retry-After is honoured up to this


def decide(pe: ParallelExecutionConfig, pool: Pool, attempt: int, kind: str, seconds_left: float,
           retry_after_s: float | None = None, model: str | None = None) -> Decision:
    """After attempt ``attempt`` (on ``model``) failed with ``kind``: retry (maybe on the fallback model) or give up.

    A retry on the same model waits at least what the endpoint asked for (Retry-After, at most
    ``RETRY_AFTER_MAX_S``): sooner would only be refused again, and burn an attempt. The fallback model has
    its own limits, so its attempt keeps the backoff's delay; and when what was asked for (uncapped) runs past
    the deadline, a busy model's task goes to it at once rather than give up. An attempt that ran on the fallback
    model already (after a refusal, or an unknown model) has no other model to go to: what follows it is a retry on
    that model."""
    on_fallback = model == pe.worker_pools.get(pool).fallback_model
    if kind in FINAL_KINDS or (kind in SWITCH_KINDS and on_fallback):
        return Decision(ON_EXHAUSTED[pool], final=True)
    delay = pe.retries.delay(attempt) if pe.retries.max_retries else 0.0
    last_next = attempt + 1 == attempts_allowed(pe)
    fallback = not on_fallback and (kind in SWITCH_KINDS or (last_next and kind in FALLBACK_KINDS))
    strategy = Strategy.FALLBACK if fallback else Strategy.RETRY
    if strategy is Strategy.RETRY and retry_after_s:
        waited = max(delay, min(retry_after_s, RETRY_AFTER_MAX_S))
        if delay < seconds_left <= max(delay, retry_after_s) and not on_fallback and kind in FALLBACK_KINDS:
            strategy = Strategy.FALLBACK  # busy past the deadline: the lighter model, which has its own limits
        else:
            delay = waited
    if attempt >= attempts_allowed(pe) or seconds_left <= delay:
        return Decision(ON_EXHAUSTED[pool], final=True)
    return Decision(strategy, final=False, delay_s=delay)


def model_for(pe: ParallelExecutionConfig, pool: Pool, attempt: int, failed: Sequence[str | None],
              decided: Sequence[str | None] = ()) -> str:
    """The model attempt ``attempt`` runs on, given how the attempts before it failed (their error kinds, in order)
    and what was decided after each (``decide``'s strategies, as recorded): the fallback model once one of them said
    so, once the pool's model has declined the task or been unknown to the endpoint, and on a last attempt after a
    busy/slow failure. The kinds alone decide when the records say nothing more (an attempt whose worker died)."""
    cfg = pe.worker_pools.get(pool)
    last = attempt >= attempts_allowed(pe)
    if attempt > 1 and (Strategy.FALLBACK in decided or SWITCH_KINDS.intersection(failed)
                        or (last and failed and failed[-1] in FALLBACK_KINDS)):
        return cfg.fallback_model
    return cfg.model
