"""The local runner: owns a nats-server, supervises every service, stops cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shared.cli import build_parser
from shared.natsserver import NatsServer, free_port
from shared.runner import Stack as RunnerStack
from shared.runner import StackOptions
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
         "--data-dir", str(tmp_path / "data"), "--replicas", "codegen=2,gateway=2"],
        # A client key in the shell (for `openclaw run`) stays the runner's: a gateway given it and no
        # OPENCLAW_API_KEYS refuses to start.
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=stack_env(OPENCLAW_API_KEY="client-key-0123"),
        start_new_session=True,
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
                                 "gateway-1", "gateway-2"}
        assert children["gateway-1"]["port"] == children["gateway-2"]["port"] == gw  # both serve the one port

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

        # The nats-server dies too: started again on its port and store, the services reconnect, work goes on.
        server = stack.state()["nats_pid"]
        assert isinstance(server, int) and alive(server)
        os.kill(server, signal.SIGKILL)
        wait_until(lambda: stack.state()["nats_pid"] not in (server, None), 30, "nats-server started again")
        assert "nats-server exited with status -9; starting it again" in log.read_text()
        wait_until(ready, 60, "the stack to be ready again")
        r = httpx.post(f"{stack.url}/api/execute-parallel", json={"message": "again", "tasks": plan, "wait": True},
                       timeout=30)
        assert r.json()["status"] == "completed"
        pids = [stack.pid(name) for name in children] + [stack.state()["nats_pid"]]
    finally:
        stopped_at = len(log.read_bytes())
        if proc.poll() is None:  # Ctrl-C in its terminal: SIGINT to its whole process group
            os.killpg(proc.pid, signal.SIGINT)
        code = stop_stack(stack)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert "NATS error" not in log.read_bytes()[stopped_at:].decode(), out[-3000:]  # drained before the server stopped
    assert new_pid not in (victim,)
    assert not [p for p in pids if alive(p)], "orphaned children"
    assert not port_open(nats_port), "nats-server left running"
    assert "[codegen-2]" in out and "[gateway-1]" in out and "nats-server stopped" in out
    assert "codegen stopped" in out and "gateway stopped" in out  # children drained, not killed


def test_a_runner_killed_outright_leaves_nothing_running(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up", "--nats-port", "0", "--gateway-port", "0",
         "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=stack_env(), start_new_session=True,
    )
    state = tmp_path / "data" / "stack.json"

    def started() -> list[int] | None:
        assert proc.poll() is None, log.read_text()
        if "OpenClaw is up" not in log.read_text():
            return None
        s = json.loads(state.read_text())
        return [c["pid"] for c in s["children"].values()] + [s["nats_pid"]]

    try:
        pids = wait_until(started, 60, "the stack to be up")
        proc.kill()  # the runner alone, as an OOM kill or a closed session might
        proc.wait()
        wait_until(lambda: not [p for p in pids if alive(p)], 30, "the children and nats-server to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
        left = json.loads(state.read_text()) if state.exists() else {"children": {}}
        for p in [c["pid"] for c in left["children"].values()] + [left.get("nats_pid")]:
            if p and alive(p):
                os.kill(p, signal.SIGKILL)


def test_ctrl_c_stops_the_example_at_once_and_the_example_sends_the_gateways_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.json", {"simulated": {"latency_s": {"codegen": 120, "security": 120,
                                                                           "database": 120, "pm": 0}}})
    log = tmp_path / "up.log"
    keys = "acme=acme-key-0123456789abcdef"  # the example must send it to be let in
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up", "--example", "--once", "--config", str(cfg), "--nats-port", "0",
         "--gateway-port", "0", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=stack_env(OPENCLAW_API_KEYS=keys),
        start_new_session=True,
    )
    try:
        wait_until(lambda: proc.poll() is not None or "task(s) planned by" in log.read_text(), 60,
                   "the example to be planned")
        assert proc.poll() is None, log.read_text()
        s = json.loads((tmp_path / "data" / "stack.json").read_text())
        pids = [c["pid"] for c in s["children"].values()] + [s["nats_pid"]]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in its terminal
        code = proc.wait(timeout=60)  # not the example's two minutes
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert code == 128 + signal.SIGINT, out[-3000:]
    assert "interrupted before the example finished" in out
    assert not [p for p in pids if alive(p)], "orphaned children"


@pytest.mark.parametrize("given", ["--config", "OPENCLAW_CONFIG"])
def test_up_refuses_a_bad_config_before_starting_anything(tmp_path: Path, given: str) -> None:
    # Named by OPENCLAW_CONFIG, the file was not read by up itself: nats-server and every service started and
    # stopped on it, and up's own stop took the default shutdown grace rather than the file's.
    cfg = write_config(tmp_path / "c.json", {"worker_pools": {"database": {"max_concurrent": -1, "timeout": 1}}})
    nats_port = free_port()
    r = subprocess.run(
        [sys.executable, "-m", "shared.cli", "up", *(["--config", str(cfg)] if given == "--config" else []),
         "--nats-port", str(nats_port), "--data-dir", str(tmp_path / "d")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=stack_env(**({"OPENCLAW_CONFIG": str(cfg)} if given == "OPENCLAW_CONFIG" else {})),
    )
    assert r.returncode == 2
    assert "parallel_execution.worker_pools.database.max_concurrent" in r.stderr
    assert not port_open(nats_port) and not (tmp_path / "d" / "jetstream").exists()  # no nats-server ever ran
    assert "cannot start" not in r.stderr  # nor a service


def test_a_service_that_stops_the_stack_on_its_configuration_makes_up_exit_2_too(tmp_path: Path) -> None:
    # Only the service can tell (the gateway parses its keys): the stack stopped, and up said 1, as for a crash.
    r = subprocess.run(
        [sys.executable, "-m", "shared.cli", "up", "--once", "--nats-port", "0", "--gateway-port", "0",
         "--data-dir", str(tmp_path / "d")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=stack_env(OPENCLAW_API_KEYS=" , "),
    )
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "OPENCLAW_API_KEYS is set but empty" in out and "stack stopped during start-up" in out


def test_a_stack_that_stops_itself_while_serving_makes_up_exit_2_on_a_configuration(nats_url: str,
                                                                                  tmp_path: Path) -> None:
    # A child restarted after a crash found the config file broken meanwhile: the stack stopped, and up said 0.
    cfg = write_config(tmp_path / "c.json", {})
    stack = start_stack(nats_url, "self" + os.urandom(4).hex(), tmp_path, "--config", str(cfg))
    try:
        write_config(cfg, {"worker_pools": {"database": {"max_concurrent": -1, "timeout": 1}}})
        os.kill(stack.pid("pm-1"), signal.SIGKILL)
        code = stack.proc.wait(60)
    finally:
        stop_stack(stack)
    out = stack.output()
    assert code == 2, out[-3000:]
    assert "pm-1 exited with status 2" in out and "the stack stopped (the log above says why)" in out


def test_a_second_stack_on_the_same_data_dir_is_refused(nats_url: str, tmp_path: Path) -> None:
    # Its nats-server would have run on the first one's JetStream store, and its stack.json replaced the first's.
    first = start_stack(nats_url, "one" + os.urandom(4).hex(), tmp_path)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "shared.cli", "up", "--nats-port", "0", "--gateway-port", "0", "--data-dir",
             str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=60, env=stack_env())
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"another stack uses {tmp_path / 'data'}" in second.stderr
        assert first.proc.poll() is None and json.loads((tmp_path / "data" / "stack.json").read_text())[
            "gateway_url"] == first.url  # the first one's, still
    finally:
        assert stop_stack(first) == 0


async def test_a_stop_that_comes_while_the_children_are_being_started_stops_them_all(tmp_path: Path) -> None:
    # A child whose start was under way when stop() signalled the others was never signalled: stop() waited on it
    # for ever.
    for yields in (1, 2, 3):
        stack = RunnerStack(StackOptions(data_dir=tmp_path / str(yields), gateway_port=0, nats_port=0,
                                         stop_grace_s=20))
        await stack.start()
        try:
            for _ in range(yields):
                await asyncio.sleep(0)
            await asyncio.wait_for(stack.stop(), 60)
            assert all(c.proc is None or c.proc.returncode is not None for c in stack.children), yields
        finally:  # what a stop that failed left
            for c in stack.children:
                if c.proc is not None and c.proc.returncode is None:
                    c.proc.kill()
            if stack.server is not None:
                stack.server.stop()


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
    (["--gateway-port", "70000"], "argument --gateway-port: '70000': a port number, 0 to 65535"),
    (["--nats-port", "-3"], "argument --nats-port: '-3': a port number, 0 to 65535"),
    (["--nats-url", "http://x:4222"], "argument --nats-url: 'http://x:4222': must start with nats://"),
])
def test_up_refuses_bad_arguments_before_starting_anything(tmp_path: Path, args: list[str], says: str) -> None:
    r = subprocess.run([sys.executable, "-m", "shared.cli", "up", *args, "--data-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not (tmp_path / "jetstream").exists()


@pytest.mark.parametrize(("url", "says"), [
    ("http://[::1", "is not a URL (Invalid port: ':1')"),  # a traceback
    ("http://127.0.0.1:99999", "give the gateway's address as http(s)://host[:port]"),  # a traceback too
    ("localhost:8080", "give the gateway's address as http(s)://host[:port]"),
])
@pytest.mark.parametrize("command", [["run", "hi"], ["status", "some-id"]])
def test_run_and_status_refuse_a_url_that_names_no_gateway(command: list[str], url: str, says: str) -> None:
    r = subprocess.run([sys.executable, "-m", "shared.cli", *command, "--url", url], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and f"argument --url: {url!r}" in r.stderr and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_up_takes_its_namespace_from_openclaw_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runner gave its children the namespace of --namespace, whose default "" replaced the variable's.
    monkeypatch.setenv("OPENCLAW_NAMESPACE", "team1")
    assert build_parser().parse_args(["up"]).namespace == "team1"
    assert build_parser().parse_args(["up", "--namespace", "other"]).namespace == "other"


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
        assert any("[database]" in line and "completed attempt 1" in line for line in s.stdout.splitlines())
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
    assert "is a gateway running there? `openclaw up` starts one" in gone.stderr


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


def test_a_service_whose_port_is_taken_says_what_to_set_and_exits_2() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "services.pm"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env=stack_env(OPENCLAW_PORT=str(port), OPENCLAW_HOST="127.0.0.1",
                                                     OPENCLAW_LOG_FORMAT="text"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"cannot serve HTTP on 127.0.0.1:{port}: Address already in use; set OPENCLAW_PORT" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_stream_replicas_a_single_server_cannot_keep_stop_a_service_saying_what_to_set(nats_url: str) -> None:
    # The server's refusal was a traceback and exit 1: restarted for ever, by the runner or by Kubernetes.
    r = subprocess.run([sys.executable, "-m", "services.pm"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=stack_env(OPENCLAW_NATS_URL=nats_url, OPENCLAW_STREAM_REPLICAS="3", OPENCLAW_PORT="0",
                                     OPENCLAW_NAMESPACE="r3" + os.urandom(4).hex(), OPENCLAW_LOG_FORMAT="text"))
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "OPENCLAW_STREAM_REPLICAS is 3, but the NATS server is not part of a cluster" in out
    assert "Traceback" not in out


def test_ctrl_c_while_the_stack_starts_is_an_interruption_not_a_failure(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens: the stack never gets ready
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up", "--nats-url", nowhere, "--gateway-port", "0",
         "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=stack_env(), start_new_session=True,
    )
    try:
        wait_until(lambda: "NATS" in log.read_text(), 60, "the services to try NATS")  # starting, not ready
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert code == 128 + signal.SIGINT, out[-3000:]
    assert "interrupted during start-up" in out and "ERROR" not in out, out[-3000:]
