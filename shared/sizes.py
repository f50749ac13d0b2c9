"""Messages that fit the NATS server's ``max_payload``: agents' long texts are cut, longest first.

A model may answer with more than a message can carry: a task's output in its result, the outputs a task
gets from its dependencies, all of them (and the answer) in the execution document. A message over the
limit is refused (and the server closes the connection that sent it), so the work already paid for would
be retried and paid again until it was dead-lettered. Instead, the longest texts are cut, with a note of how
much, to the largest length that lets the message fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS

from shared.schemas import Execution, TaskOutput

# Bytes of max_payload kept for what goes around a document or result: headers (msg-id, expected sequence,
# the KV republish's) and the final event's envelope.
HEADROOM = 4096

Slot = tuple[Any, str]  # an object and the name of one of its text attributes


class TooLarge(Exception):
    """Even with every text cut, the message exceeds the limit."""


def message_limit(nc: NATS) -> int:
    """The most a message of ours may take on this server."""
    return nc.max_payload - HEADROOM


def output_slots(o: TaskOutput) -> list[Slot]:
    return [*((a, "content") for a in o.artifacts), *((f, "detail") for f in o.findings),
            *((r, "rationale") for r in o.recommendations), (o, "summary")]


def document_slots(ex: Execution) -> list[list[Slot]]:
    """The texts of an execution document, by the order in which they are cut: the agents' outputs (and
    their copies in the aggregated result), then the PM's answer."""
    agents = [s for t in ex.tasks if t.output is not None for s in output_slots(t.output)]
    if ex.aggregated is not None:
        agg = ex.aggregated
        agents += [(o, "summary") for outs in agg.outputs.values() for o in outs]
        agents += [(f, "detail") for f in agg.findings] + [(r, "rationale") for r in agg.recommendations]
    return [agents, [(ex, "final_response")]]


def fit(dump: Callable[[], bytes], tiers: list[list[Slot]], limit: int, what: str) -> tuple[bytes, int]:
    """``dump()`` once it is at most ``limit`` bytes, and how many characters were cut for it.

    The texts in ``tiers`` (changed in place) are cut to a common length, the largest that fits, one
    tier after another: a later tier is cut only if cutting all of the earlier ones is not enough.
    Raises TooLarge when cutting everything is not enough.
    """
    data = dump()
    if len(data) <= limit:
        return data, 0
    texts = [[(o, a, getattr(o, a)) for o, a in tier if getattr(o, a)] for tier in tiers]
    why = f"{what} may take {limit:,} bytes, the NATS server's max_payload less {HEADROOM:,}"

    def cut_to(tier: list[tuple[Any, str, str]], length: int) -> int:
        cut = 0
        for o, a, s in tier:
            short = f"{s[:length]} … [{len(s) - length:,} characters cut: {why}]"
            kept = short if len(short) < len(s) else s
            setattr(o, a, kept)
            cut += len(s) - length if kept is short else 0
        return cut

    cut_before = 0  # characters cut in the tiers already cut whole
    for tier in texts:
        cut = cut_to(tier, 0)
        if len(dump()) > limit:
            cut_before += cut
            continue
        fits, fails = 0, max((len(s) for *_, s in tier), default=0)  # the length that fits, one that does not
        while fails - fits > 1:
            mid = (fits + fails) // 2
            cut_to(tier, mid)
            fits, fails = (mid, fails) if len(dump()) <= limit else (fits, mid)
        cut = cut_to(tier, fits)
        return dump(), cut_before + cut
    raise TooLarge(f"{what} takes {len(dump()):,} bytes even with every text cut; at most {limit:,} fit")
