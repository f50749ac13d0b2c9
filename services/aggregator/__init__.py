"""The aggregator service: the execution's memory; releases dependent tasks and emits the final answer."""
