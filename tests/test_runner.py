"""The local runner: owns a nats-server, supervises every service, stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shared.natsserver import NatsServer, free_port
from tests.conftest import ROOT, Stack, ready_on, stack_env, start_stack, stop_stack, wait_until, write_config

pytestmark = pytest.mark.e2e


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it is dead for our purposes once its parent reaped it.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_owns_nats_restarts_crashed_children_and_stops_cleanly(tmp_path: Path) -> None:
    nats_port = free_port()
    gw = free_port()
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up", "--nats-port", str(nats_port), "--gateway-port", str(gw),
         "--data-dir", str(tmp_path / "data"), "--replicas", "codegen=2"],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=stack_env(), start_new_session=True,
    )
    stack = Stack(proc, f"http://127.0.0.1:{gw}", tmp_path / "data", log, names=None)  # type: ignore[arg-type]

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{stack.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "the stack to be ready")
        assert port_open(nats_port)
        assert (tmp_path / "data" / "jetstream" / "jetstream").is_dir()  # JetStream file store under the data dir
        children = stack.state()["children"]
        assert isinstance(children, dict)
        assert set(children) == {"pm-1", "codegen-1", "codegen-2", "security-1", "database-1", "aggregator-1",
                                 "gateway-1"}

        victim = stack.pid("codegen-2")
        os.kill(victim, signal.SIGKILL)
        new_pid = wait_until(lambda: (p := stack.pid("codegen-2")) != victim and p, 30, "codegen-2 restarted")
        port = children["codegen-2"]["port"]

        wait_until(lambda: ready_on(port), 30, "the restarted codegen-2 to be ready")
        assert "codegen-2 exited with status -9; restart #1" in log.read_text()

        # The restarted stack still does work.
        plan = [{"id": "x", "pool": "codegen", "description": "x", "context": {"simulate": {"latency_s": 0}}}]
        r = httpx.post(f"{stack.url}/api/execute-parallel", json={"message": "m", "tasks": plan, "wait": True},
                       timeout=30)
        assert r.json()["status"] == "completed"
        pids = [stack.pid(name) for name in children]
    finally:
        if proc.poll() is None:  # Ctrl-C in its terminal: SIGINT to its whole process group
            os.killpg(proc.pid, signal.SIGINT)
        code = stop_stack(stack)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert "NATS error" not in out, out[-3000:]  # the services drained before the server stopped
    assert new_pid not in (victim,)
    assert not [p for p in pids if alive(p)], "orphaned children"
    assert not port_open(nats_port), "nats-server left running"
    assert "[codegen-2]" in out and "[gateway-1]" in out and "nats-server stopped" in out
    assert "codegen stopped" in out and "gateway stopped" in out  # children drained, not killed


def test_up_refuses_a_bad_config_before_starting_anything(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.json", {"worker_pools": {"database": {"max_concurrent": -1, "timeout": 1}}})
    nats_port = free_port()
    r = subprocess.run(
        [sys.executable, "-m", "shared.cli", "up", "--config", str(cfg), "--nats-port", str(nats_port),
         "--data-dir", str(tmp_path / "d")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert "parallel_execution.worker_pools.database.max_concurrent" in r.stderr
    assert not port_open(nats_port)


def test_up_will_not_take_a_port_someone_else_listens_on_for_its_nats_server(tmp_path: Path) -> None:
    # Waiting for the port would have found the other listener, and the services would have joined its streams.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--nats-port", str(port), "--gateway-port", "0",
                            "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"cannot start nats-server on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "gateway" not in r.stderr and "nats-server stopped" not in r.stderr  # nothing was started


@pytest.mark.parametrize(("args", "says"), [
    (["--namespace", "Bad-NS"], "argument --namespace: 'Bad-NS': lower-case letters and digits only"),
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
])
def test_up_refuses_bad_arguments_before_starting_anything(tmp_path: Path, args: list[str], says: str) -> None:
    r = subprocess.run([sys.executable, "-m", "shared.cli", "up", *args, "--data-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not (tmp_path / "jetstream").exists()


def test_bad_replicas_spec_is_rejected(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--replicas", "codgen=2",
                        "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bad --replicas entry 'codgen=2'" in r.stderr


def test_run_and_status_against_a_running_gateway(nats_url: str, tmp_path: Path) -> None:
    stack = start_stack(nats_url, "cli" + os.urandom(4).hex(), tmp_path)
    try:
        r = subprocess.run([sys.executable, "-m", "shared.cli", "run", "Design the database schema for orders",
                            "--url", stack.url], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        first = r.stdout.splitlines()[0]
        assert first.startswith("execution ") and "planned by serial" in first
        assert "[database]" in r.stdout and "COMPLETED" in r.stdout and "Pixel" in r.stdout
        eid = first.split()[1].rstrip(":")
        s = subprocess.run([sys.executable, "-m", "shared.cli", "status", eid, "--url", stack.url], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert s.returncode == 0 and f"execution {eid}: completed" in s.stdout
        missing = subprocess.run([sys.executable, "-m", "shared.cli", "status", "nope", "--url", stack.url],
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert missing.returncode == 1 and "no execution with id 'nope'" in missing.stderr
        assert "Traceback" not in missing.stderr
    finally:
        assert stop_stack(stack) == 0
    # The gateway gone: a message saying so, not a traceback.
    gone = subprocess.run([sys.executable, "-m", "shared.cli", "run", "anything", "--url", stack.url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and gone.stderr.startswith("openclaw: ") and "Traceback" not in gone.stderr


@pytest.mark.parametrize(("environment", "expected"), [({}, "1"), ({"GOMAXPROCS": "2"}, "2")])
def test_embedded_nats_server_runs_on_one_go_processor_unless_told_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], expected: str) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    for k, v in environment.items():
        monkeypatch.setenv(k, v)
    server = NatsServer(tmp_path / "store").start()
    try:
        assert server.proc is not None
        environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
        assert f"GOMAXPROCS={expected}".encode() in environ
    finally:
        server.stop()
