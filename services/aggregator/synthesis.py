"""The client-facing answer, in the PM's voice: what was done, timeline, cost, next steps.

With a provider that writes (anthropic), the synthesis model writes the answer in the configured
persona and the exact cost (and the refund due, if any) and the signature are appended to it; with one that does not
(simulated), when no task produced an output, or when the call fails, the deterministic template below
writes it. A /api/chat message the router gave one specialist is answered by that specialist's output itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from services.aggregator.aggregate import open_decisions
from services.aggregator.prompts import format_prompt
from shared.config import ParallelExecutionConfig, PMCoordinator
from shared.costs import guarded_call, model_call
from shared.providers import ModelProvider
from shared.schemas import AggregatedResult, Execution, ModelCall

log = logging.getLogger(__name__)


def _listed(title: str, items: list[str]) -> list[str]:
    """A titled list of the answer, after a blank line; nothing when there is nothing to list."""
    return ["", f"{title}:"] + [f"  • {item}" for item in items] if items else []


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f} min"


def synthesize(ex: Execution, agg: AggregatedResult, status: str, pm: PMCoordinator) -> str:
    """Render the final response from the aggregated result (deterministic, no model call)."""
    e = (lambda s: s) if pm.emoji else (lambda s: "")
    simulated = any(t.output is not None and t.output.simulated for t in ex.tasks)
    done = sum(t.status == "completed" for t in ex.tasks)
    headline = {
        "completed": f"{e('✅ ')}All done!",
        "partial": f"{e('⚠️ ')}{done} of {len(ex.tasks)} pieces are done; the rest needs another pass.",
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
    how = "in parallel pools" if ex.mode == "parallel" else "one task at a time"
    lines += ["", f"Timeline: {_fmt_s(wall)} end to end; {_fmt_s(work)} of agent work ran {how}."]
    lines += money_lines(ex)
    settled = [r for r in agg.recommendations if not r.decision_needed]
    lines += _listed("Recommendations", [f"{r.topic}: {r.choice}" for r in settled])
    lines += _listed("Decisions for you", open_decisions(ex, agg))

    steps = [f"Address [{f.severity}] {f.topic}" + (f": {advice}" if (advice := f.recommendation or f.detail) else "")
             for f in agg.findings]
    steps += [f"Re-run {t.id} ({t.pool}): {t.error}" for t in ex.tasks if t.status in ("failed", "skipped")]
    if steps:
        lines += ["", "Next steps:"] + [f"  {i}. {s}" for i, s in enumerate(steps, 1)]
    lines += ["", pm.signature]
    return "\n".join(lines)


def alone(ex: Execution) -> bool:
    """A /api/chat message the router gave one specialist: its answer is the client's, not the PM's summary of it."""
    return ex.routing is not None and not ex.routing.get("parallel") and len(ex.tasks) == 1


def specialist_answer(ex: Execution, agg: AggregatedResult) -> str:
    """The one specialist's output as the answer (no model call): what it says, the files it wrote, its findings and
    recommendations, what is left for the client to decide, and the exact cost."""
    [task] = ex.tasks
    out = task.output
    assert out is not None
    lines = [out.summary]
    if out.simulated:
        lines += ["", "(Answered on the simulated model provider: a placeholder, not real work.)"]
    for a in out.artifacts:
        lines += ["", f"{a.path} ({a.kind}):", a.content]
    lines += _listed("Findings", [f"[{f.severity}] {f.topic}" + (f": {f.detail}" if f.detail else "")
                                  + (f" — {f.recommendation}" if f.recommendation else "") for f in out.findings])
    lines += _listed("Recommendations", [f"{r.topic}: {r.choice}" + (f" ({r.rationale})" if r.rationale else "")
                                         for r in out.recommendations])
    lines += _listed("Decisions for you", open_decisions(ex, agg))
    return "\n".join([*lines, "", *money_lines(ex)])


def money_lines(ex: Execution) -> list[str]:
    """The exact cost, and the refund due when work failed, was skipped or was cancelled: figures the answer states
    as they are, whoever writes the rest."""
    lines = [cost_line(ex)]
    if ex.refund_usd > 0:
        lines.append(f"Refund due: ${ex.refund_usd:.4f} for work that failed, was skipped or was cancelled.")
    return lines


PLACES = 4  # the answer states dollars to the hundredth of a cent


def _adding_up(amounts: list[float], total: int) -> list[int]:
    """``amounts`` in units of the last place shown, rounded so that they make ``total`` (the largest remainders
    round up): each part rounded on its own would not always add up to the rounded whole."""
    scaled = [a * 10 ** PLACES for a in amounts]
    units = [int(x) for x in scaled]
    by_remainder = sorted(range(len(scaled)), key=lambda i: units[i] - scaled[i])
    for i in by_remainder[:max(0, total - sum(units))]:
        units[i] += 1
    return units


def _dollars(units: int) -> str:
    return f"${units / 10 ** PLACES:.{PLACES}f}"


def cost_line(ex: Execution) -> str:
    """Exact cost of the execution by phase (and pool), the synthesis call included; the figures it states add up."""
    cost = ex.cost
    total = round(float(f"{cost.total_usd:.{PLACES}f}") * 10 ** PLACES)  # the whole as every other place states it
    phases = [p for p in ("decomposition", "tasks", "synthesis") if p in cost.by_phase or p == "tasks"]
    shown = dict(zip(phases, _adding_up([cost.by_phase.get(p, 0.0) for p in phases], total), strict=True))
    pools = sorted(cost.by_pool)
    by_pool = ", ".join(f"{p} {_dollars(u)}" for p, u in
                        zip(pools, _adding_up([cost.by_pool[p] for p in pools], shown["tasks"]), strict=True))
    parts = []
    if "decomposition" in shown:
        parts.append(f"planning {_dollars(shown['decomposition'])}")
    parts.append(f"agents {_dollars(shown['tasks'])}" + (f" ({by_pool})" if by_pool else ""))
    if "synthesis" in shown:
        parts.append(f"this summary {_dollars(shown['synthesis'])}")
    return f"Cost: {_dollars(total)} — {'; '.join(parts)}."


Render = Callable[[Execution], str]


async def compose_answer(
    ex: Execution, agg: AggregatedResult, status: str, pe: ParallelExecutionConfig, provider: ModelProvider,
    on_cut: Callable[[ModelCall], Awaitable[None]] | None = None,
) -> tuple[Render, ModelCall | None]:
    """The final answer, as written for the version it is stored with (``render``: that version holds the call,
    and the cost line is its own), and the synthesis call behind it (None when the provider made no call). A
    synthesis call cut off by a stop goes to ``on_cut`` (see ``guarded_call``)."""
    pm = pe.pm_coordinator
    if alone(ex) and ex.tasks[0].output is not None:  # the specialist answered alone: its answer, not a summary of it
        return lambda version: specialist_answer(version, agg), None
    # The template writes it, at no cost: with a provider that does not write, and when no agent produced
    # anything (cancelled or failed before any task completed), where a paid answer would have nothing to say.
    if not provider.writes or not any(t.output is not None for t in ex.tasks):
        return lambda version: synthesize(version, agg, status, pm), None
    model, ctx = pm.synthesis_model, {"execution_id": ex.execution_id}
    reply, call = await guarded_call(
        pe, "synthesis", model, provider.name,
        lambda meter: provider.synthesize(format_prompt(ex, agg, status, pm), model, meter), ctx, on_cut)
    if reply is not None:
        text = reply.text
        return (lambda version: "\n\n".join([text, "\n".join(money_lines(version)), pm.signature]),
                model_call(pe, "synthesis", reply.model, reply.provider, reply.usage))
    assert call is not None  # no reply comes with the failed call
    log.warning("synthesis call failed (%s); using the template", call.error, extra=ctx)
    return lambda version: synthesize(version, agg, status, pm), call


async def write_answer(
    ex: Execution, agg: AggregatedResult, status: str, pe: ParallelExecutionConfig, provider: ModelProvider,
    on_cut: Callable[[ModelCall], Awaitable[None]] | None = None,
) -> tuple[str, ModelCall | None]:
    """``compose_answer``'s answer as written for ``ex`` with the call added."""
    render, call = await compose_answer(ex, agg, status, pe, provider, on_cut)
    return render(ex.model_copy(update={"calls": [*ex.calls, call]}) if call is not None else ex), call
