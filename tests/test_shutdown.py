"""A rollout loses nothing: services told to stop (SIGTERM) finish or hand over what they hold.

The real stack (`openclaw up`); the runner starts a stopped service again, as a Deployment would.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.gateway.access import LOCAL_TENANT, Caller
from services.gateway.handlers import _execution_id
from tests.conftest import Stack, ready_on, wait_until, write_config
from tests.test_gateway import events
from tests.test_pools import _wait_running, get, ns, submit, task

pytestmark = pytest.mark.e2e


def follow(stack: Stack, eid: str, first: threading.Event) -> list[tuple[str, int]]:
    """An SSE client: (kind, id) of every event until the server ends the stream; ``first`` set at the first."""
    out: list[tuple[str, int]] = []
    kind = ""
    with httpx.stream("GET", f"{stack.url}/api/execution/{eid}/events", timeout=httpx.Timeout(10, read=30)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():  # a stream cut short raises here (httpx.RemoteProtocolError)
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("id:"):
                out.append((kind, int(line[3:].strip())))
                first.set()
    return out


def test_a_stopping_gateway_answers_its_waiting_client_and_ends_its_event_stream_cleanly(  # type: ignore[no-untyped-def]
        stack_factory) -> None:
    stack = stack_factory(ns())
    key = "shutdown-" + ns()
    eid = _execution_id(Caller(LOCAL_TENANT), key)
    body = {"message": "shutdown test", "tasks": [task("long", latency_s=4)], "wait": True, "timeout_s": 60}
    with ThreadPoolExecutor(2) as threads:
        waiting = threads.submit(httpx.post, f"{stack.url}/api/execute-parallel", json=body, timeout=90,
                                 headers={"Idempotency-Key": key})
        # Running: so the request is past its publish, in its wait (GET says 404 until the gateway stores it).
        wait_until(lambda: any(t["status"] == "running" for t in get(stack, eid).get("tasks", [])), 30, "running")
        first = threading.Event()
        stream = threads.submit(follow, stack, eid, first)
        assert first.wait(30), "no event on the stream"
        os.kill(stack.pid("gateway-1"), signal.SIGTERM)

        # The waiting client is answered at once, from the store, as when its wait runs out: 202, still running.
        r = waiting.result(timeout=30)
        assert r.status_code == 202, r.text
        assert (r.json()["execution_id"], r.json()["status"]) == (eid, "running")
        before = stream.result(timeout=30)  # ended, not cut: the client reconnects with Last-Event-ID

    assert before and before[-1][0] != "completed"
    wait_until(lambda: ready_on(int(stack.url.rsplit(":", 1)[1])), 30, "the gateway back")
    after = [(kind, int(ident or 0)) for kind, ident, _ in events(stack, eid, **{"Last-Event-ID": str(before[-1][1])})]
    ids = [i for _, i in before + after]
    assert ids == sorted(set(ids)), "an event twice or out of order across the reconnect"
    assert after[-1][0] == "completed"
    doc = get(stack, eid)
    assert doc["status"] == "completed"
    assert [a["n"] for a in doc["tasks"][0]["attempts"]] == [1]  # the gateway's restart touched nothing else


def test_a_stopping_pool_is_not_ready_and_finishes_its_running_task_within_its_grace(  # type: ignore[no-untyped-def]
        stack_factory, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.json", {"shutdown_grace_s": 30})
    stack = stack_factory(ns(), "--config", str(cfg))
    eid = submit(stack, [task("long", latency_s=3)])
    worker = _wait_running(stack, eid, "long")["worker"]
    port = int(stack.state()["children"]["codegen-1"]["port"])
    os.kill(stack.pid("codegen-1"), signal.SIGTERM)

    def stopping() -> dict[str, Any] | None:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 503 else None

    assert wait_until(stopping, 10, "readyz to report the drain")["reason"] == "stopping"
    doc = wait_until(lambda: (d := get(stack, eid))["status"] == "completed" and d, 30, "completion")
    (only,) = doc["tasks"][0]["attempts"]
    assert (only["n"], only["outcome"], only["worker"]) == (1, "completed", worker)
    assert doc["cost"]["total_usd"] == only["cost_usd"] > 0
