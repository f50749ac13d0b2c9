"""Wiring of the aggregator: its durable consumer on results.>."""

from __future__ import annotations

from services.aggregator.handlers import AggregatorHandlers
from shared.consumer import Consumer
from shared.schemas import TaskResultAdapter
from shared.service import Runtime, Workers, run_service
from shared.topology import aggregator_consumer_config, ensure_consumer


async def start(rt: Runtime) -> Workers:
    js, names = rt.jetstream, rt.names
    await ensure_consumer(js, names.results_stream, aggregator_consumer_config(names, rt.pe))
    handlers = AggregatorHandlers(rt)
    consumer = Consumer(js, names, names.results_stream, names.aggregator_consumer,
                        TaskResultAdapter.validate_json, handlers.on_result, capacity=256)
    return [consumer.run(rt.stop)]


def main() -> None:
    run_service("aggregator", start)
