"""Merge what the agents said into one AggregatedResult."""

from __future__ import annotations

from shared.schemas import AggregatedResult, Execution, PoolOutput

SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}


def aggregate(ex: Execution) -> AggregatedResult:
    """Outputs per pool, findings (most severe first), recommendations (security's first), a quality score."""
    result = AggregatedResult()
    for t in ex.tasks:
        if t.depends_on:
            result.dependencies.append({"task": t.id, "depends_on": t.depends_on})
        if t.output is None:
            continue
        result.outputs.setdefault(t.pool, []).append(
            PoolOutput(task_id=t.id, summary=t.output.summary, artifacts=[a.path for a in t.output.artifacts])
        )
        result.findings.extend(t.output.findings)
        result.recommendations.extend(t.output.recommendations)
    result.findings.sort(key=lambda f: SEVERITY_ORDER[f.severity])
    done = sum(t.status == "completed" for t in ex.tasks)
    result.quality_score = round(done / len(ex.tasks), 3) if ex.tasks else 0.0
    result.summary = (
        f"{done} of {len(ex.tasks)} task(s) completed across {len(result.outputs)} pool(s); "
        f"{len(result.findings)} finding(s), {len(result.recommendations)} recommendation(s)."
    )
    return result
