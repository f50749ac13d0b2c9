"""The gateway as clients use it: event streams, cancel, idempotency, tenants, rate limits, chat routing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError

from services.gateway.handlers import KEEPALIVE_S
from shared.names import Names
from shared.schemas import Execution, now
from tests.conftest import Stack, stack_env, start_stack, stop_stack, until, wait_until, write_config

pytestmark = pytest.mark.e2e

ACME, GLOBEX = "acme-key-0123456789abcdef", "globex-key-0123456789abcdef"
INITECH = "initech-key-0123456789abcdef"  # only test_a_key_holds_a_limited_number_of_streams_and_waits_open uses it


@pytest.fixture(scope="module")
def stack(nats_url: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("gw")
    cfg = write_config(tmp / "c.json", {
        "ack_wait_s": 6,  # a cancel reaches a running task at its next heartbeat, every 2 s
        "worker_pools": {"database": {"max_concurrent": 1, "timeout": 60}},
        "gateway": {"rate_limit_per_minute": 60, "rate_limit_burst": 40, "max_open_per_key": 3},
    })
    s = start_stack(nats_url, "gw" + uuid.uuid4().hex[:8], tmp, "--config", str(cfg),
                    env=stack_env(OPENCLAW_API_KEYS=f"acme={ACME},globex={GLOBEX},initech={INITECH}"))
    yield s
    assert stop_stack(s) == 0, s.output()[-3000:]


def auth(key: str = ACME) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def task(i: str, pool: str, latency: float, *deps: str) -> dict[str, Any]:
    return {"id": i, "pool": pool, "description": f"task {i}", "depends_on": list(deps),
            "context": {"simulate": {"latency_s": latency}}}


def events(stack: Stack, eid: str, key: str = ACME, **headers: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    """The whole SSE stream of an execution, read until the server closes it."""
    out: list[tuple[str, str | None, dict[str, Any]]] = []
    event, ident, data = "message", None, []
    with httpx.stream("GET", f"{stack.url}/api/execution/{eid}/events", headers={**auth(key), **headers},
                      timeout=httpx.Timeout(10, read=30)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if data:
                    out.append((event, ident, json.loads("\n".join(data))))
                event, ident, data = "message", None, []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("id:"):
                ident = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
    return out


def test_a_late_client_gets_every_event_replayed_and_the_stream_closes(stack: Stack) -> None:
    # Another tenant's execution first: its events are in the same stream, before this one's.
    theirs = httpx.post(f"{stack.url}/api/execute-parallel", headers=auth(GLOBEX),
                        json={"message": "m", "tasks": [task("t", "database", 0)], "wait": True}, timeout=30)
    assert theirs.json()["status"] == "completed"
    plan = [task("api", "codegen", 0, ), task("ui", "codegen", 0, "api"),
            {**task("flaky", "security", 0), "context": {"simulate": {"latency_s": 0, "fail_attempts": 1}}}]
    r = httpx.post(f"{stack.url}/api/execute-parallel", headers=auth(),
                   json={"message": "m", "tasks": plan, "wait": True}, timeout=30)
    eid = r.json()["execution_id"]
    got = events(stack, eid)  # connects after the end: all of it is replayed, then the stream closes
    kinds = [k for k, _, _ in got]
    assert kinds[0] == "planned" and kinds[-1] == "completed"
    per_task = {t: [k for k, _, b in got if b.get("task_id") == t and k != "cost"] for t in ("api", "ui", "flaky")}
    assert per_task["api"] == ["started", "task_completed"]
    assert per_task["ui"] == ["released", "started", "task_completed"]
    assert per_task["flaky"] == ["started", "retrying", "started", "task_completed"]
    retry = next(b for k, _, b in got if k == "retrying")
    assert retry["attempt"] == 1 and retry["data"]["strategy"] == "retry"
    assert got[-1][2]["execution"]["status"] == "completed"
    ids = [int(i) for _, i, _ in got if i]
    # Ids count the execution's own events: other executions' (other tenants') events in the shared stream, before and
    # during this one, leave no gaps to count them by.
    assert ids == list(range(1, len(got) + 1))

    # Resuming after an event id replays only what came after it.
    resumed = events(stack, eid, **{"Last-Event-ID": str(ids[2])})
    assert [i for _, i, _ in resumed] == [str(i) for i in ids[3:]]
    # After the final event itself: the stored state says how it ended, at once (not after a keep-alive's 15 s).
    began = time.monotonic()
    [(kind, _, body)] = events(stack, eid, **{"Last-Event-ID": str(ids[-1])})
    assert kind == "completed" and body["execution"]["status"] == "completed"
    assert time.monotonic() - began < KEEPALIVE_S / 2
    # An id that is not one of ours replays everything, as none would.
    assert events(stack, eid, **{"Last-Event-ID": b"\xb2"}) == got  # type: ignore[arg-type]
    assert events(stack, eid, **{"Last-Event-ID": str(2**64 - 1)}) == got  # longer than any of ours
    assert events(stack, eid, **{"Last-Event-ID": "9" * 5000}) == got  # longer than int() takes
    # One past the last: there is nothing after it, and the stored state says how it ended.
    assert [k for k, _, _ in events(stack, eid, **{"Last-Event-ID": str(len(got) + 1)})] == ["completed"]


def test_a_client_resuming_past_the_end_of_a_running_execution_is_told_as_it_ends(stack: Stack) -> None:
    # Every event up to the id given was skipped, the final one too: the stream stayed open until a keep-alive
    # found the execution over (15 s).
    r = httpx.post(f"{stack.url}/api/execute-parallel", headers=auth(),
                   json={"message": "m", "tasks": [task("api", "codegen", 1)]}, timeout=30)
    eid = r.json()["execution_id"]
    [(kind, ident, body)] = events(stack, eid, **{"Last-Event-ID": "1000"})
    ended = datetime.fromisoformat(body["execution"]["finished_at"])
    assert kind == "completed" and ident is None and body["execution"]["status"] == "completed"
    assert (now() - ended).total_seconds() < KEEPALIVE_S / 2


def test_a_waited_for_answer_is_the_document_byte_for_byte_as_get_serves_it(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}/api/execute-parallel", headers=auth(),
                   json={"message": "m", "tasks": [task("api", "codegen", 0), task("ui", "codegen", 0, "api")],
                         "wait": True}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["status"] == "completed" and doc["final_response"] and "error" in doc  # nulls included
    got = httpx.get(f"{stack.url}/api/execution/{doc['execution_id']}", headers=auth(), timeout=10)
    assert got.status_code == 200 and r.content == got.content
    # Both are the stored document, which is exactly how the response model serialises it.
    assert Execution.model_validate_json(got.content).model_dump_json().encode() == got.content


async def test_a_waiting_client_gets_the_version_stored_and_never_one_that_lost_its_compare_and_set(
    stack: Stack,
) -> None:
    """The gateway answers from the versions the bucket republishes once stored: no final event, no read.

    The execution is ended here by a write of the test's own while its only task still runs, so nothing
    announces the ending; before it, a "completed" version loses its compare-and-set. The waiting client gets
    the "cancelled" version, byte for byte, long before its wait would run out.
    """
    nc = await nats.connect(str(stack.state()["nats_url"]))
    kv = await nc.jetstream().key_value(stack.names.kv_bucket)
    message = f"answered from the store {uuid.uuid4().hex}"
    versions: asyncio.Queue[Execution] = asyncio.Queue()

    async def republished(msg: Msg) -> None:
        if message.encode() in msg.data:
            versions.put_nowait(Execution.model_validate_json(msg.data))

    await nc.subscribe(stack.names.document("*"), cb=republished)
    try:
        async with httpx.AsyncClient(base_url=stack.url, headers=auth(), timeout=120) as client:
            waiting = asyncio.create_task(client.post("/api/execute-parallel", json={
                "message": message, "tasks": [task("slow", "security", 5)], "wait": True, "timeout_s": 100}))
            while (planned := await asyncio.wait_for(versions.get(), 30)).status != "running":
                pass  # once planned, the request is out: the gateway subscribed before sending it
            eid = planned.execution_id

            def ended(stored: bytes, status: str) -> bytes:
                ex = Execution.model_validate_json(stored)
                ex.status, ex.error, ex.finished_at = status, f"{status} by the test", now()  # type: ignore[assignment]
                return ex.model_dump_json().encode()

            entry = await kv.get(eid)
            with pytest.raises(KeyWrongLastSequenceError):
                await kv.update(eid, ended(entry.value, "completed"), last=entry.revision + 1000)
            while True:
                entry = await kv.get(eid)
                try:
                    await kv.update(eid, stored := ended(entry.value, "cancelled"), last=entry.revision)
                    break
                except KeyWrongLastSequenceError:
                    pass  # the worker's start was stored in between: write on that version
            r = await asyncio.wait_for(waiting, 20)
        assert r.status_code == 200 and r.content == stored
        assert r.json()["status"] == "cancelled" and r.json()["tasks"][0]["status"] != "completed"
    finally:
        await nc.drain()


def test_a_live_client_sees_events_as_they_happen(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}/api/execute-parallel", headers=auth(),
                   json={"message": "m", "tasks": [task("slow", "security", 1.0)]}, timeout=30)
    assert r.status_code == 202
    got = events(stack, r.json()["execution_id"])
    assert [k for k, _, _ in got if k != "cost"] == ["planned", "started", "task_completed", "completed"]


async def test_a_resumed_stream_sends_nothing_the_client_had_even_when_nats_loses_its_consumer(stack: Stack) -> None:
    # nats-py makes a lost ordered consumer (a NATS restart, a deleted consumer) again from the last message it
    # delivered: before the resume point when nothing came since, so what the client had would come again.
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{stack.url}/api/execute-parallel", headers=auth(),
                              json={"message": "m", "tasks": [task("slow", "security", 60)]})
    eid, names = r.json()["execution_id"], stack.names
    nc = await nats.connect(str(stack.state()["nats_url"]))
    js = nc.jetstream()
    try:
        async def started() -> int:
            """The id of the task's start event, as a client reading the stream up to it has it."""
            async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=60)) as client, client.stream(
                    "GET", f"{stack.url}/api/execution/{eid}/events", headers=auth()) as stream:
                kind, ident = "", 0
                async for line in stream.aiter_lines():
                    if line.startswith("id:"):
                        ident = int(line[3:])
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
                    elif not line and kind == "started":  # the end of that event
                        return ident
            raise AssertionError("the stream ended before the task started")

        resume = await asyncio.wait_for(started(), 30)

        async def consumers() -> set[str]:
            return {c.name for c in await js.consumers_info(names.events_stream)
                    if c.config.filter_subject == names.events(eid, "*")}

        got: list[tuple[str, int]] = []

        async def follow() -> None:
            async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=60)) as client, client.stream(
                    "GET", f"{stack.url}/api/execution/{eid}/events",
                    headers={**auth(), "Last-Event-ID": str(resume)}) as stream:
                kind = ""
                async for line in stream.aiter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("id:"):
                        got.append((kind, int(line[3:])))

        following = asyncio.ensure_future(follow())
        lost = await until(consumers, 10, "the stream's consumer")
        for name in lost:
            await js.delete_consumer(names.events_stream, name)

        async def made_again() -> bool:
            return bool((now := await consumers()) and not now & lost)

        await until(made_again, 30, "the client to make the consumer again")
        async with httpx.AsyncClient(timeout=30) as client:
            cancelled = await client.delete(f"{stack.url}/api/execution/{eid}", headers=auth())
        assert cancelled.status_code == 200, cancelled.text
        await asyncio.wait_for(following, 30)  # the stream closes with the final event
    finally:
        await nc.close()
    assert got and got[-1][0] == "completed"
    assert min(seq for _, seq in got) > resume, got  # nothing the client had, nothing twice


async def test_a_waiting_request_stops_waiting_once_its_client_has_gone(stack: Stack) -> None:
    body = {"message": "m", "tasks": [task("slow", "codegen", 60)], "timeout_s": 300}
    key = {**auth(), "Idempotency-Key": uuid.uuid4().hex}

    def posts() -> float:  # POSTs the gateway has answered (counted once the handler returns)
        return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{stack.url}/metrics").text.splitlines()
                   if line.startswith("openclaw_http_requests_total{")
                   and 'route="/api/execute-parallel"' in line and 'method="POST"' in line)

    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        eid = (await client.post("/api/execute-parallel", headers=key, json=body)).json()["execution_id"]
        answered = posts()
        async with httpx.AsyncClient(base_url=stack.url, timeout=httpx.Timeout(10, read=1)) as impatient:
            with pytest.raises(httpx.ReadTimeout):  # the same execution, waited for; the client gives up
                await impatient.post("/api/execute-parallel", headers=key, json={**body, "wait": True})
        await until(lambda: posts() > answered, 10, "the waiting request to end", interval=0.1)
        doc = (await client.get(f"/api/execution/{eid}", headers=auth())).json()
        assert doc["status"] == "running"  # it ended because its client went, not because the execution did
        assert (await client.delete(f"/api/execution/{eid}", headers=auth())).status_code == 200


def test_cancel_stops_queued_and_running_tasks_and_keeps_the_cost_so_far(stack: Stack) -> None:
    plan = [task("quick", "codegen", 0), task("long", "codegen", 30), task("after", "codegen", 0, "long"),
            task("busy", "database", 30), task("waiting", "database", 0)]  # database runs one at a time
    r = httpx.post(f"{stack.url}/api/execute-parallel", headers=auth(), json={"message": "m", "tasks": plan},
                   timeout=30)
    eid = r.json()["execution_id"]

    def state() -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(f"{stack.url}/api/execution/{eid}", headers=auth()).json()
        return doc

    def status_of(doc: dict[str, Any]) -> dict[str, str]:
        return {t["id"]: t["status"] for t in doc["tasks"]}

    wait_until(lambda: (s := status_of(state()))["long"] == "running" and s["busy"] == "running"
               and s["quick"] == "completed", 30, "long and busy running, quick done")
    c = httpx.delete(f"{stack.url}/api/execution/{eid}", headers=auth(), timeout=30)
    assert c.status_code == 200, c.text
    doc = c.json()
    assert doc["status"] == "cancelled" and "cancelled" in doc["final_response"].lower()
    tasks = {t["id"]: t for t in doc["tasks"]}
    assert tasks["quick"]["status"] == "completed"
    for tid in ("long", "after", "busy", "waiting"):
        assert tasks[tid]["status"] == "cancelled", tid
    assert [a["outcome"] for a in tasks["long"]["attempts"]] == ["lost"]
    assert doc["cost"]["total_usd"] == pytest.approx(tasks["quick"]["cost_usd"])  # spent so far, nothing more

    # The running tasks are abandoned at their next heartbeat and the queued one never starts: the
    # work queue drains with no attempt added to any task.
    async def drained() -> int:
        nc = await nats.connect(str(stack.state()["nats_url"]))
        info = await nc.jetstream().stream_info(stack.names.tasks_stream)
        await nc.close()
        return int(info.state.messages)

    wait_until(lambda: asyncio.run(drained()) == 0, 30, "the task queue to drain")
    after = {t["id"]: t for t in state()["tasks"]}
    assert after["waiting"]["attempts"] == [] and after["after"]["attempts"] == []
    assert [a["outcome"] for a in after["busy"]["attempts"]] == ["lost"]
    metrics = "".join(httpx.get(f"http://127.0.0.1:{c['port']}/metrics").text
                      for n, c in stack.state()["children"].items() if n.startswith(("codegen", "database")))  # type: ignore[union-attr]
    assert 'outcome="abandoned"' in metrics
    # "waiting" was delivered after the cancel, to a worker following the executions' endings: not started.
    def lines() -> list[str]:
        return [line for line in stack.output().splitlines() if f"execution_id={eid} task_id=waiting" in line]

    wait_until(lambda: any("not started: its execution has ended" in line for line in lines()), 10,
               "the worker's log line (written after its ack)")
    assert not any("task started" in line for line in lines()), lines()

    again = httpx.delete(f"{stack.url}/api/execution/{eid}", headers=auth())
    assert again.status_code == 409 and "already cancelled" in again.json()["message"]
    assert httpx.delete(f"{stack.url}/api/execution/{uuid.uuid4().hex}", headers=auth()).status_code == 404


def test_the_same_idempotency_key_and_body_return_the_same_execution(stack: Stack) -> None:
    key = {"Idempotency-Key": "order-" + uuid.uuid4().hex}
    body = {"message": "m", "tasks": [{**task("one", "security", 0), "context": {"env": "prod", "simulate": {}}}],
            "wait": True}
    first = httpx.post(f"{stack.url}/api/execute-parallel", headers={**auth(), **key}, json=body, timeout=30)
    second = httpx.post(f"{stack.url}/api/execute-parallel", headers={**auth(), **key}, json=body, timeout=30)
    assert first.status_code == second.status_code == 200
    assert first.json()["execution_id"] == second.json()["execution_id"]
    assert len(second.json()["tasks"][0]["attempts"]) == 1  # it ran once
    # The same request with the keys of its free-form objects in another order is the same request.
    spec = body["tasks"][0]  # type: ignore[index]
    reordered = {**body, "tasks": [{**spec, "context": dict(reversed(spec["context"].items()))}]}
    third = httpx.post(f"{stack.url}/api/execute-parallel", headers={**auth(), **key}, json=reordered, timeout=30)
    assert third.status_code == 200 and third.json()["execution_id"] == first.json()["execution_id"]
    other = httpx.post(f"{stack.url}/api/execute-parallel", headers={**auth(), **key},
                       json={**body, "message": "different"}, timeout=30)
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"
    # The key is the tenant's own: another tenant using the same key gets its own execution.
    theirs = httpx.post(f"{stack.url}/api/execute-parallel", headers={**auth(GLOBEX), **key}, json=body, timeout=30)
    assert theirs.status_code == 200 and theirs.json()["execution_id"] != first.json()["execution_id"]


def test_keys_tenants_and_rate_limits(stack: Stack) -> None:
    body = {"message": "m", "tasks": [task("t", "codegen", 0)], "wait": True}
    missing = httpx.post(f"{stack.url}/api/execute-parallel", json=body)
    assert missing.status_code == 401 and "missing API key" in missing.json()["message"]
    assert missing.headers["www-authenticate"] == "Bearer"
    # What is wrong with the header is named; what it carries (a key without its scheme, say) is never repeated.
    for header, why in ((f"Basic {ACME}", "the Authorization header's scheme is 'Basic', not Bearer"),
                        (ACME, "the Authorization header does not start with 'Bearer '"),
                        (f"{ACME} extra", "the Authorization header does not start with 'Bearer '"),
                        (f"Bearer\t{ACME}", "the Authorization header does not start with 'Bearer '"),
                        ("Bearer", "the Authorization header has no key after 'Bearer'")):
        r = httpx.post(f"{stack.url}/api/execute-parallel", headers={"Authorization": header}, json=body)
        assert r.status_code == 401 and r.json()["message"] == (
            f"missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' ({why})"), header
        assert ACME[:8] not in r.text
    wrong = httpx.post(f"{stack.url}/api/execute-parallel", headers=auth("nope-" * 5), json=body)
    assert wrong.status_code == 401 and wrong.json()["message"] == "invalid API key"
    # The key comes first even when the body does not decode: a caller without one learns nothing about it.
    for content, why in ((b'{"message": ', "Expecting value"), (b'{"message": "caf\xe9"}', "(0xe9): invalid"),
                         (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                         (b'{"message": "m", "timeout_s": ' + b"9" * 5000 + b"}", "Exceeds the limit (4300 digits)")):
        for headers, code in (({}, 401), (auth("nope-" * 5), 401), (auth(), 422)):
            r = httpx.post(f"{stack.url}/api/chat", content=content,
                           headers={"Content-Type": "application/json", **headers})
            assert r.status_code == code, (content, headers, r.text)
        assert r.json()["errors"][0]["field"] == "body" and why in r.json()["message"]  # says what is wrong
        assert "sys." not in r.json()["message"]  # not Python's advice on raising its own limit

    eid = httpx.post(f"{stack.url}/api/execute-parallel", headers={"X-API-Key": ACME}, json=body,
                     timeout=30).json()["execution_id"]
    assert httpx.get(f"{stack.url}/api/execution/{eid}", headers=auth()).status_code == 200
    for method, path in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
        r = httpx.request(method, f"{stack.url}/api/execution/{eid}{path}", headers=auth(GLOBEX))
        assert r.status_code == 404, (method, path)  # another tenant's execution does not exist for globex

    # globex: a burst of 40, then 1 a second; the burst runs out well within 60 quick calls.
    calls = [httpx.get(f"{stack.url}/api/execution/{eid}", headers=auth(GLOBEX)) for _ in range(60)]
    assert {c.status_code for c in calls} == {404, 429}
    limited = next(c for c in calls if c.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert "rate limit of 60/min" in limited.json()["message"]
    assert httpx.get(f"{stack.url}/api/execution/{eid}", headers=auth()).status_code == 200  # per key


async def test_a_key_holds_a_limited_number_of_streams_and_waits_open(stack: Stack) -> None:
    slow = {"message": "m", "tasks": [task("slow", "codegen", 60)]}
    quick = {"message": "m", "tasks": [task("quick", "codegen", 0)]}

    def held_open() -> float:
        line = next(x for x in httpx.get(f"{stack.url}/metrics").text.splitlines()
                    if x.startswith("openclaw_http_open_requests "))
        return float(line.rsplit(" ", 1)[1])

    async with httpx.AsyncClient(base_url=stack.url, timeout=httpx.Timeout(10, read=60)) as client:
        eid = (await client.post("/api/execute-parallel", headers=auth(INITECH), json=slow)).json()["execution_id"]
        idem = {**auth(INITECH), "Idempotency-Key": uuid.uuid4().hex}
        async with contextlib.AsyncExitStack() as streams:
            opened = [await streams.enter_async_context(
                client.stream("GET", f"/api/execution/{eid}/events", headers=auth(INITECH))) for _ in range(3)]
            assert [r.status_code for r in opened] == [200] * 3
            assert held_open() == 3
            # A fourth stream, a wait and a waiting cancel are refused, saying why; the wait stored nothing.
            refused = [await client.get(f"/api/execution/{eid}/events", headers=auth(INITECH)),
                       await client.post("/api/execute-parallel", headers=idem, json={**quick, "wait": True}),
                       await client.post("/api/chat", headers=auth(INITECH), json={"message": "hi", "wait": True}),
                       await client.delete(f"/api/execution/{eid}", headers=auth(INITECH))]
            assert [r.status_code for r in refused] == [429] * 4
            assert all("gateway.max_open_per_key" in r.json()["message"] for r in refused)
            # What does not wait is not counted, and another key has a limit of its own.
            assert (await client.post("/api/execute-parallel", headers=auth(INITECH), json=quick)).status_code == 202
            done = await client.post("/api/execute-parallel", headers=auth(), json={**quick, "wait": True})
            assert done.status_code == 200 and held_open() == 3
            # A client that goes away gives its place back.
            await opened.pop().aclose()
            await until(lambda: held_open() == 2, 10, "the closed stream's place to be given back")
            opened.append(await streams.enter_async_context(
                client.stream("GET", f"/api/execution/{eid}/events", headers=auth(INITECH))))
            assert opened[-1].status_code == 200
            assert (await client.delete(f"/api/execution/{eid}?wait_s=0", headers=auth(INITECH))).status_code == 202
            # The cancel ends the execution, its final event closes every stream, and each gives its place back.
            for r in opened:
                assert [line async for line in r.aiter_lines() if line.startswith("event:")][-1] == "event: completed"
        await until(lambda: held_open() == 0, 10, "the streams to be given back")
        again = await client.post("/api/execute-parallel", headers=idem, json={**quick, "message": "n", "wait": True})
        assert again.status_code == 200, again.text  # not 422: the refused request with this key stored nothing


def test_chat_routes_between_one_specialist_and_parallel_execution(stack: Stack) -> None:
    one = httpx.post(f"{stack.url}/api/chat", headers=auth(),
                     json={"message": "Design the PostgreSQL schema for invoices"}, timeout=60)
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["routing"]["parallel"] is False and body["mode"] == "serial"
    assert body["routing"]["reason"].startswith("one specialist suffices: database")
    assert body["routing"]["decision_ms"] < 100
    doc = httpx.get(f"{stack.url}/api/execution/{body['execution_id']}", headers=auth()).json()
    assert [(t["pool"], t["status"]) for t in doc["tasks"]] == [("database", "completed")]
    assert body["response"] == doc["final_response"] and doc["routing"] == body["routing"]

    many = httpx.post(f"{stack.url}/api/chat", headers=auth(),
                      json={"message": "Build a restaurant website with online ordering"}, timeout=60).json()
    assert many["routing"]["parallel"] is True and many["mode"] == "parallel" and many["status"] == "completed"
    doc = httpx.get(f"{stack.url}/api/execution/{many['execution_id']}", headers=auth()).json()
    assert len({t["pool"] for t in doc["tasks"]}) == 3

    forced = httpx.post(f"{stack.url}/api/chat", headers=auth(),
                        json={"message": "Design the schema", "force_parallel": True, "wait": False}, timeout=60)
    assert forced.status_code == 202 and forced.json()["routing"]["reason"] == "force_parallel"


def test_chat_stays_serial_when_parallel_execution_is_disabled(nats_url: str, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.json", {"enabled": False})
    s = start_stack(nats_url, "gwoff" + uuid.uuid4().hex[:6], tmp_path, "--config", str(cfg))
    try:
        r = httpx.post(f"{s.url}/api/chat", json={"message": "Build a restaurant website"}, timeout=60).json()
        assert r["routing"]["parallel"] is False and "disabled" in r["routing"]["reason"]
        assert r["mode"] == "serial" and r["status"] == "completed"
        # The explicit endpoint still answers, one task at a time.
        tasks = [{"id": i, "pool": p, "description": i, "context": {"simulate": {"latency_s": 0.2}}}
                 for i, p in (("api", "codegen"), ("audit", "security"))]
        doc = httpx.post(f"{s.url}/api/execute-parallel", json={"message": "m", "tasks": tasks, "wait": True},
                         timeout=60).json()
        assert doc["mode"] == "serial" and doc["status"] == "completed"
        api, audit = ([datetime.fromisoformat(a[k]) for k in ("started_at", "finished_at")]
                      for a in (t["attempts"][0] for t in doc["tasks"]))
        assert audit[0] >= api[1]
    finally:
        assert stop_stack(s) == 0


async def test_a_wait_cancelled_with_its_request_takes_its_nats_request_with_it(nc: NATS, names: Names,
                                                                                tmp_path: Path) -> None:
    # An event stream's generator is cancelled when its client goes; the subscription's pending next_msg used to
    # live on until its timeout and end as "Task exception was never retrieved" in the gateway's log.
    from services.gateway.handlers import _next
    from tests.conftest import service_runtime

    rt = await service_runtime(nc, names, tmp_path, service="gateway")
    sub = await nc.subscribe(f"{names.namespace}.nothing")
    waiting = asyncio.create_task(_next(rt, sub, 60))
    await until(lambda: any(_waits_for_next_msg(t) for t in asyncio.all_tasks()), 5, "the wait to start")
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    left = [t for t in asyncio.all_tasks() if _waits_for_next_msg(t)]
    assert all(t.done() or t.cancelling() for t in left), left
    await sub.unsubscribe()


def _waits_for_next_msg(task: asyncio.Task[Any]) -> bool:
    return getattr(task.get_coro(), "__qualname__", "").endswith("next_msg") and not task.done()
