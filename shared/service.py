"""The lifecycle every service shares: settings → ops HTTP → NATS (with retry) → topology → run → drain."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import uvloop
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from shared import metrics
from shared.bus import RETRY_MAX_S, connect, stopped_within
from shared.config import ParallelExecutionConfig
from shared.consumer import UNAVAILABLE
from shared.errors import ConfigError
from shared.execution import record_calls
from shared.logs import setup_logging
from shared.names import Names
from shared.natsauth import TOPOLOGY_OWNER
from shared.ops import add_ops_routes, serve
from shared.schemas import Execution, ExecutionCompleted, ModelCall
from shared.settings import Settings, load_settings
from shared.sizes import message_limit
from shared.state import ExecutionStore
from shared.topology import ensure_streams, topology_present

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a running service holds: settings, one NATS connection, the KV store, the stop signal."""

    service: str
    settings: Settings
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    nc: NATS | None = None
    js: JetStreamContext | None = None
    kv: KeyValue | None = None
    store: ExecutionStore | None = None
    started: bool = False
    waiting: str | None = None  # why it is not started yet, while it waits for JetStream
    _stopping: asyncio.Task[bool] | None = field(default=None, init=False, repr=False)

    @property
    def names(self) -> Names:
        return self.settings.names

    @property
    def pe(self) -> ParallelExecutionConfig:
        return self.settings.pe

    @property
    def nats(self) -> NATS:
        if self.nc is None:
            raise RuntimeError("NATS is not connected yet")
        return self.nc

    @property
    def jetstream(self) -> JetStreamContext:
        if self.js is None:
            raise RuntimeError("NATS is not connected yet")
        return self.js

    @property
    def executions(self) -> ExecutionStore:
        if self.store is None:
            raise RuntimeError("NATS is not connected yet")
        return self.store

    async def announce_completed(self, ex: Execution, document: bytes | None = None) -> None:
        """Publish the final response event (around ``document``, ``ex`` as stored, when the caller has it);
        its msg-id makes a repeat harmless."""
        data = ExecutionCompleted.around(document or ex.model_dump_json().encode())
        await self.jetstream.publish(self.names.completed_event(ex.execution_id), data,
                                     headers={"Nats-Msg-Id": f"{ex.execution_id}:completed",
                                              ExecutionCompleted.STATUS_HEADER: ex.status})

    async def record_call(self, execution_id: str, call: ModelCall) -> None:
        """Store a model call made outside any other write of the execution (one cut off by a stop). Its cost event
        goes out with the others of its phase when the message's redelivery is handled (the PM's plan, the
        aggregator's final event): sent here too, the repeat could come after the events' duplicate window."""

        await self.executions.mutate(execution_id, lambda ex: record_calls(ex, [call]))

    def stopping(self) -> asyncio.Task[bool]:
        """Done once the service is told to stop: for waits that should end then instead of running out."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.stop.wait())
        return self._stopping

    async def ready(self) -> str | None:
        """None when this service can do its job; otherwise the reason it cannot."""
        if self.stop.is_set():
            return "stopping"
        if self.nc is None or not self.nc.is_connected:
            return f"NATS not connected ({self.settings.nats_url})"
        if not self.started:
            return self.waiting or "starting"
        try:
            return await topology_present(self.jetstream, self.names)
        except Exception as e:  # noqa: BLE001 - readiness reports any failure as a reason
            return f"topology check failed: {e}"


# HTTP port of each service when OPENCLAW_PORT is not set: the gateway's API, the others' ops endpoints.
DEFAULT_PORTS = {"gateway": 8080, "pm": 9101, "codegen": 9102, "security": 9103, "database": 9104, "aggregator": 9105}

Workers = list[Coroutine[Any, Any, None]]
Start = Callable[[Runtime], Awaitable[Workers]]
MakeApp = Callable[[Settings], FastAPI]


async def _main(service: str, start: Start, make_app: MakeApp | None, settings: Settings) -> None:
    rt = Runtime(service, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, rt.stop.set)

    app = make_app(settings) if make_app else FastAPI(title=f"openclaw {service}", docs_url=None, redoc_url=None)
    app.state.runtime = rt
    add_ops_routes(app, service, rt.ready)
    # What /readyz answers, but what Prometheus sees too (the OpenClawServiceNotReady alert): without its read of the
    # topology, and still 1 while a stopping service finishes its work.
    metrics.READY.set_function(lambda: float(rt.started and rt.nc is not None and rt.nc.is_connected))
    port = settings.port if settings.port is not None else DEFAULT_PORTS.get(service, 0)
    # Under the runner the socket is already bound (no port race between processes); else bind here.
    sock = socket.socket(fileno=settings.listen_fd) if settings.listen_fd is not None else None
    server, server_task = await serve(app, settings.host, port, sock)
    log.info("%s serving HTTP on %s:%d", service, settings.host, server.servers[0].sockets[0].getsockname()[1])

    workers: list[asyncio.Task[None]] = []
    try:
        try:
            password = settings.nats_password.get_secret_value() if settings.nats_password else None
            rt.nc = await connect(settings.nats_url, f"{service}:{settings.worker_id}", rt.stop,
                                  user=settings.nats_user, password=password,
                                  inbox_prefix=settings.nats_inbox_prefix, tls=settings.nats_tls)
        except asyncio.CancelledError:
            return
        rt.js = rt.nc.jetstream()
        started = await _set_up(rt, start)
        if started is None:
            return
        workers = [asyncio.create_task(c) for c in started]
        rt.started, rt.waiting = True, None
        log.info("%s ready (worker %s, namespace %r)", service, settings.worker_id, settings.namespace)
        stopped = asyncio.create_task(rt.stop.wait())
        done, _ = await asyncio.wait([stopped, *workers], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopped and t.exception() is not None:
                log.error("%s worker died: %r", service, t.exception())
                raise t.exception()  # type: ignore[misc]
        rt.stop.set()
        stopped.cancel()
    finally:
        rt.stop.set()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        # HTTP before NATS: the requests still open (a gateway's waits, which end on the stop) answer from the
        # store on their way out.
        server.should_exit = True
        await server_task
        if rt.nc is not None and rt.nc.is_connected:
            await rt.nc.drain()
        log.info("%s stopped", service)


async def _set_up(rt: Runtime, start: Start) -> Workers | None:
    """The topology and the service's own consumers, ready to run; None if told to stop first. While JetStream
    cannot answer (not enabled yet, a stream without quorum, a server restarting) it waits, unready, and tries
    again: a pod started before its JetStream would otherwise exit and crash-loop."""
    owner = rt.settings.nats_user is None or rt.settings.nats_user == TOPOLOGY_OWNER
    delay = 1.0
    while True:
        try:
            rt.kv = await ensure_streams(rt.jetstream, rt.names, rt.settings.stream_replicas, update=owner)
            rt.store = ExecutionStore(rt.kv, message_limit(rt.nats))
            return await start(rt)
        except UNAVAILABLE as e:
            rt.waiting = f"JetStream not available ({type(e).__name__}: {e})"
            log.warning("%s; trying again in %gs", rt.waiting, delay)
        if await stopped_within(rt.stop, delay):
            return None
        delay = min(delay * 2, RETRY_MAX_S)


def run_service(service: str, start: Start, make_app: MakeApp | None = None, models: bool = True) -> None:
    """Entry point of ``python -m services.<name>``: exit 2 with a clear message on bad configuration. ``models``:
    whether the service calls models (see ``load_settings``)."""
    try:
        settings = load_settings(models)
    except ConfigError as e:
        setup_logging(service)
        log.error("cannot start %s: %s", service, e)
        sys.exit(2)
    setup_logging(service, settings.log_level, settings.log_format)
    try:
        # A message or a request makes thousands of short-lived objects (pydantic models, NATS messages):
        # collect the young generation every 20,000 allocations instead of 700 (bench/PROFILE.md: +7 %).
        gc.set_threshold(20_000, 50, 100)
        uvloop.run(_main(service, start, make_app, settings))
    except ConfigError as e:
        log.error("cannot start %s: %s", service, e)
        sys.exit(2)
