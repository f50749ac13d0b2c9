"""Wiring of the aggregator: its durable consumer on results.>."""

from __future__ import annotations

from services.aggregator.handlers import AggregatorHandlers
from shared.consumer import Consumer
from shared.providers import make_provider
from shared.schemas import TaskResultAdapter
from shared.service import Runtime, Workers, run_service
from shared.topology import aggregator_consumer_config, ensure_consumer


async def start(rt: Runtime) -> Workers:
    js, names = rt.jetstream, rt.names
    await ensure_consumer(js, names.results_stream, aggregator_consumer_config(names, rt.pe))
    provider = make_provider(rt.pe, rt.settings.anthropic_api_key)  # one client for the process
    handlers = AggregatorHandlers(rt, provider)
    consumer = Consumer(js, names, names.results_stream, names.aggregator_consumer,
                        TaskResultAdapter.validate_json, handlers.on_result, capacity=256)

    async def run() -> None:
        try:
            await consumer.run(rt.stop)
        finally:
            await provider.aclose()

    return [run()]


def main() -> None:
    run_service("aggregator", start)
