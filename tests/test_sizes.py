"""Cutting agents' texts to fit a message (shared/sizes.py); the whole stack's case is in test_e2e_anthropic."""

from __future__ import annotations

import pytest

from shared.schemas import Artifact, TaskOutput
from shared.sizes import TooLarge, fit, output_slots


def outputs(*lengths: int) -> list[TaskOutput]:
    return [TaskOutput(summary=f"task {i}", artifacts=[Artifact(path=f"f{i}", content="x" * n)])
            for i, n in enumerate(lengths)]


def dump(outs: list[TaskOutput]) -> bytes:
    return b"[" + b",".join(o.model_dump_json().encode() for o in outs) + b"]"


def test_what_fits_is_left_alone() -> None:
    outs = outputs(500, 20)
    data, cut = fit(lambda: dump(outs), [[s for o in outs for s in output_slots(o)]], 10_000, "a test")
    assert (data, cut) == (dump(outputs(500, 20)), 0)


def test_the_longest_texts_are_cut_to_one_length_and_no_shorter_than_needed() -> None:
    outs = outputs(5_000, 3_000, 200)
    limit = len(dump(outs)) - 4_000
    data, cut = fit(lambda: dump(outs), [[s for o in outs for s in output_slots(o)]], limit, "a test")
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
    tiers = [output_slots(outs[0]), [(holder, "summary")]]
    fit(whole, tiers, len(whole()) - 1_000, "a test")
    assert holder.summary == "y" * 3_000 and "characters cut" in outs[0].artifacts[0].content
    outs, holder = outputs(3_000), TaskOutput(summary="y" * 3_000)
    tiers = [output_slots(outs[0]), [(holder, "summary")]]
    fit(whole, tiers, len(whole()) - 4_000, "a test")
    assert outs[0].artifacts[0].content.startswith(" … [3,000 characters cut")  # all of it
    assert holder.summary.startswith("y" * 500) and "characters cut" in holder.summary


def test_a_message_that_cannot_fit_says_so() -> None:
    outs = outputs(2_000)
    with pytest.raises(TooLarge, match="a test takes .* bytes even with every text cut; at most 100 fit"):
        fit(lambda: dump(outs), [output_slots(outs[0])], 100, "a test")
