"""Wiring of the aggregator: its durable consumer on results.>."""

from __future__ import annotations

import asyncio
from typing import Any, get_args

from services.aggregator.handlers import AggregatorHandlers
from shared import metrics
from shared.consumer import Consumer
from shared.costs import prime_costs
from shared.providers import ModelUse, make_provider
from shared.schemas import (
    TERMINAL_EXECUTION,
    CancelExecution,
    ConsumerAdvisory,
    ExecutionDeadline,
    ExecutionMode,
    TaskResultAdapter,
)
from shared.service import Runtime, Workers, run_service
from shared.topology import (
    aggregator_consumer_config,
    cancels_consumer_config,
    dead_letters_consumer_config,
    deadlines_consumer_config,
    ensure_consumer,
)


async def start(rt: Runtime) -> Workers:
    """Four durables: task results, cancel commands, deadline checks, and the advisories of consumers
    that gave up."""
    js, names, nc = rt.jetstream, rt.names, rt.nats
    await ensure_consumer(js, names.results_stream, aggregator_consumer_config(names, rt.pe))
    await ensure_consumer(js, names.executions_stream, deadlines_consumer_config(names, rt.pe))
    await ensure_consumer(js, names.executions_stream, cancels_consumer_config(names, rt.pe))
    await ensure_consumer(js, names.advisories_stream, dead_letters_consumer_config(names, rt.pe))
    # Its dead letters come from every durable's advisories; its writes end executions in every way.
    metrics.prime(metrics.DEAD_LETTERS, names.durables)
    metrics.prime(metrics.EXECUTIONS, [(m, s) for m in get_args(ExecutionMode) for s in TERMINAL_EXECUTION])
    provider = make_provider(rt.pe, rt.settings.anthropic_api_key)  # one client for the process
    if provider.writes:
        prime_costs("synthesis", [rt.pe.pm_coordinator.synthesis_model])
        await provider.check_models([ModelUse("pm_coordinator.synthesis_model", rt.pe.pm_coordinator.synthesis_model)])
    h = AggregatorHandlers(rt, provider)
    consumers: list[Consumer[Any]] = [
        # Results waiting to be coalesced hold a slot (see _apply).
        Consumer(nc, names, names.results_stream, names.aggregator_consumer, TaskResultAdapter.validate_json,
                 h.on_result, capacity=1024, ack_wait_s=rt.pe.ack_wait_s),
        Consumer(nc, names, names.executions_stream, names.deadlines_consumer, ExecutionDeadline.model_validate_json,
                 h.on_deadline, capacity=256, ack_wait_s=rt.pe.ack_wait_s),
        Consumer(nc, names, names.executions_stream, names.cancels_consumer, CancelExecution.model_validate_json,
                 h.on_cancel, capacity=64, ack_wait_s=rt.pe.ack_wait_s),
        Consumer(nc, names, names.advisories_stream, names.dead_letters_consumer,
                 ConsumerAdvisory.model_validate_json, h.on_advisory, capacity=16,
                 ack_wait_s=rt.pe.ack_wait_s),
    ]

    async def run() -> None:
        try:
            await asyncio.gather(*(c.run(rt.stop, rt.pe.shutdown_grace_s) for c in consumers))
        finally:
            await provider.aclose()

    return [run()]


def main() -> None:
    run_service("aggregator", start)
