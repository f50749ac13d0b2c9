"""Wiring of the PM: its durable consumer on executions.requested."""

from __future__ import annotations

from services.pm.handlers import PMHandlers
from shared.consumer import Consumer
from shared.schemas import ExecutionRequested
from shared.service import Runtime, Workers, run_service
from shared.topology import ensure_consumer, pm_consumer_config


async def start(rt: Runtime) -> Workers:
    js, names = rt.jetstream, rt.names
    await ensure_consumer(js, names.executions_stream, pm_consumer_config(names, rt.pe))
    handlers = PMHandlers(rt)
    consumer = Consumer(js, names, names.executions_stream, names.pm_consumer,
                        ExecutionRequested.model_validate_json, handlers.on_requested, capacity=64)
    return [consumer.run(rt.stop)]


def main() -> None:
    run_service("pm", start)
