"""The local runner behind ``openclaw up``: a nats-server and every service as supervised children.

Children that crash are restarted with backoff; Ctrl-C / SIGTERM stops them all (SIGTERM, then
SIGKILL after a grace period) and then the server, so nothing is left behind. Each child's output
is prefixed with its name.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from shared import natsauth
from shared.bus import stopped_within
from shared.errors import ConfigError
from shared.natsserver import NatsServer, free_port, stop_with_parent

log = logging.getLogger("openclaw.runner")


SERVICES = ("pm", "codegen", "security", "database", "aggregator", "gateway")
RESTART_MAX_DELAY_S = 10.0
HEALTHY_AFTER_S = 30.0  # a child that ran this long restarts with the shortest delay again


@dataclass
class Child:
    service: str
    index: int
    sock: socket.socket  # bound and listening here, inherited by every run of the child: no port race
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


def listen(port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1 (``port`` 0: any free one) that children can inherit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on 127.0.0.1:{port}: {e.strerror}; choose another --gateway-port") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


@dataclass
class StackOptions:
    data_dir: Path
    config: Path | None = None
    gateway_port: int = 8080
    nats_url: str | None = None
    nats_port: int | None = None
    replicas: dict[str, int] = field(default_factory=dict)
    namespace: str = ""
    nats_auth: Path | None = None  # auth file: one NATS user per service (see shared/natsauth.py)
    log_format: str = "text"
    log_level: str = "INFO"
    # How long a stopping child may take before it is killed: the config's shutdown_grace_s and the HTTP grace,
    # with a margin, so a task that finishes within the drain is not killed in it (openclaw up sets it).
    stop_grace_s: float = 15.0


def parse_replicas(text: str) -> dict[str, int]:
    """``codegen=2,security=1`` → {"codegen": 2, "security": 1}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition("=")
        if name not in SERVICES or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"bad --replicas entry {part!r}: use SERVICE=N with SERVICE in {', '.join(SERVICES)}")
        out[name] = int(count)
    return out


class Stack:
    """Runs and supervises the whole system on this machine."""

    def __init__(self, opts: StackOptions) -> None:
        self.opts = opts
        self.server: NatsServer | None = None
        self.children: list[Child] = []
        self.stopping = asyncio.Event()
        self.misconfigured: str | None = None  # the child that exited with a configuration error (status 2)
        self._supervisors: list[asyncio.Task[None]] = []
        self._server_watch: asyncio.Task[None] | None = None
        self._lock: IO[str] | None = None  # on the data dir: one stack per JetStream store
        self.passwords = natsauth.passwords(os.environ) if opts.nats_auth else {}
        if opts.nats_auth and opts.namespace:
            raise ConfigError("--nats-auth uses the production names: it cannot be combined with --namespace")

    @property
    def nats_url(self) -> str:
        if self.opts.nats_url:
            return self.opts.nats_url
        assert self.server is not None
        return self.server.url

    @property
    def gateway_url(self) -> str:
        gateway = next((c for c in self.children if c.service == "gateway"), None)
        return f"http://127.0.0.1:{gateway.port if gateway else self.opts.gateway_port}"

    async def start(self) -> None:
        try:
            self.opts.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock = (self.opts.data_dir / "stack.lock").open("w")  # not inherited by the children
        except OSError as e:
            raise ConfigError(f"cannot use {self.opts.data_dir} as the data directory: {e.strerror or e}; choose "
                              "another --data-dir") from None
        try:  # released when this process ends, however it ends
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another stack uses {self.opts.data_dir} (its nats-server would share this one's "
                              "JetStream store): stop it, or choose another --data-dir") from None
        if not self.opts.nats_url:
            auth = self.opts.nats_auth
            self.server = NatsServer(
                self.opts.data_dir / "jetstream",
                port=4222 if self.opts.nats_port is None else self.opts.nats_port or free_port(),
                config_file=auth,
                env=natsauth.server_env(self.passwords) if auth else None,
            )
            # In this thread, not a worker's: the server is told to stop when the thread that started it ends.
            self.server.start(15.0, self.opts.data_dir / "nats-server.log", die_with_parent=True)
            log.info("nats-server (JetStream, store %s%s) listening on %s", self.server.store_dir,
                     f", users from {auth}" if auth else "", self.server.url)
            self._server_watch = asyncio.create_task(self._supervise_server())
        gateway = listen(self.opts.gateway_port)  # one socket, which every gateway replica accepts on
        for service in SERVICES:
            for i in range(1, self.opts.replicas.get(service, 1) + 1):
                self.children.append(Child(service, i, gateway if service == "gateway" else listen(0)))
        for child in self.children:
            self._supervisors.append(asyncio.create_task(self._supervise(child)))
        self._write_state()

    def _write_state(self) -> None:
        """Who runs where, for operators (and tests) that need a child's pid."""
        state = {
            "nats_url": self.nats_url,
            "nats_pid": self.server.proc.pid if self.server and self.server.proc else None,
            "gateway_url": self.gateway_url,
            "children": {c.name: {"pid": c.proc.pid if c.proc else None, "port": c.port} for c in self.children},
        }
        tmp = self.opts.data_dir / "stack.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.opts.data_dir / "stack.json")  # readers never see a half-written file

    def _env(self, child: Child) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("OPENCLAW_API_KEY", None)  # the runner's own, as a client (a gateway given it and no keys stops)
        env.update(
            OPENCLAW_NATS_URL=self.nats_url,
            OPENCLAW_PORT=str(child.port),
            OPENCLAW_LISTEN_FD=str(child.sock.fileno()),
            OPENCLAW_HOST="127.0.0.1",
            OPENCLAW_WORKER_ID=child.name,
            OPENCLAW_NAMESPACE=self.opts.namespace,
            OPENCLAW_LOG_FORMAT=self.opts.log_format,
            OPENCLAW_LOG_LEVEL=self.opts.log_level,
            PYTHONUNBUFFERED="1",
        )
        if self.opts.config:
            env["OPENCLAW_CONFIG"] = str(self.opts.config.resolve())
        if self.opts.nats_auth:
            env.update(OPENCLAW_NATS_USER=child.service, OPENCLAW_NATS_PASSWORD=self.passwords[child.service])
        return env

    async def _spawn(self, child: Child) -> None:
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{child.service}",
            env=self._env(child),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            pass_fds=(child.sock.fileno(),),
            start_new_session=True,  # Ctrl-C reaches the runner only; it stops children in order
            preexec_fn=stop_with_parent,  # a runner killed outright leaves nothing running
        )
        child.pumps = [asyncio.create_task(self._pump(child, child.proc.stdout))]  # type: ignore[arg-type]
        self._write_state()

    @staticmethod
    async def _pump(child: Child, stream: asyncio.StreamReader) -> None:
        prefix = f"[{child.name}]".ljust(14)
        while line := await stream.readline():
            sys.stderr.write(f"{prefix} {line.decode(errors='replace').rstrip()}\n")

    async def _supervise(self, child: Child) -> None:
        delay = 0.5
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            began = loop.time()
            await self._spawn(child)
            assert child.proc is not None
            if self.stopping.is_set():  # stop() came while it was being started, and signalled only the others
                child.proc.send_signal(signal.SIGTERM)
            code = await child.proc.wait()
            await asyncio.gather(*child.pumps, return_exceptions=True)
            if self.stopping.is_set():
                return
            if code == 2:
                log.error("%s exited with status 2 (bad configuration): not restarting; stopping", child.name)
                self.misconfigured = child.name
                self.stopping.set()
                return
            if loop.time() - began > HEALTHY_AFTER_S:
                delay = 0.5
            child.restarts += 1
            log.warning("%s exited with status %s; restart #%d in %.1fs", child.name, code, child.restarts, delay)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, RESTART_MAX_DELAY_S)

    async def _supervise_server(self) -> None:
        """The nats-server started here: should it exit, it is started again on its port and store (the services
        reconnect on their own); should it not start, the stack stops."""
        assert self.server is not None and self.server.proc is not None
        delay = 0.5
        while not self.stopping.is_set():
            code = await asyncio.to_thread(self.server.proc.wait)
            if self.stopping.is_set():
                return
            log.warning("nats-server exited with status %s; starting it again in %.1fs", code, delay)
            if await stopped_within(self.stopping, delay):
                return
            try:
                self.server.start(15.0, self.opts.data_dir / "nats-server.log", die_with_parent=True)
            except (ConfigError, TimeoutError, RuntimeError) as e:
                log.error("nats-server could not be started again (%s); stopping", e)
                self.stopping.set()
                return
            log.info("nats-server listening on %s again", self.server.url)
            self._write_state()
            delay = min(delay * 2, RESTART_MAX_DELAY_S)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the gateway says it is ready (NATS connected, topology present)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        why = "it does not answer"
        async with httpx.AsyncClient(timeout=2.0) as client:
            while loop.time() < deadline:
                if self.stopping.is_set():
                    raise RuntimeError("stack stopped during start-up (a service's log above says why)")
                try:
                    r = await client.get(f"{self.gateway_url}/readyz")
                    if r.status_code == 200:
                        return
                    why = r.text
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"gateway not ready at {self.gateway_url} after {timeout:g}s: {why}")

    async def stop(self) -> None:
        """SIGTERM every child (they drain), SIGKILL what is left after the grace period, then the server."""
        grace_s = self.opts.stop_grace_s
        self.stopping.set()
        running = [c.proc for c in self.children if c.proc and c.proc.returncode is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        if running:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in running], timeout=grace_s)
            for proc in running:
                if proc.returncode is None:
                    log.warning("pid %d did not stop within %gs; killing it", proc.pid, grace_s)
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in running))
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        if self.server is not None and self.server.proc is not None:
            await asyncio.to_thread(self.server.stop)
            log.info("nats-server stopped")
        if self._server_watch is not None:
            await asyncio.gather(self._server_watch, return_exceptions=True)
        for c in self.children:
            c.sock.close()
        if self._lock is not None:
            self._lock.close()
