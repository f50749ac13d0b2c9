"""Auth mode against a real nats-server: one user per service, least privilege, the same auth file as k8s.

The stack runs under ``openclaw up --nats-auth``, so the runner starts nats-server with
deploy/nats/auth.conf and hands every child its own user. Then other users try what they must not do
and the server refuses it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig

from shared import natsauth
from shared.errors import ConfigError
from shared.names import POOLS, Names
from shared.natsserver import NatsServer, free_port
from shared.runner import Stack as RunnerStack
from shared.runner import StackOptions
from shared.settings import load_settings
from tests.conftest import Stack, start_stack, stop_stack

pytestmark = pytest.mark.e2e

INTRUDER = "auth-test"  # client name of this module's own connections, told apart in the server log
PROD = Names("")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(None, "", tmp_path_factory.mktemp("auth"), "--nats-auth", "--nats-port", str(free_port()))
    yield s
    assert stop_stack(s) == 0, s.output()[-3000:]


def server_log(stack: Stack) -> str:
    return (stack.data_dir / "nats-server.log").read_text(errors="replace")


class Client:
    """A connection as one service's user that records the errors the server sends it."""

    def __init__(self) -> None:
        self.errors: asyncio.Queue[str] = asyncio.Queue()
        self.nc: NATS | None = None

    async def connect(self, url: str, user: str) -> NATS:
        async def on_error(e: Exception) -> None:
            await self.errors.put(str(e).lower())

        self.nc = await nats.connect(url, name=INTRUDER, user=user, password=natsauth.dev_password(user),
                                     inbox_prefix=f"_INBOX_{user}", error_cb=on_error, allow_reconnect=False)
        return self.nc

    async def refused(self, what: str, subject: str, timeout: float = 5.0) -> str:
        """The server's permissions-violation error naming ``subject`` (fails if none arrives)."""
        want = f'permissions violation for {what} to "{subject.lower()}"'
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = []
        while (left := deadline - loop.time()) > 0:
            try:
                err = await asyncio.wait_for(self.errors.get(), left)
            except TimeoutError:
                break
            if want in err:
                return err
            seen.append(err)
        raise AssertionError(f"no {want!r} within {timeout}s; errors seen: {seen}")


@pytest.fixture
async def as_user(stack: Stack) -> AsyncIterator:  # type: ignore[type-arg]
    clients: list[Client] = []

    async def connect(user: str) -> tuple[NATS, Client]:
        c = Client()
        clients.append(c)
        return await c.connect(str(stack.state()["nats_url"]), user), c

    yield connect
    for c in clients:
        if c.nc is not None and not c.nc.is_closed:
            await c.nc.close()


def test_whole_stack_runs_an_execution_with_auth_on(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}/api/execute-parallel",
                   json={"message": "Build a restaurant website with online ordering", "wait": True}, timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] == "completed", doc
    assert {t["pool"] for t in doc["tasks"]} == set(POOLS)
    assert all(t["status"] == "completed" for t in doc["tasks"])
    # Replaying its events (an ordered consumer on EVENTS, as the pools follow endings) is allowed too.
    with httpx.stream("GET", f"{stack.url}/api/execution/{doc['execution_id']}/events", timeout=30) as events:
        kinds = [line.removeprefix("event: ") for line in events.iter_lines() if line.startswith("event: ")]
    assert kinds[0] == "planned" and kinds[-1] == "completed" and "task_completed" in kinds, kinds
    # Every service did its whole job within its permissions: the server refused none of them.
    refused = [line for line in server_log(stack).splitlines() if "Violation" in line and INTRUDER not in line]
    assert refused == [], "\n".join(refused)
    assert "users from" in stack.output() and "auth.conf" in stack.output()


async def test_a_pool_cannot_take_another_pools_tasks(as_user) -> None:  # type: ignore[no-untyped-def]
    nc, codegen = await as_user("codegen")
    js = nc.jetstream(timeout=1)  # a refused API request gets no answer: fail fast
    tasks, durable = PROD.tasks_stream, PROD.pool_consumer("security")

    # Fetch from the security durable: the pull request itself is refused.
    sub = await js.pull_subscribe_bind(durable, stream=tasks)
    with pytest.raises(asyncio.TimeoutError):
        await sub.fetch(1, timeout=1)
    await codegen.refused("publish", f"$JS.API.CONSUMER.MSG.NEXT.{tasks}.{durable}")

    # Nor may it make a consumer of its own on the security subject (ephemeral or durable) ...
    with pytest.raises(asyncio.TimeoutError):
        await js.add_consumer(tasks, ConsumerConfig(filter_subject=PROD.tasks("security")), timeout=1)
    await codegen.refused("publish", f"$JS.API.CONSUMER.CREATE.{tasks}")
    steal = ConsumerConfig(name="codegen", durable_name="codegen", filter_subject=PROD.tasks("security"))
    with pytest.raises(asyncio.TimeoutError):
        await js.add_consumer(tasks, steal, timeout=1)
    await codegen.refused("publish", f"$JS.API.CONSUMER.CREATE.{tasks}.codegen.{PROD.tasks('security')}")

    # ... rewrite the stream (its subjects or a transform could route other work to it) ...
    info = await js.stream_info(tasks)
    with pytest.raises(asyncio.TimeoutError):
        await js.update_stream(info.config)
    await codegen.refused("publish", f"$JS.API.STREAM.UPDATE.{tasks}")

    # ... ack on the security durable, listen on security's inbox, or publish security work.
    await nc.publish(f"$JS.ACK.{tasks}.{durable}.1.1.1.0.0", b"+ACK")
    await codegen.refused("publish", f"$JS.ACK.{tasks}.{durable}.1.1.1.0.0")
    await nc.subscribe("_INBOX_security.>")
    await codegen.refused("subscription", "_INBOX_security.>")
    await nc.publish(PROD.tasks("security"), b"{}")
    await codegen.refused("publish", PROD.tasks("security"))


async def test_the_gateway_cannot_publish_tasks(as_user) -> None:  # type: ignore[no-untyped-def]
    nc, gateway = await as_user("gateway")
    for pool in POOLS:
        await nc.publish(PROD.tasks(pool), b"{}")
        await gateway.refused("publish", PROD.tasks(pool))
    # Through JetStream too: the publish never reaches the stream, so no ack comes back.
    js = nc.jetstream(timeout=1)
    with pytest.raises(TimeoutError):
        await js.publish(PROD.tasks("codegen"), b"{}", timeout=1)
    await gateway.refused("publish", PROD.tasks("codegen"))
    # Nor can it reconfigure TASKS to take its own subjects in.
    with pytest.raises(TimeoutError):
        await js.update_stream((await js.stream_info(PROD.tasks_stream)).config)
    await gateway.refused("publish", f"$JS.API.STREAM.UPDATE.{PROD.tasks_stream}")


async def test_a_wrong_password_is_refused(stack: Stack) -> None:
    with pytest.raises(nats.errors.Error):
        await nats.connect(str(stack.state()["nats_url"]), name=INTRUDER, user="codegen", password="wrong",
                           allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


def test_a_service_with_a_wrong_password_says_what_to_check(stack: Stack) -> None:
    env = {**os.environ, "OPENCLAW_NATS_URL": str(stack.state()["nats_url"]), "OPENCLAW_NATS_USER": "codegen",
           "OPENCLAW_NATS_PASSWORD": "wrong", "OPENCLAW_PORT": "0", "OPENCLAW_LOG_FORMAT": "text"}
    proc = subprocess.Popen([sys.executable, "-m", "services.codegen"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(20, proc.kill)  # ends the read below if the line never comes
    watchdog.start()
    try:
        assert proc.stdout is not None
        said = next((line for line in proc.stdout if "refused user 'codegen'" in line), "")
    finally:
        watchdog.cancel()
        proc.terminate()
        proc.wait(10)
    assert "check OPENCLAW_NATS_USER / OPENCLAW_NATS_PASSWORD" in said, said


def test_the_auth_file_is_the_one_rendered_from_the_topology() -> None:
    """The permissions are literal names: the committed file must be what shared/names.py implies today."""
    text = natsauth.DEFAULT_AUTH_FILE.read_text()
    assert text == natsauth.render(), "stale: run `openclaw nats-auth-conf > deploy/nats/auth.conf`"
    created = set(re.findall(r'"\$JS\.API\.STREAM\.CREATE\.([A-Za-z_]+)"', text))
    assert created == {*PROD.all_streams, PROD.kv_stream}
    durables = set(re.findall(r'"\$JS\.API\.CONSUMER\.MSG\.NEXT\.([A-Z]+\.[a-z_]+)"', text))
    assert durables == {f"{PROD.executions_stream}.{PROD.pm_consumer}",
                        f"{PROD.executions_stream}.{PROD.deadlines_consumer}",
                        f"{PROD.executions_stream}.{PROD.cancels_consumer}",
                        f"{PROD.advisories_stream}.{PROD.dead_letters_consumer}",
                        f"{PROD.results_stream}.{PROD.aggregator_consumer}",
                        *(f"{PROD.tasks_stream}.{PROD.pool_consumer(p)}" for p in POOLS)}
    users = re.findall(r"user: (\w+)\s+password: \$(\w+)", text)
    assert users == [(u, natsauth.password_env(u)) for u in natsauth.USERS]
    blocks = dict(re.findall(r"user: (\w+)(.*?)subscribe", text, re.S))
    assert [u for u, b in blocks.items() if "STREAM.UPDATE" in b] == [natsauth.TOPOLOGY_OWNER]


def test_auth_mode_refuses_a_namespace_and_half_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be combined with --namespace"):
        RunnerStack(StackOptions(tmp_path, namespace="x" + uuid.uuid4().hex[:6],
                                 nats_auth=natsauth.DEFAULT_AUTH_FILE))
    with pytest.raises(ConfigError, match="OPENCLAW_NATS_USER and OPENCLAW_NATS_PASSWORD together"):
        load_settings(nats_user="codegen")
    s = load_settings(nats_user="codegen", nats_password="secret")
    assert s.nats_inbox_prefix == "_INBOX_codegen" and "secret" not in repr(s)


def test_a_server_that_cannot_read_its_auth_file_says_why(tmp_path: Path) -> None:
    # An all-digit password is a number to nats-server's config parser: it exited, and the runner said only
    # "exited with status 1", the reason left in a log file.
    pw = natsauth.passwords({natsauth.password_env("pm"): "12345"})
    server = NatsServer(tmp_path / "store", port=free_port(), config_file=natsauth.DEFAULT_AUTH_FILE,
                        env=natsauth.server_env(pw))
    with pytest.raises(RuntimeError, match=r"exited with status \d+ during start-up: .*auth\.conf.*\(log: "):
        server.start(15.0, tmp_path / "nats-server.log")
