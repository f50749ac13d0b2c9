"""The whole stack through a NATS crash: the server is killed (SIGKILL) and started again on the same store."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from shared.natsserver import NatsServer
from tests.conftest import start_stack, stop_stack, wait_until

pytestmark = pytest.mark.e2e

PLAN = [{"id": pool, "pool": pool, "description": "x", "context": {"simulate": {"latency_s": 0}}}
        for pool in ("codegen", "security", "database")]


def test_executions_complete_again_after_nats_crashes_and_comes_back(tmp_path: Path) -> None:
    # A crashed server ends nobody's pull requests (one that shuts down sends 409s): every consumer loop has
    # to notice its request is gone. The gateway answers 503 until it is connected again.
    server = NatsServer(tmp_path / "store").start()
    stack = start_stack(server.url, "outage" + uuid.uuid4().hex[:8], tmp_path)
    url = f"{stack.url}/api/execute-parallel"
    try:
        before = httpx.post(url, json={"message": "m", "tasks": PLAN, "wait": True}, timeout=30)
        assert before.json()["status"] == "completed", before.text
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        server.start()
        answers: list[int] = []

        def completed() -> bool:
            r = httpx.post(url, json={"message": "m", "tasks": PLAN, "wait": True}, timeout=30)
            answers.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"] == "unavailable" and "not connected to NATS" in r.json()["message"]
                return False
            assert r.status_code == 200, r.text
            return bool(r.json()["status"] == "completed")

        started = time.monotonic()
        wait_until(completed, 60, "an execution completed after the crash")
        assert set(answers) <= {200, 503}, answers
        assert time.monotonic() - started < 30  # the consumers noticed within seconds, not at a timeout
    finally:
        code = stop_stack(stack)
        server.stop()
    assert code == 0, stack.output()[-3000:]
