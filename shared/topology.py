"""Streams, consumers and the KV bucket, created or updated idempotently at start-up.

Every service calls :func:`ensure_streams`; each then ensures the durable consumer it binds to.
Consumers are created with ``add_consumer`` (which updates mutable fields such as
``max_ack_pending`` in place), never through ``pull_subscribe``'s config, which is ignored when the
durable already exists.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from shared.config import TASK_DEDUP_WINDOW_S, ParallelExecutionConfig
from shared.errors import ConfigError
from shared.names import Names, Pool

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
STREAM_ALREADY_IN_USE = 10058
NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"
KV_HISTORY = 1
KV_TTL = 30 * DAY
EVENTS_DUPLICATE_WINDOW_S = 600.0  # how long a repeated event (same msg-id) is dropped instead of stored


def stream_configs(names: Names, replicas: int = 1) -> list[StreamConfig]:
    """The project's streams; TASKS is a work queue, the rest keep history for replay and audit."""

    def cfg(name: str, subject: str, max_age: float, dup: float, retention: RetentionPolicy,
            schedules: bool | None = None) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[subject],
            retention=retention,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=max_age,
            duplicate_window=dup,
            allow_msg_schedules=schedules,
        )

    limits, work = RetentionPolicy.LIMITS, RetentionPolicy.WORK_QUEUE
    return [
        # Message schedules: an execution's deadline check waits in the stream until its deadline.
        cfg(names.executions_stream, names.executions_all, 7 * DAY, 600, limits, schedules=True),
        # A long duplicate window: a released task's msg-id must stay remembered while the execution runs.
        cfg(names.tasks_stream, names.tasks_all, 7 * DAY, TASK_DEDUP_WINDOW_S, work),
        cfg(names.results_stream, names.results_all, 7 * DAY, 600, limits),
        cfg(names.events_stream, names.events_all, 7 * DAY, EVENTS_DUPLICATE_WINDOW_S, limits),
        cfg(names.dlq_stream, names.dlq_all, 30 * DAY, 600, limits),
        # Advisories are core NATS messages, lost if nobody listens: this stream keeps them.
        StreamConfig(
            name=names.advisories_stream,
            subjects=names.advisory_subjects(),
            retention=limits,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=30 * DAY,
        ),
    ]


def documents_republish(names: Names) -> RePublish:
    """Every version of an execution's document the bucket stores, republished by the server on
    ``names.document(id)`` (core NATS, at most once) once it is stored: a write that loses its
    compare-and-set is never seen there. The gateway answers a waiting client from it."""
    return RePublish(src=f"$KV.{names.kv_bucket}.>", dest=names.documents_all)


async def ensure_streams(js: JetStreamContext, names: Names, replicas: int = 1, update: bool = True) -> KeyValue:
    """Create every stream and the executions KV bucket, updating any that differ; return the bucket.

    ``update=False`` (a service that does not own the topology, in auth mode) creates what is missing
    but leaves an existing stream with another configuration as it is, for the owner to update. Replicas a
    single server cannot keep are a configuration error (exit 2), not a crash to restart forever.
    """
    try:
        return await _ensure_streams(js, names, replicas, update)
    except APIError as e:
        if e.err_code != NOT_CLUSTERED:
            raise
        raise ConfigError(f"OPENCLAW_STREAM_REPLICAS is {replicas}, but the NATS server is not part of a cluster "
                          f"({e.description}): set it to 1, or run NATS as a cluster of at least {replicas} "
                          "servers") from None


async def _ensure_streams(js: JetStreamContext, names: Names, replicas: int, update: bool) -> KeyValue:
    for cfg in stream_configs(names, replicas):
        try:
            await js.add_stream(cfg)
        except BadRequestError as e:
            if e.err_code != STREAM_ALREADY_IN_USE:
                raise
            if not update:
                log.warning("stream %s differs from this service's configuration; left to the topology owner",
                            cfg.name)
                continue
            await js.update_stream(cfg)
            log.info("updated stream %s", cfg.name)
    try:
        return await js.create_key_value(KeyValueConfig(
            bucket=names.kv_bucket, history=KV_HISTORY, ttl=KV_TTL, storage=StorageType.FILE, replicas=replicas,
            republish=documents_republish(names),
        ))
    except BadRequestError as e:
        if e.err_code != STREAM_ALREADY_IN_USE:
            raise
    if update:
        # The bucket exists with another configuration (e.g. R1 before prod's R3, or no republish before this
        # version): update its stream in place.
        cfg = (await js.stream_info(names.kv_stream)).config
        cfg.num_replicas, cfg.max_msgs_per_subject, cfg.max_age = replicas, KV_HISTORY, KV_TTL
        cfg.republish = documents_republish(names)
        await js.update_stream(cfg)
        log.info("updated KV bucket %s (replicas=%d)", names.kv_bucket, replicas)
    else:
        log.warning("KV bucket %s differs from this service's configuration; left to the topology owner",
                    names.kv_bucket)
    return await js.key_value(names.kv_bucket)


def _durable(name: str, subject: str, *, max_ack_pending: int, ack_wait: float, max_deliver: int) -> ConsumerConfig:
    # ``name`` as well as ``durable_name``: nats-py then creates it on
    # $JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>, where the server checks the filter against the
    # subject, so the auth file can let a service create exactly its own durable on its own subject.
    return ConsumerConfig(
        name=name,
        durable_name=name,
        filter_subject=subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
    )


def pool_consumer_config(names: Names, pool: Pool, pe: ParallelExecutionConfig) -> ConsumerConfig:
    """One durable per pool; ``max_ack_pending`` is the pool-wide concurrency limit across replicas."""
    return _durable(
        names.pool_consumer(pool),
        names.tasks(pool),
        max_ack_pending=pe.worker_pools.get(pool).max_concurrent,
        ack_wait=pe.ack_wait_s,
        max_deliver=pe.retries.max_retries + 1,
    )


def pm_consumer_config(names: Names, pe: ParallelExecutionConfig) -> ConsumerConfig:
    return _durable(names.pm_consumer, names.execution_requested, max_ack_pending=256, ack_wait=pe.ack_wait_s,
                    max_deliver=5)


def aggregator_consumer_config(names: Names, pe: ParallelExecutionConfig) -> ConsumerConfig:
    return _durable(
        names.aggregator_consumer, names.results_all, max_ack_pending=4096, ack_wait=pe.ack_wait_s, max_deliver=10
    )


def deadlines_consumer_config(names: Names, pe: ParallelExecutionConfig) -> ConsumerConfig:
    """Deadline checks are published by the stream's schedules at each execution's deadline, so this
    durable only sees those due (or, from a clock ahead of the aggregator's, about to be: nak'd until then)."""
    return _durable(names.deadlines_consumer, names.execution_deadline, max_ack_pending=1_000, ack_wait=pe.ack_wait_s,
                    max_deliver=-1)


def cancels_consumer_config(names: Names, pe: ParallelExecutionConfig) -> ConsumerConfig:
    return _durable(names.cancels_consumer, names.execution_cancel, max_ack_pending=256, ack_wait=pe.ack_wait_s,
                    max_deliver=10)


def dead_letters_consumer_config(names: Names, pe: ParallelExecutionConfig) -> ConsumerConfig:
    # Every durable's ack_wait is ack_wait_s: handlers that write a final answer heartbeat at a third of it.
    return ConsumerConfig(
        name=names.dead_letters_consumer,
        durable_name=names.dead_letters_consumer,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=pe.ack_wait_s,
        max_deliver=10,
        max_ack_pending=256,
    )


async def ensure_consumer(js: JetStreamContext, stream: str, cfg: ConsumerConfig) -> None:
    info = await js.add_consumer(stream, cfg)
    log.info(
        "consumer %s on %s ready (max_ack_pending=%s, ack_wait=%ss, max_deliver=%s)",
        cfg.durable_name, stream, info.config.max_ack_pending, info.config.ack_wait, info.config.max_deliver,
    )


async def topology_present(js: JetStreamContext, names: Names) -> str | None:
    """None when every stream and the KV bucket exist as this version needs them; otherwise what is not."""
    wanted = {cfg.name: cfg for cfg in stream_configs(names)}
    for name in names.all_streams:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            return f"stream {name} missing"
        if name in wanted and wanted[name].allow_msg_schedules and not info.config.allow_msg_schedules:
            # Left by an older version, until the topology's owner updates it: schedules would be refused.
            return f"stream {name} does not allow message schedules yet (needs nats-server 2.12+)"
    try:
        info = await js.stream_info(names.kv_stream)
    except NotFoundError:
        return f"KV bucket {names.kv_bucket} missing"
    if info.config.republish is None or info.config.republish.dest != names.documents_all:
        # Left by an older version, until the topology's owner updates it: a waiting client would not hear of
        # its execution's end before its wait ran out.
        return f"KV bucket {names.kv_bucket} does not republish its documents on {names.documents_all} yet"
    return None
