"""Synthesis prompts: the PM persona writes the client-facing answer from the aggregated results."""

from __future__ import annotations

import json
from typing import Any

from services.aggregator.aggregate import open_decisions
from shared.config import PMCoordinator
from shared.providers import Prompt
from shared.schemas import AggregatedResult, Execution


def system_prompt(pm: PMCoordinator) -> str:
    """The persona's standing instructions: static per configuration, so it is a cacheable prefix."""
    emoji = "Use an emoji now and then where it helps the reader." if pm.emoji else "Do not use emoji."
    return (
        f"You are {pm.name}, the project manager of an OpenClaw delivery team. Specialist agents (codegen, "
        "security, database) have worked on a client's request; you write the one message the client reads.\n\n"
        f"Tone: {pm.tone}. {emoji}\n\n"
        "Write, in this order: a one-line headline of the outcome; what was done, task by task, naming the "
        "pool and the files or SQL produced; what did not get done and why, and what the client gets without it "
        "(its degradation); the timeline; where agents disagreed, how it was settled (rule security_first: the "
        "security agent's recommendation won — say so; rule flag: nothing was settled); every decision the client "
        "must make, as given; next steps, critical and high findings first.\n\n"
        "Use only the facts you are given; never invent work, files or findings. Plain text, short paragraphs "
        "and bullet lists, no markdown headings. Do not state costs and do not sign: the exact cost line and "
        "your signature are appended after your text."
    )


def format_prompt(ex: Execution, agg: AggregatedResult, status: str, pm: PMCoordinator) -> Prompt:
    """The synthesis prompt for one finished execution."""
    tasks: list[dict[str, Any]] = []
    for t in ex.tasks:
        entry: dict[str, Any] = {"id": t.id, "pool": t.pool, "status": t.status, "description": t.description,
                                 "attempts": len(t.attempts)}
        if t.depends_on:
            entry["depends_on"] = t.depends_on
        if t.output is not None:
            entry["summary"] = t.output.summary
            entry["artifacts"] = [a.path for a in t.output.artifacts]
        if t.error and t.status != "completed":
            entry["error"] = t.error
        if t.degradation:
            entry["degradation"] = t.degradation
        tasks.append(entry)
    wall = (ex.updated_at - ex.created_at).total_seconds()
    work = sum(a.duration_s or 0.0 for t in ex.tasks for a in t.attempts)
    facts = {
        "request": ex.message,
        "outcome": status,
        "tasks": tasks,
        "findings": [f.model_dump() for f in agg.findings],
        "recommendations": [r.model_dump() for r in agg.recommendations],
        "conflicts": [c.model_dump(mode="json", exclude_none=True) for c in agg.conflicts_detected],
        "decisions_for_the_client": open_decisions(ex, agg),
        "timeline": {"end_to_end_s": round(wall, 1), "agent_work_s": round(work, 1)},
    }
    user = "The results of the execution, as JSON:\n\n" + json.dumps(facts, default=str)
    return Prompt(system_prompt(pm), user)
