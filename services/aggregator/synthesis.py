"""The client-facing answer, in the PM's voice: what was done, timeline, cost, next steps."""

from __future__ import annotations

from shared.config import PMCoordinator
from shared.schemas import AggregatedResult, Execution


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f} min"


def synthesize(ex: Execution, agg: AggregatedResult, status: str, pm: PMCoordinator) -> str:
    """Render the final response from the aggregated result (deterministic, no model call)."""
    e = (lambda s: s) if pm.emoji else (lambda s: "")
    simulated = any(t.output is not None and t.output.simulated for t in ex.tasks)
    headline = {
        "completed": f"{e('✅ ')}All done!",
        "partial": f"{e('⚠️ ')}Most of it is done — a few pieces need another pass.",
        "failed": f"{e('❌ ')}I couldn't get this one over the line.",
        "cancelled": "This execution was cancelled.",
    }[status]
    lines = [f"Hi! {pm.name} here. {headline}", "", f"Request: {ex.message}", ""]
    if simulated:
        lines += ["(Agents ran on the simulated model provider: outputs are placeholders, not real work.)", ""]

    lines.append("What the team did:")
    for t in ex.tasks:
        if t.status == "completed" and t.output is not None:
            lines.append(f"  • [{t.pool}] {t.id}: {t.output.summary}")
        else:
            label = f" — delivered {t.degradation}" if t.degradation else ""
            lines.append(f"  • [{t.pool}] {t.id}: {t.status}{label} ({t.error or 'no result'})")
    unaudited = [t.id for t in ex.tasks if t.degradation == "unaudited"]
    if unaudited:
        lines += ["", f"{e('🔓 ')}Heads-up: the security review did not complete — treat these results as unaudited."]

    if agg.conflicts_detected:
        lines += ["", "Where the agents disagreed:"]
        for c in agg.conflicts_detected:
            shown = [p for p in c.positions if c.rule != "security_first" or p.pool != "security"]
            said = "; ".join(dict.fromkeys(f"{p.pool}: {p.says}" for p in shown))
            lines.append(f"  • {c.topic} — {c.resolution} ({'over ' if c.rule == 'security_first' else ''}{said})")

    wall = (ex.updated_at - ex.created_at).total_seconds()
    work = sum(a.duration_s or 0.0 for t in ex.tasks for a in t.attempts)
    lines += ["", f"Timeline: {_fmt_s(wall)} end to end; {_fmt_s(work)} of agent work ran in parallel pools."]
    cost = ex.cost
    by_pool = ", ".join(f"{p} ${c:.4f}" for p, c in sorted(cost.by_pool.items()))
    lines.append(f"Cost: ${cost.total_usd:.4f} ({by_pool}).")
    if ex.refund_usd > 0:
        lines.append(f"Refund due: ${ex.refund_usd:.4f} for work that failed or was skipped.")
    decisions = [f"{t.id} ({t.pool}) is {t.degradation}: retry it, give it more time, or drop it from scope?"
                 for t in ex.tasks if t.resolution == "escalate"] + agg.decisions
    if decisions:
        lines += ["", "Decisions for you:"] + [f"  • {d}" for d in decisions]

    steps = [f"Address [{f.severity}] {f.topic}: {f.recommendation}" for f in agg.findings if f.recommendation]
    steps += [f"Re-run {t.id} ({t.pool}): {t.error}" for t in ex.tasks if t.status in ("failed", "skipped")]
    if steps:
        lines += ["", "Next steps:"] + [f"  {i}. {s}" for i, s in enumerate(steps, 1)]
    lines += ["", pm.signature]
    return "\n".join(lines)
