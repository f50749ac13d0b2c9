"""Merge what the agents said into one AggregatedResult: outputs, settled conflicts, a quality score."""

from __future__ import annotations

from services.aggregator.conflicts import settle
from shared.schemas import AggregatedResult, Execution, PoolOutput


def aggregate(ex: Execution, conflict_resolution: str = "security_first") -> AggregatedResult:
    """Outputs per pool, dependencies, conflicts with their resolution and audit trail, findings
    (most severe first), resolved recommendations, and a quality score."""
    result = AggregatedResult()
    for t in ex.tasks:
        if t.depends_on:
            result.dependencies.append({"task": t.id, "depends_on": t.depends_on})
        if t.output is not None:
            result.outputs.setdefault(t.pool, []).append(
                PoolOutput(task_id=t.id, summary=t.output.summary, artifacts=[a.path for a in t.output.artifacts])
            )
    s = settle(ex, conflict_resolution)
    result.conflicts_detected, result.audit, result.decisions = s.conflicts, s.audit, s.decisions
    result.findings, result.recommendations = s.findings, s.recommendations
    result.quality_score = quality(ex, len(open_decisions(ex, result)))
    done = sum(t.status == "completed" for t in ex.tasks)
    result.summary = (
        f"{done} of {len(ex.tasks)} task(s) completed across {len(result.outputs)} pool(s); "
        f"{len(s.conflicts)} conflict(s) ({len(s.audit)} override(s), {len(s.decisions)} decision(s) for you), "
        f"{len(s.findings)} finding(s), {len(s.recommendations)} recommendation(s)."
    )
    return result


def quality(ex: Execution, open_decisions: int) -> float:
    """Share of tasks completed, less 10 % if security's review is missing and 5 % per open decision (a disagreement
    no rule settled, or work escalated to the client)."""
    if not ex.tasks:
        return 0.0
    score = sum(t.status == "completed" for t in ex.tasks) / len(ex.tasks)
    if any(t.degradation == "unaudited" for t in ex.tasks):
        score *= 0.9
    return round(max(0.0, score - 0.05 * open_decisions), 3)


def open_decisions(ex: Execution, agg: AggregatedResult) -> list[str]:
    """What the client must decide: work escalated to them, and the disagreements no rule settled."""
    return [f"{t.id} ({t.pool}) is {t.degradation}: retry it, give it more time, or drop it from scope?"
            for t in ex.tasks if t.resolution == "escalate"] + agg.decisions
