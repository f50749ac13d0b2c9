"""Messages that fit the NATS server's ``max_payload``: agents' long texts are cut, longest first.

A model may answer with more than a message can carry: a task's output in its result, the outputs a task
gets from its dependencies, all of them (and the answer) in the execution document. A message over the
limit is refused (and the server closes the connection that sent it), so the work already paid for would
be retried and paid again until it was dead-lettered. Instead, the longest texts are cut, with a note of how
much, to the largest length that lets the message fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from nats.aio.client import Client as NATS
from pydantic import BaseModel

from shared.schemas import Execution

# Bytes of max_payload kept for what goes around a document or result: headers (msg-id, expected sequence,
# the KV republish's) and the final event's envelope.
HEADROOM = 4096

Slot = tuple[Any, Any]  # a model, dict or list, and the field, key or index of one of its texts


class TooLarge(Exception):
    """Even with every text cut, the message exceeds the limit."""


def message_limit(nc: NATS) -> int:
    """The most a message of ours may take on this server."""
    return nc.max_payload - HEADROOM


def _fixed(annotation: Any) -> bool:
    """A field of a fixed set of values (a Literal, or one or None), which no cut may touch."""
    return get_origin(annotation) is Literal or any(get_origin(a) is Literal for a in get_args(annotation))


def text_slots(node: Any) -> list[Slot]:
    """Every text in ``node`` and below it (models, dicts, lists), except fields with a fixed set of values."""
    items: list[tuple[Any, Any]]
    if isinstance(node, BaseModel):
        items = [(k, getattr(node, k)) for k, f in type(node).model_fields.items() if not _fixed(f.annotation)]
    elif isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return []
    return [s for k, v in items for s in ([(node, k)] if isinstance(v, str) else text_slots(v))]


def document_slots(ex: Execution) -> list[list[Slot]]:
    """The texts of an execution document the agents wrote, by the order in which they are cut: their outputs
    and what the aggregator made of them (copies, conflicts, decisions), then the PM's answer."""
    agents = [s for t in ex.tasks if t.output is not None for s in text_slots(t.output)]
    return [agents + text_slots(ex.aggregated), [(ex, "final_response")]]


def _get(container: Any, key: Any) -> Any:
    return container[key] if isinstance(container, dict | list) else getattr(container, key)


def _set(container: Any, key: Any, value: str) -> None:
    if isinstance(container, dict | list):
        container[key] = value
    else:
        setattr(container, key, value)


def fit(dump: Callable[[], bytes], tiers: list[list[Slot]], limit: int, what: str) -> tuple[bytes, int]:
    """``dump()`` once it is at most ``limit`` bytes, and how many characters were cut for it.

    The texts in ``tiers`` (changed in place: pass copies of what others hold) are cut to a common length, the
    largest that fits, one tier after another: a later tier is cut only if cutting all of the earlier ones is
    not enough.
    Raises TooLarge when cutting everything is not enough.
    """
    data = dump()
    if len(data) <= limit:
        return data, 0
    texts: list[list[tuple[Any, Any, str]]] = []
    seen: set[tuple[int, Any]] = set()  # a text reached twice (an object held by two parents) is one text
    for slots in tiers:
        texts.append([])
        for c, k in slots:
            if isinstance(v := _get(c, k), str) and v and (id(c), k) not in seen:
                seen.add((id(c), k))
                texts[-1].append((c, k, v))
    why = f"{what} may take {limit:,} bytes, the NATS server's max_payload less {HEADROOM:,}"

    def cut_to(tier: list[tuple[Any, Any, str]], length: int) -> int:
        cut = 0
        for c, k, s in tier:
            short = f"{s[:length]} … [{len(s) - length:,} characters cut: {why}]"
            kept = short if len(short) < len(s) else s
            _set(c, k, kept)
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
