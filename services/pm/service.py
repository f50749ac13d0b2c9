"""Wiring of the PM: its durable consumer on executions.requested."""

from __future__ import annotations

from typing import get_args

from services.pm.handlers import PMHandlers
from shared import metrics
from shared.consumer import Consumer
from shared.costs import prime_costs
from shared.providers import ModelUse, make_provider
from shared.schemas import ExecutionMode, ExecutionRequested
from shared.service import Runtime, Workers, run_service
from shared.topology import ensure_consumer, pm_consumer_config


async def start(rt: Runtime) -> Workers:
    js, names = rt.jetstream, rt.names
    await ensure_consumer(js, names.executions_stream, pm_consumer_config(names, rt.pe))
    metrics.prime(metrics.EXECUTIONS, [(m, "failed") for m in get_args(ExecutionMode)])  # ended without a plan
    provider = make_provider(rt.pe, rt.settings.anthropic_api_key)  # one client for the process
    if provider.writes:
        pm = rt.pe.pm_coordinator
        prime_costs("decomposition", [pm.decomposition_model])
        await provider.check_models([ModelUse("pm_coordinator.decomposition_model", pm.decomposition_model,
                                              pm.reasoning_effort)])
    handlers = PMHandlers(rt, provider)
    consumer = Consumer(rt.nats, names, names.executions_stream, names.pm_consumer,
                        ExecutionRequested.model_validate_json, handlers.on_requested, capacity=64,
                        ack_wait_s=rt.pe.ack_wait_s)

    async def run() -> None:
        try:
            await consumer.run(rt.stop, rt.pe.shutdown_grace_s)
        finally:
            await provider.aclose()

    return [run()]


def main() -> None:
    run_service("pm", start)
