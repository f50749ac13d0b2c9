"""Cutting agents' texts to fit a message (shared/sizes.py); the whole stack's case is in test_e2e_anthropic."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest
from nats.aio.client import Client as NATS

from services.aggregator.handlers import AggregatorHandlers
from shared.names import Names, Pool
from shared.providers import SimulatedProvider
from shared.schemas import (
    AggregatedResult,
    Artifact,
    Attempt,
    Execution,
    ExecutionDeadline,
    Finding,
    TaskOutput,
    TaskState,
    now,
)
from shared.sizes import TooLarge, fit, text_slots
from tests.conftest import delivered, service_runtime

Severity = Literal["info", "low", "medium", "high", "critical"]


def outputs(*lengths: int) -> list[TaskOutput]:
    return [TaskOutput(summary=f"task {i}", artifacts=[Artifact(path=f"f{i}", content="x" * n)])
            for i, n in enumerate(lengths)]


def dump(outs: list[TaskOutput]) -> bytes:
    return b"[" + b",".join(o.model_dump_json().encode() for o in outs) + b"]"


def test_what_fits_is_left_alone() -> None:
    outs = outputs(500, 20)
    data, cut = fit(lambda: dump(outs), [[s for o in outs for s in text_slots(o)]], 10_000, "a test")
    assert (data, cut) == (dump(outputs(500, 20)), 0)


def test_the_longest_texts_are_cut_to_one_length_and_no_shorter_than_needed() -> None:
    outs = outputs(5_000, 3_000, 200)
    limit = len(dump(outs)) - 4_000
    data, cut = fit(lambda: dump(outs), [[s for o in outs for s in text_slots(o)]], limit, "a test")
    assert len(data) <= limit and data == dump(outs)
    long, middle, short = (o.artifacts[0].content for o in outs)
    assert short == "x" * 200 and [o.summary for o in outs] == ["task 0", "task 1", "task 2"]
    kept = long.index(" … [")

    def marker(n: int) -> str:
        return f" … [{n:,} characters cut: a test may take {limit:,} bytes, the NATS server's max_payload less 4,096]"

    assert 200 < kept < 3_000
    assert (long, middle) == ("x" * kept + marker(5_000 - kept), "x" * kept + marker(3_000 - kept))
    assert cut == 8_000 - 2 * kept
    wider = outputs(5_000, 3_000, 200)  # one character more of each, and it would not fit
    for o in wider[:2]:
        o.artifacts[0].content = "x" * (kept + 1) + marker(len(o.artifacts[0].content) - kept - 1)
    assert len(dump(wider)) > limit


def test_a_later_tier_is_cut_only_when_the_earlier_ones_are_not_enough() -> None:
    outs = outputs(3_000)
    holder = TaskOutput(summary="y" * 3_000)
    whole = lambda: dump([*outs, holder])  # noqa: E731
    tiers = [text_slots(outs[0]), [(holder, "summary")]]
    fit(whole, tiers, len(whole()) - 1_000, "a test")
    assert holder.summary == "y" * 3_000 and "characters cut" in outs[0].artifacts[0].content
    outs, holder = outputs(3_000), TaskOutput(summary="y" * 3_000)
    tiers = [text_slots(outs[0]), [(holder, "summary")]]
    fit(whole, tiers, len(whole()) - 4_000, "a test")
    assert outs[0].artifacts[0].content.startswith(" … [3,000 characters cut")  # all of it
    assert holder.summary.startswith("y" * 500) and "characters cut" in holder.summary


def test_a_message_that_cannot_fit_says_so() -> None:
    outs = outputs(2_000)
    with pytest.raises(TooLarge, match="a test takes .* bytes even with every text cut; at most 100 fit"):
        fit(lambda: dump(outs), [text_slots(outs[0])], 100, "a test")


def test_every_free_text_is_cut_in_models_dicts_and_lists_but_no_fixed_value() -> None:
    finding = Finding(severity="critical", topic="t" * 2_000, detail="déjà \"vu\"\n" * 300,
                      recommendation="r" * 2_000)
    out = TaskOutput(summary="s", findings=[finding], artifacts=[Artifact(path="p" * 2_000, kind="sql")])
    context = {"upstream": {"api": {"notes": ["n" * 2_000, "short"]}}}
    holder = AggregatedResult(findings=[finding])  # the same finding, held twice
    whole = lambda: out.model_dump_json().encode() + json.dumps(context).encode() + holder.model_dump_json().encode()  # noqa: E731
    before = len(whole())
    data, cut = fit(whole, [text_slots(out) + text_slots(context) + text_slots(holder)], 4_000, "a test")
    assert len(data) <= 4_000 < before
    assert finding.severity == "critical" and out.artifacts[0].kind == "sql"  # Literal fields are never cut
    texts = [finding.topic, finding.detail, finding.recommendation, out.artifacts[0].path,
             context["upstream"]["api"]["notes"][0]]
    assert all("characters cut" in t for t in texts) and context["upstream"]["api"]["notes"][1] == "short"
    assert holder.findings[0] is finding and cut == sum(int(t.split("[")[1].split(" ")[0].replace(",", ""))
                                                       for t in texts)  # the shared finding counted once


async def test_an_answer_whose_conflicts_copy_the_agents_texts_is_stored_cut(
    nc: NATS, names: Names, tmp_path: Path,
) -> None:
    # Two findings on one topic that disagree: the conflict and its audit entry quote both, so the final document
    # holds each long text several times over, beyond what the running one (which fit) did.
    rt = await service_runtime(nc, names, tmp_path)
    t = now()

    def task(i: int, pool: Pool, severity: Severity) -> TaskState:
        return TaskState(id=f"t{i}", pool=pool, description="d", status="completed",
                         attempts=[Attempt(n=1, worker="w", started_at=t, finished_at=t, outcome="completed")],
                         output=TaskOutput(summary="s", findings=[
                             Finding(severity=severity, topic="auth", detail=f"{i}" * 300_000)]))

    ex = Execution(execution_id="big", message="m", created_at=t, updated_at=t, deadline_at=t - timedelta(seconds=1),
                   status="running", tasks=[task(0, "codegen", "low"), task(1, "security", "critical")])
    await rt.executions.create(ex)
    check = ExecutionDeadline(execution_id="big", deadline_at=ex.deadline_at)
    msg = await delivered(rt, names.execution_deadline, check.to_bytes(), names.executions_stream)
    await AggregatorHandlers(rt, SimulatedProvider(rt.pe)).on_deadline(check, msg)
    stored = await rt.executions.read("big")
    assert stored is not None and len(stored[0]) <= rt.executions.limit
    done = Execution.model_validate_json(stored[0])
    assert done.terminal and done.aggregated is not None and done.final_response
    [conflict] = done.aggregated.conflicts_detected
    assert conflict.rule == "security_first" and all("characters cut" in p.says for p in conflict.positions)
    assert done.tasks[1].output is not None and done.tasks[1].output.findings[0].severity == "critical"
