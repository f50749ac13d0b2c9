"""Topology against a real nats-server: idempotent, updated in place, detectable."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import BadRequestError

from shared.config import ParallelExecutionConfig, PoolConfig, WorkerPools
from shared.names import POOLS, Names
from shared.topology import (
    KV_TTL,
    aggregator_consumer_config,
    cancels_consumer_config,
    dead_letters_consumer_config,
    deadlines_consumer_config,
    ensure_consumer,
    ensure_streams,
    pm_consumer_config,
    pool_consumer_config,
    stream_configs,
    topology_present,
)


async def test_streams_and_kv_are_created_idempotently(nc: NATS, names: Names) -> None:
    js = nc.jetstream()
    assert await topology_present(js, names) == f"stream {names.executions_stream} missing"
    await ensure_streams(js, names)
    kv = await ensure_streams(js, names)  # a second service starting changes nothing
    assert await topology_present(js, names) is None
    await kv.put("k", b"v")
    assert (await kv.get("k")).value == b"v"
    info = await js.stream_info(names.tasks_stream)
    assert info.config.retention == "workqueue" and info.config.subjects == [names.tasks_all]


async def test_pool_consumer_limits_follow_config_and_update_in_place(nc: NATS, names: Names) -> None:
    js = nc.jetstream()
    await ensure_streams(js, names)
    pe = ParallelExecutionConfig()
    for pool in POOLS:
        await ensure_consumer(js, names.tasks_stream, pool_consumer_config(names, pool, pe))
        info = await js.consumer_info(names.tasks_stream, pool)
        assert info.config.max_ack_pending == pe.worker_pools.get(pool).max_concurrent
        assert info.config.filter_subject == names.tasks(pool)
        assert info.config.max_deliver == pe.retries.max_retries + 1

    bigger = ParallelExecutionConfig(worker_pools=WorkerPools(codegen=PoolConfig(max_concurrent=7, timeout=60)))
    await ensure_consumer(js, names.tasks_stream, pool_consumer_config(names, "codegen", bigger))
    assert (await js.consumer_info(names.tasks_stream, "codegen")).config.max_ack_pending == 7


async def test_namespaces_do_not_see_each_other(nc: NATS) -> None:
    js = nc.jetstream()
    a, b = Names("nsa" + str(id(nc))[-6:]), Names("nsb" + str(id(nc))[-6:])
    await ensure_streams(js, a)
    assert await topology_present(js, a) is None
    assert await topology_present(js, b) is not None


def test_a_service_creates_streams_with_the_configured_replicas(nats_url: str, namespace: str) -> None:
    """OPENCLAW_STREAM_REPLICAS reaches ensure_streams: R3 on this single server is refused at start-up."""
    env = {**os.environ, "OPENCLAW_NATS_URL": nats_url, "OPENCLAW_NAMESPACE": namespace, "OPENCLAW_PORT": "0",
           "OPENCLAW_STREAM_REPLICAS": "3", "OPENCLAW_LOG_FORMAT": "text"}
    proc = subprocess.run([sys.executable, "-m", "services.pm"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "replicas > 1 not supported in non-clustered mode" in proc.stdout + proc.stderr, proc.stderr[-2000:]


async def test_an_existing_bucket_with_another_configuration_is_updated_in_place(nc: NATS, names: Names) -> None:
    """As when prod moves from R1 to R3: create_key_value refuses a different config, so it is updated."""
    js = nc.jetstream()
    old = await js.create_key_value(bucket=names.kv_bucket, history=5)
    await old.put("kept", b"v")
    kv = await ensure_streams(js, names)
    assert (await js.stream_info(names.kv_stream)).config.max_msgs_per_subject == 1
    assert (await kv.get("kept")).value == b"v"


async def test_a_service_that_does_not_own_the_topology_leaves_a_differing_stream_alone(
    nc: NATS, names: Names
) -> None:
    """In auth mode only the owner may update streams; the others start anyway and change nothing."""
    js = nc.jetstream()
    tasks = stream_configs(names)[1]
    await js.add_stream(dataclasses.replace(tasks, duplicate_window=60))  # as an older version left it
    with pytest.raises(BadRequestError):  # what create_stream alone would run into
        await js.add_stream(tasks)
    kv = await ensure_streams(js, names, update=False)
    assert (await js.stream_info(tasks.name)).config.duplicate_window == 60
    await kv.put("k", b"v")
    await ensure_streams(js, names)  # the owner brings it up to date
    assert (await js.stream_info(tasks.name)).config.duplicate_window == tasks.duplicate_window


async def test_a_stream_left_without_message_schedules_is_not_ready_until_the_owner_updates_it(
    nc: NATS, names: Names
) -> None:
    """Deadline checks are message schedules: a gateway must not take requests before EXECUTIONS allows them."""
    js = nc.jetstream()
    executions = stream_configs(names)[0]
    assert executions.name == names.executions_stream and executions.allow_msg_schedules
    await js.add_stream(dataclasses.replace(executions, allow_msg_schedules=None))  # as an older version left it
    await ensure_streams(js, names, update=False)
    assert await topology_present(js, names) == (
        f"stream {names.executions_stream} does not allow message schedules yet (needs nats-server 2.12+)")
    await ensure_streams(js, names)  # the owner brings it up to date
    assert await topology_present(js, names) is None


async def test_a_bucket_left_without_republish_is_not_ready_until_the_owner_updates_it(nc: NATS, names: Names) -> None:
    """A waiting client hears of its execution's end from the bucket's republished versions: a gateway must not
    take requests before the bucket republishes them."""
    js = nc.jetstream()
    await js.create_key_value(bucket=names.kv_bucket, history=1, ttl=KV_TTL)  # as an older version left it
    await ensure_streams(js, names, update=False)
    assert await topology_present(js, names) == (
        f"KV bucket {names.kv_bucket} does not republish its documents on {names.documents_all} yet")
    kv = await ensure_streams(js, names)  # the owner brings it up to date
    assert await topology_present(js, names) is None
    sub = await nc.subscribe(names.document("e1"))
    revision = await kv.create("e1", b'{"status": "queued"}')
    republished = await sub.next_msg(timeout=5)
    assert republished.data == b'{"status": "queued"}' and republished.headers["Nats-Sequence"] == str(revision)


async def test_every_durable_waits_ack_wait_s_for_an_ack(nc: NATS, names: Names) -> None:
    # The handlers that may run long heartbeat at a third of ack_wait_s; a durable with its own ack_wait would
    # redeliver under them (a second billed synthesis call) once ack_wait_s is set above three times it.
    js = nc.jetstream()
    await ensure_streams(js, names)
    pe = ParallelExecutionConfig(ack_wait_s=120)
    durables = [
        (names.tasks_stream, pool_consumer_config(names, "codegen", pe)),
        (names.executions_stream, pm_consumer_config(names, pe)),
        (names.results_stream, aggregator_consumer_config(names, pe)),
        (names.executions_stream, cancels_consumer_config(names, pe)),
        (names.executions_stream, deadlines_consumer_config(names, pe)),
        (names.advisories_stream, dead_letters_consumer_config(names, pe)),
    ]
    for stream, cfg in durables:
        await ensure_consumer(js, stream, cfg)
        assert (await js.consumer_info(stream, cfg.durable_name)).config.ack_wait == 120, cfg.durable_name
