"""Pieces every pool's prompt shares: upstream outputs and the structured-result contract."""

from __future__ import annotations

import json

from shared.schemas import TaskSpec

# Topics the agents share, so that the aggregator can tell when two of them speak of the same thing (a security
# finding and another agent's approach to it): what each agent is told to name a topic with, where one fits.
TOPICS = ("authentication", "session-handling", "csrf", "xss", "sql-injection", "access-control", "password-storage",
          "secrets", "encryption", "input-validation", "rate-limiting", "payments", "database", "orm", "migrations",
          "api", "frontend", "hosting", "logging", "dependencies")

RESULT_CONTRACT = (
    "Answer with a structured result: a short summary; artifacts (path, kind, content) for any file or SQL "
    "you produce; findings (severity, topic, detail, recommendation) for risks; recommendations (topic, "
    "choice, rationale) for every technology or approach you choose. Name each topic with one of these keys when "
    f"one fits, as the other agents do: {', '.join(TOPICS)}; else with a short lowercase key of your own."
)


def user_prompt(task: TaskSpec, heading: str) -> str:
    """The task, its extra context and its upstream tasks' outputs, as one user message."""
    parts = [f"{heading}\n\n{task.description}"]
    extra = {k: v for k, v in task.context.items() if k not in ("simulate", "upstream")}
    if extra:
        parts.append("Context:\n" + json.dumps(extra, indent=2, default=str))
    upstream = task.context.get("upstream")
    if upstream:
        parts.append("Outputs of the tasks this one depends on:\n" + json.dumps(upstream, indent=2, default=str))
    return "\n\n".join(parts)
