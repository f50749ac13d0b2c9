"""Prometheus metrics: one registry per process (the default), every name defined here."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

# Up to execution_timeout_s's default (30 min): an execution, or an event stream, may last that long. Dense around
# the minutes a model call or an execution takes (the pools' timeouts are 180 s and 300 s), and with a bound at the
# alert's 200 s, so that what OpenClawExecutionsSlow counts is exact rather than read off a line across a wide bucket.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90, 120, 180, 200, 240, 300,
                    450, 600, 900, 1200, 1800)

MESSAGES = Counter(
    "openclaw_messages_total", "Messages handled by a durable consumer", ["consumer", "outcome"]
)
DEAD_LETTERS = Counter("openclaw_dead_letters_total", "Messages dead-lettered", ["stream", "consumer"])

TASKS = Counter(
    "openclaw_tasks_total", "Task attempts by outcome: started, completed, retried, failed, abandoned",
    ["pool", "outcome"],
)
TASK_DURATION = Histogram(
    "openclaw_task_duration_seconds", "Duration of one task attempt", ["pool", "outcome"], buckets=DURATION_BUCKETS
)
READY = Gauge("openclaw_ready", "1 once the service has set up its streams and consumers, while it is connected to "
              "NATS; else 0: a process that answers scrapes but cannot work (/readyz also checks the streams later)")
TASKS_IN_FLIGHT = Gauge("openclaw_tasks_in_flight", "Task attempts running in this process", ["pool"])
QUEUE_DEPTH = Gauge("openclaw_queue_depth", "Tasks waiting in the pool's work queue (consumer num_pending)", ["pool"])
ACK_PENDING = Gauge(
    "openclaw_ack_pending", "Tasks delivered and not yet acked, pool-wide (consumer num_ack_pending)", ["pool"]
)
# ``pool`` is the pool for task calls, or the phase (decomposition, synthesis) for the PM's own calls.
COST = Counter("openclaw_cost_usd_total", "Model cost in USD", ["pool", "model"])
TOKENS = Counter("openclaw_tokens_total", "Model tokens by type (input, output, cache_read, cache_write)",
                 ["pool", "model", "type"])

EXECUTIONS = Counter("openclaw_executions_total", "Executions that reached a terminal status", ["mode", "status"])
EXECUTION_DURATION = Histogram(
    "openclaw_execution_duration_seconds", "Accepted → terminal", ["mode", "status"], buckets=DURATION_BUCKETS
)
CONFLICTS = Counter("openclaw_conflicts_total", "Conflicts between agents, by how they were settled", ["rule", "kind"])
REQUESTS = Counter("openclaw_http_requests_total", "Gateway API requests", ["route", "method", "status"])
REQUEST_DURATION = Histogram(
    "openclaw_http_request_duration_seconds", "Gateway API request time (streams: until the stream ends)",
    ["route", "method"], buckets=DURATION_BUCKETS,
)
OPEN_REQUESTS = Gauge("openclaw_http_open_requests", "Event streams and waiting requests the gateway holds open")
ROUTING_SECONDS = Histogram(
    "openclaw_routing_decision_seconds", "Time the chat router takes to choose parallel or single-agent",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1),
)
PLANS = Counter("openclaw_plans_total", "Plans made by the PM", ["planner"])
RESULTS_COALESCING = Gauge(
    "openclaw_results_coalescing", "Task results waiting to be stored with their execution's next change"
)
TEXTS_CUT = Counter("openclaw_texts_cut_total", "Messages whose longest texts were cut to fit the NATS server's "
                    "max_payload (document, result, task)", ["message"])
EVENTS_DROPPED = Counter("openclaw_events_dropped_total", "Events not sent because NATS could not take them "
                         "(disconnected past the client's reconnect buffer, closed)")
KV_CONFLICTS = Counter("openclaw_kv_cas_conflicts_total", "Compare-and-set writes of execution state that lost a race")


def prime(counter: Counter, label_sets: Sequence[Sequence[str]]) -> None:
    """Export these series at 0 from the start. ``increase()`` and ``rate()`` take a series' first sample as its
    start, so a series that first appears at 1 hides its first event from every alert: a process's first dead
    letter, say, which is often its only one."""
    for labels in label_sets:
        counter.labels(*labels)


def execution_ended(mode: str, status: str, seconds: float | None) -> None:
    """An execution reached ``status``: counted once, by the service whose write ended it."""
    EXECUTIONS.labels(mode, status).inc()
    if seconds is not None:
        EXECUTION_DURATION.labels(mode, status).observe(seconds)


prime(TEXTS_CUT, [("document",), ("result",), ("task",)])
