"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from services.gateway.access import LOCAL_TENANT, Caller
from services.gateway.handlers import _execution_id
from shared.execution import apply_plan, new_execution
from shared.natsserver import NatsServer, binary, free_port
from shared.schemas import DeadLetter, ExecutionPlanned, ExecutionRequested, RunTask, TaskSpec, now
from tests.conftest import ROOT, Stack, scrape, start_stack, stop_stack, until, wait_until, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(nats_url: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("bad")
    config = write_config(tmp / "config.json", {"max_tasks_per_execution": 3, "gateway": {"max_body_bytes": 4096}})
    s = start_stack(nats_url, "bad" + uuid.uuid4().hex[:8], tmp, "--config", str(config))
    yield s
    assert stop_stack(s) == 0, s.output()[-3000:]


def post(stack: Stack, body: object) -> httpx.Response:
    return httpx.post(f"{stack.url}/api/execute-parallel", json=body, timeout=30)


@pytest.mark.parametrize("body", [{}, {"message": ""}, {"message": "   "}, {"message": "\x1f \x1c"}])
def test_missing_or_empty_message_is_422_naming_the_field(stack: Stack, body: dict[str, str]) -> None:
    r = post(stack, body)
    assert r.status_code == 422
    err = r.json()
    assert err["error"] == "invalid_request"
    assert [e["field"] for e in err["errors"]] == ["message"]
    assert err["message"].startswith("message: ")
    if "message" in body:
        assert err["errors"][0]["message"] == "must not be empty or only whitespace", err


@pytest.mark.parametrize(("field", "value"), [("wait", "yes"), ("wait", 1), ("force_parallel", "off"),
                                            ("timeout_s", "5")])
def test_a_flag_or_a_number_sent_as_something_else_is_422_not_guessed_at(stack: Stack, field: str,
                                                                        value: object) -> None:
    r = post(stack, {"message": "x", field: value})
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == [field], r.text


def test_unknown_field_is_named(stack: Stack) -> None:
    r = post(stack, {"message": "x", "fast": True})
    assert r.status_code == 422 and r.json()["errors"] == [
        {"field": "fast", "message": "Extra inputs are not permitted"}
    ]


def test_both_spellings_of_the_session_key_are_refused_as_one_field_sent_twice(stack: Stack) -> None:
    r = post(stack, {"message": "x", "sessionKey": "a", "session_key": "b"})
    assert r.status_code == 422 and r.json()["errors"] == [
        {"field": "body", "message": "sessionKey and session_key name the same field: send one of the two"}], r.text


def test_malformed_json_is_422_saying_where_and_why(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}/api/execute-parallel", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"] == [
        {"field": "body", "message": "not valid JSON (at character 1): Expecting property name enclosed in double "
                                     "quotes"}]
    # JSON the parser gives up on was a 400 that said only "There was an error parsing the body".
    r = httpx.post(f"{stack.url}/api/execute-parallel", content=b'{"message": ' + b"[" * 1900 + b"]" * 1900 + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"] == [
        {"field": "body", "message": "not valid JSON: nested too deeply"}], r.text


def test_json_sent_as_something_else_is_422_saying_which_content_type_to_send(stack: Stack) -> None:
    # curl -d without -H sends application/x-www-form-urlencoded: FastAPI then does not read the body as JSON.
    for ctype, sent in (("application/x-www-form-urlencoded", "not application/x-www-form-urlencoded"),
                        ("text/json; charset=utf-8", "not text/json"), (None, "the request has none")):
        r = httpx.post(f"{stack.url}/api/execute-parallel", content=b'{"message": "m"}',
                       headers={"content-type": ctype} if ctype else {})
        assert r.status_code == 422 and r.json()["errors"] == [{"field": "body", "message": (
            f"send a JSON object with Content-Type: application/json ({sent})")}], r.text


def test_an_empty_idempotency_key_is_422_not_a_key_every_such_client_shares(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}/api/execute-parallel", json={"message": "m"}, headers={"Idempotency-Key": ""})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "Idempotency-Key", r.text


def test_body_over_the_configured_size_is_413(stack: Stack) -> None:
    r = post(stack, {"message": "x" * 5000})
    assert r.status_code == 413
    assert "4096 bytes" in r.json()["message"]


def test_streamed_body_over_the_size_is_413(stack: Stack) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"message": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(f"{stack.url}/api/execute-parallel", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_request_too_large_for_its_execution_to_fit_in_a_message_is_413_and_stores_nothing(  # type: ignore[no-untyped-def]
        stack_factory, tmp_path: Path) -> None:
    # The body limit raised past the broker's: the request would be stored, then fail to publish (a 500 and an
    # execution stuck "queued"), or run and leave a document no write could store.
    config = write_config(tmp_path / "c.json", {"gateway": {"max_body_bytes": 2 * 1024 * 1024}})
    big = stack_factory("big" + uuid.uuid4().hex[:8], "--config", str(config))
    key = "big-" + uuid.uuid4().hex
    task = {"id": "a", "pool": "database", "description": "db", "context": {"blob": "b" * 300_000}}
    r = httpx.post(f"{big.url}/api/execute-parallel", json={"message": "m", "tasks": [task]}, timeout=30,
                   headers={"Idempotency-Key": key})
    assert r.status_code == 413, r.text
    assert "max_payload, 1048576" in r.json()["message"] and "or less context" in r.json()["message"]
    eid = _execution_id(Caller(LOCAL_TENANT), key)
    assert httpx.get(f"{big.url}/api/execution/{eid}", timeout=10).status_code == 404
    task["context"] = {"blob": "b" * 200_000}  # within a quarter: it runs
    ok = httpx.post(f"{big.url}/api/execute-parallel", json={"message": "m", "tasks": [task], "wait": True}, timeout=60)
    assert ok.status_code == 200 and ok.json()["status"] == "completed", ok.text


def test_unknown_execution_is_404(stack: Stack) -> None:
    for eid in (uuid.uuid4().hex, "no.such*id"):
        r = httpx.get(f"{stack.url}/api/execution/{eid}")
        assert r.status_code == 404
        assert r.json()["error"] == "not_found" and eid in r.json()["message"]


@pytest.mark.parametrize(
    ("tasks", "field", "says"),
    [
        ([{"id": "a", "pool": "codegen", "description": "x", "depends_on": ["b"]},
          {"id": "b", "pool": "codegen", "description": "y", "depends_on": ["a"]}], "tasks", "cycle: a -> b -> a"),
        ([{"id": "a", "pool": "frontend", "description": "x"}], "tasks[0].pool", "'codegen', 'security' or 'database'"),
        ([{"id": "a", "pool": "codegen", "description": "x", "depends_on": ["zz"]}], "tasks", "unknown task(s): zz"),
        ([{"id": "a", "pool": "codegen", "description": "x"}] * 2, "tasks", "duplicate task id(s): a"),
        ([{"id": f"t{i}", "pool": "codegen", "description": "x"} for i in range(4)], "tasks", "at most 3"),
        ([], "tasks", "no tasks"),
        # Upstream outputs are added when a task is released; a client's would be taken for them.
        ([{"id": "a", "pool": "codegen", "description": "x", "context": {"upstream": {"b": {}}}}], "tasks",
         "context.upstream is reserved"),
        ([{"id": "a", "pool": "codegen", "description": "x", "context": {"upstream": [1, 2]}}], "tasks[0].context",
         "context.upstream must map task ids to their outputs"),
        ([{"id": "a", "pool": "codegen", "description": "x", "context": {"simulate": {"bogus": 1}}}],
         "tasks[0].context", "context.simulate: bogus: Extra inputs are not permitted"),
        ([{"id": "a", "pool": "codegen", "description": " \t "}], "tasks[0].description",
         "must not be empty or only whitespace"),
        ([{"id": "a", "pool": "codegen", "description": "x", "priority": "high"}], "tasks[0].priority",
         "Extra inputs are not permitted"),
        # Deeper than the services' own parsers go: a 500 at 256 levels, and from 200 a request the PM dead-lettered.
        ([{"id": "a", "pool": "codegen", "description": "x", "context": {"k": json.loads("[" * 200 + "]" * 200)}}],
         "tasks[0].context", "nested deeper than 32 levels"),
    ],
)
def test_invalid_plan_is_422_saying_which(stack: Stack, tasks: list[object], field: str, says: str) -> None:
    r = post(stack, {"message": "plan", "tasks": tasks})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["errors"][0]["field"] == field
    assert says in err["message"], err["message"]
    assert "Value error" not in err["message"]  # pydantic's word for a validator's own message, not the client's


def test_a_field_a_newer_version_adds_to_a_task_is_ignored_where_services_read_it() -> None:
    # A pool of the version before (a rolling upgrade, a rollback) dead-lettered every such task, and its execution
    # waited for its deadline. A client's or the model's plan still refuses it (above).
    sent = RunTask(execution_id="e1", task=TaskSpec(id="a", pool="codegen", description="x"), deadline_at=now())
    wire = json.loads(sent.to_bytes())
    wire["task"]["priority"] = "high"
    assert RunTask.model_validate_json(json.dumps(wire)) == sent  # what the pool's consumer decodes with
    planned = {"kind": "execution.planned", "execution_id": "e1", "planner": "llm", "tasks": [wire["task"]]}
    assert ExecutionPlanned.model_validate(planned).tasks == [sent.task]


async def test_garbage_on_a_task_subject_is_dead_lettered_and_the_pool_keeps_serving(stack: Stack) -> None:
    names = stack.names
    nc = NATS()
    await nc.connect(stack.state()["nats_url"])  # type: ignore[arg-type]
    js = nc.jetstream()
    try:
        dlq = await js.subscribe(names.dlq(names.tasks_stream, "codegen", "*"), deliver_policy=DeliverPolicy.ALL,
                                 ordered_consumer=True)
        ack = await js.publish(names.tasks("codegen"), b"\x00\xffnot a task")
        await js.publish(names.tasks("codegen"), b'{"kind": "task.run", "execution_id": "x"}')
        await js.publish(names.tasks("codegen"), b"\\" * 900_000)  # twice as long once quoted in the letter
        letters = [DeadLetter.model_validate_json((await dlq.next_msg(timeout=20)).data) for _ in range(3)]

        async def advisories_handled() -> bool:  # the server's termination advisories, by the aggregator
            info = await js.consumer_info(names.advisories_stream, names.dead_letters_consumer)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await until(advisories_handled, 20, "the aggregator to handle the termination advisories")
    finally:
        await nc.drain()
    first, second, third = letters
    # Each one dead letter, counted once: by the pool that terminated it, not again for the server's advisory.
    async with httpx.AsyncClient(timeout=5) as client:
        scraped = [(await client.get(f"http://127.0.0.1:{c['port']}/metrics")).text  # type: ignore[index]
                   for c in stack.state()["children"].values()]  # type: ignore[union-attr]
    counted = [float(line.rsplit(" ", 1)[1]) for text in scraped for line in text.splitlines()
               if line.startswith("openclaw_dead_letters_total{") and f'stream="{names.tasks_stream}"' in line]
    assert sum(counted) == 3, counted
    assert first.stream_seq == ack.seq and first.subject == names.tasks("codegen")
    assert "does not validate" in first.reason and "\ufffd" in first.payload
    assert "task: Field required" in second.reason and "deadline_at: Field required" in second.reason
    assert third.payload.startswith("\\" * 1000) and "characters cut: a dead letter may take" in third.payload

    # The same service still runs real work afterwards.
    plan = [{"id": "after", "pool": "codegen", "description": "still alive", "context": {"simulate": {"latency_s": 0}}}]
    r = await asyncio.to_thread(post, stack, {"message": "after garbage", "tasks": plan, "wait": True})
    assert r.json()["status"] == "completed"
    assert r.json()["tasks"][0]["worker"] == "codegen-1"


async def sent_until_ended(stack: Stack, eids: list[str],
                           send: Callable[[JetStreamContext], Awaitable[None]]) -> dict[str, dict[str, Any]]:
    """``send`` straight to the stack's NATS (not through the gateway), wait for each of ``eids`` to end (its final
    event), and return their documents."""
    nc = NATS()
    await nc.connect(stack.state()["nats_url"])  # type: ignore[arg-type]
    js = nc.jetstream()
    try:
        ended = [await js.subscribe(stack.names.completed_event(eid), deliver_policy=DeliverPolicy.ALL,
                                    ordered_consumer=True) for eid in eids]
        await send(js)
        for sub in ended:
            await sub.next_msg(timeout=20)
    finally:
        await nc.drain()
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        return {eid: (await http.get(f"/api/execution/{eid}")).json() for eid in eids}


async def test_invalid_tasks_or_a_request_naming_their_execution_end_it_at_once_not_at_its_deadline(
    stack: Stack,
) -> None:
    # Refused by its consumer as invalid, the message was dead-lettered, and its execution waited for its deadline
    # (30 minutes by default) to end with "execution deadline exceeded". Several refused back to back: each
    # execution's letter is found by its message's sequence (the last letter of the pool named only one of them).
    # A deadline without a timezone validated, then failed the pool's arithmetic on every delivery.
    names = stack.names
    planned = {f"badtask{i}-{uuid.uuid4().hex[:8]}": deadline for i, deadline in enumerate(
        [None, None, (now() + timedelta(hours=1)).replace(tzinfo=None).isoformat()])}
    unplanned = f"badreq-{uuid.uuid4().hex[:8]}"

    async def send(js: JetStreamContext) -> None:
        bucket = await js.key_value(names.kv_bucket)
        for eid in (*planned, unplanned):
            ex = new_execution(ExecutionRequested(execution_id=eid, message="m",
                                                  deadline_at=now() + timedelta(hours=1)))
            if eid in planned:  # stored as planned, its task queued; only the invalid message for it is sent
                apply_plan(ex, [TaskSpec(id="api", pool="codegen", description="x")], "client")
            await bucket.create(eid, ex.model_dump_json().encode())
        for eid, deadline in planned.items():  # no deadline_at, or one without a timezone
            task = {"kind": "task.run", "execution_id": eid,
                    "task": {"id": "api", "pool": "codegen", "description": "x"}}
            if deadline:
                task["deadline_at"] = deadline
            await js.publish(names.tasks("codegen"), json.dumps(task).encode())
        await js.publish(names.execution_requested, json.dumps(  # a message that is not text
            {"kind": "execution.requested", "execution_id": unplanned, "message": 42,
             "deadline_at": now().isoformat()}).encode())

    docs = await sent_until_ended(stack, [*planned, unplanned], send)
    for eid, deadline in planned.items():
        [api] = docs[eid]["tasks"]
        assert docs[eid]["status"] == "failed" and api["status"] == "failed" and docs[eid]["final_response"]
        assert api["error"].startswith("dead-lettered: consumer codegen terminated it: payload does not validate: "
                                       "deadline_at: "), api["error"]
        assert ("Input should have timezone info" if deadline else "Field required") in api["error"], api["error"]
    request_doc = docs[unplanned]
    assert request_doc["status"] == "failed"
    assert request_doc["error"].startswith("could not be planned: consumer pm terminated it: payload does not "
                                           "validate: message: Input should be a valid string"), request_doc["error"]


async def test_a_request_published_straight_to_nats_is_stored_planned_and_a_bad_plan_fails_saying_why(
    stack: Stack,
) -> None:
    # Not through the gateway: no document exists yet and the plan was never checked.
    good, bad = f"direct-{uuid.uuid4().hex[:8]}", f"cycle-{uuid.uuid4().hex[:8]}"
    plans = {
        good: [TaskSpec(id="a", pool="codegen", description="a", context={"simulate": {"latency_s": 0}})],
        bad: [TaskSpec(id="a", pool="codegen", description="a", depends_on=["b"]),
              TaskSpec(id="b", pool="security", description="b", depends_on=["a"])],
    }
    pm_port = stack.state()["children"]["pm-1"]["port"]  # type: ignore[index]

    def failed_count() -> float:  # the PM's count of executions that ended failed (a series exported from the start)
        line = 'openclaw_executions_total{mode="parallel",status="failed"} '
        text = httpx.get(f"http://127.0.0.1:{pm_port}/metrics", timeout=5).text
        return next(float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line))

    async def send(js: JetStreamContext) -> None:
        for eid, tasks in plans.items():
            req = ExecutionRequested(execution_id=eid, message="straight to NATS", tasks=tasks,
                                     deadline_at=now() + timedelta(minutes=5))
            await js.publish(stack.names.execution_requested, req.to_bytes(), headers={"Nats-Msg-Id": eid})

    failed_before = failed_count()
    docs = await sent_until_ended(stack, list(plans), send)
    assert docs[good]["status"] == "completed" and docs[good]["tasks"][0]["status"] == "completed"
    assert docs[bad]["status"] == "failed" and docs[bad]["tasks"] == []
    assert docs[bad]["error"] == "invalid plan: dependency cycle: a -> b -> a"
    assert failed_count() == failed_before + 1  # the PM ended it: counted where the error-rate alert looks


def test_service_without_nats_retries_reports_not_ready_then_recovers(tmp_path: Path) -> None:
    nats_port, http_port = free_port(), free_port()
    env = {**os.environ, "OPENCLAW_NATS_URL": f"nats://127.0.0.1:{nats_port}", "OPENCLAW_PORT": str(http_port),
           "OPENCLAW_LOG_FORMAT": "text", "OPENCLAW_NAMESPACE": "nonats"}
    log = tmp_path / "codegen.log"
    proc = subprocess.Popen([sys.executable, "-m", "services.codegen"], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = NatsServer(tmp_path / "store", port=nats_port)
    try:
        wait_until(lambda: log.read_text().count("NATS not reachable at") >= 2, 20, "two retry log lines")
        r = httpx.get(f"http://127.0.0.1:{http_port}/readyz")
        assert r.status_code == 503 and "NATS not connected" in r.json()["reason"]
        assert httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200
        # openclaw_ready, what the OpenClawServiceNotReady alert reads: it answers scrapes, so `up` alone would not tell
        assert scrape(http_port)["openclaw_ready"] == 0

        server.start()

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, "the service to connect once NATS is up")
        assert scrape(http_port)["openclaw_ready"] == 1
        server.stop()  # lost once it was working: not ready again until NATS is back
        wait_until(lambda: scrape(http_port)["openclaw_ready"] == 0, 30, "openclaw_ready 0 once NATS is gone")
        server.start()
        wait_until(lambda: scrape(http_port)["openclaw_ready"] == 1, 60, "openclaw_ready 1 once NATS is back")
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, log.read_text()
        server.stop()
    assert "retrying in" in log.read_text()


def test_service_on_a_nats_without_jetstream_waits_unready_then_sets_up_once_it_is_there(tmp_path: Path) -> None:
    # A pod that starts while its JetStream cannot answer (not enabled yet, no quorum) must not exit: it would
    # crash-loop. It stays up, unready, says why, and sets up its streams and consumers once JetStream answers.
    nats_port, http_port = free_port(), free_port()
    env = {**os.environ, "OPENCLAW_NATS_URL": f"nats://127.0.0.1:{nats_port}", "OPENCLAW_PORT": str(http_port),
           "OPENCLAW_LOG_FORMAT": "text", "OPENCLAW_NAMESPACE": "nojs"}
    plain = subprocess.Popen([binary(), "-a", "127.0.0.1", "-p", str(nats_port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT)  # core NATS only
    log = tmp_path / "codegen.log"
    proc = subprocess.Popen([sys.executable, "-m", "services.codegen"], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = NatsServer(tmp_path / "store", port=nats_port)

    def readiness() -> httpx.Response | None:
        try:
            return httpx.get(f"http://127.0.0.1:{http_port}/readyz")
        except httpx.HTTPError:
            return None

    try:
        wait_until(lambda: log.read_text().count("JetStream not available") >= 2, 20, "two retry log lines")
        r = readiness()
        assert r is not None and r.status_code == 503 and "JetStream not available" in r.json()["reason"]
        assert proc.poll() is None
        plain.terminate()
        plain.wait(10)
        server.start()  # the same port, with JetStream: the service reconnects and sets up
        wait_until(lambda: (r := readiness()) is not None and r.status_code == 200, 60, "the service to set up")
    finally:
        plain.kill()
        proc.terminate()
        assert proc.wait(15) == 0, log.read_text()
        server.stop()


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"worker_pools": {"codegen": {"max_concurrent": 0, "timeout": 300}}},
         "parallel_execution.worker_pools.codegen.max_concurrent"),
        ({"worker_pool": {}}, "parallel_execution.worker_pool: Extra inputs are not permitted"),
        ({"retries": {"max_retries": "many"}}, "parallel_execution.retries.max_retries"),
        # Longer than the tasks stream remembers a released task's msg-id, a task could be queued twice.
        ({"execution_timeout_s": 7200}, "parallel_execution.execution_timeout_s: Input should be less than or equal "
                                        "to 3600"),
        # Else every request without its own timeout_s was refused with a 422 about a field it did not send.
        ({"gateway": {"max_wait_s": 30}}, "parallel_execution.gateway: default_wait_s (60) is above "
                                          "max_wait_s (30)"),
    ],
)
def test_invalid_config_fails_fast_naming_the_field(tmp_path: Path, config: dict[str, object], says: str) -> None:
    path = write_config(tmp_path / "config.json", config)
    env = {**os.environ, "OPENCLAW_CONFIG": str(path), "OPENCLAW_NATS_URL": "nats://127.0.0.1:1"}
    r = subprocess.run([sys.executable, "-m", "services.security"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert says in r.stderr, r.stderr


def test_missing_config_file_fails_fast_saying_what_to_set(tmp_path: Path) -> None:
    env = {**os.environ, "OPENCLAW_CONFIG": str(tmp_path / "nope.json")}
    r = subprocess.run([sys.executable, "-m", "services.pm"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "does not exist (set --config or OPENCLAW_CONFIG)" in r.stderr


def test_a_misspelt_variable_fails_fast_before_anything_starts() -> None:
    env = {**os.environ, "OPENCLAW_API_KEY_S": "acme=k-0123456789abcdef", "OPENCLAW_NATS_URL": "nats://127.0.0.1:1"}
    r = subprocess.run([sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert "unknown environment variable(s): OPENCLAW_API_KEY_S (did you mean OPENCLAW_API_KEYS?)" in r.stderr, r.stderr


@pytest.mark.parametrize(("body", "constant"), [
    # Python's parser reads these; stored, a client's own value came back as null, and an infinite simulated latency
    # held its slot until the pool's timeout, every try.
    (b'{"message": "m", "tasks": [{"id": "a", "pool": "codegen", "description": "x", "context": {"v": NaN}}]}', "NaN"),
    (b'{"message": "m", "tasks": [{"id": "a", "pool": "codegen", "description": "x", '
     b'"context": {"simulate": {"latency_s": Infinity}}}]}', "Infinity"),
    (b'{"message": "m", "wait": true, "timeout_s": -Infinity}', "-Infinity"),
    # Python reads a number past a float's range as infinity: stored, it too came back as null.
    (b'{"message": "m", "tasks": [{"id": "a", "pool": "codegen", "description": "x", "context": {"v": 1e999}}]}',
     "1e999"),
], ids=["context", "simulate", "timeout_s", "overflow"])
def test_nan_or_infinity_in_a_body_is_422_not_json(stack: Stack, body: bytes, constant: str) -> None:
    key = "nan-" + uuid.uuid4().hex
    r = httpx.post(f"{stack.url}/api/execute-parallel", content=body,
                   headers={"content-type": "application/json", "Idempotency-Key": key})
    says = (f"not valid JSON: {constant} is out of range (a number here must be finite)" if constant == "1e999" else
            f"not valid JSON: {constant} is not a JSON value (a JSON number is finite)")
    assert r.status_code == 422 and r.json()["errors"] == [{"field": "body", "message": says}], r.text
    assert httpx.get(f"{stack.url}/api/execution/{_execution_id(Caller(LOCAL_TENANT), key)}").status_code == 404


@pytest.mark.parametrize(("body", "says"), [
    # Python's parser takes an escaped half of a surrogate pair: as a value it could not be stored (a 500), as a key
    # it was stored rewritten (U+FFFD), and two different ones collapsed into one key.
    (b'{"message": "m", "tasks": [{"id": "a", "pool": "codegen", "description": "x", "context": {"k": "\\ud800"}}]}',
     "not valid JSON: \\ud800 is half of a surrogate pair, not a character: strings must be Unicode text"),
    (b'{"message": "m", "tasks": [{"id": "a", "pool": "codegen", "description": "x", "context": {"\\udfff": 1}}]}',
     "not valid JSON: \\udfff is half of a surrogate pair, not a character: strings must be Unicode text"),
    # ... and guesses UTF-16 and UTF-32, which JSON over HTTP is not.
    ('{"message": "m"}'.encode("utf-16"), "not valid JSON: the body is not UTF-8: byte 0 (0xff): invalid start byte"),
    (b'{"message": "caf\xe9"}', "not valid JSON: the body is not UTF-8: byte 16 (0xe9): invalid continuation byte"),
    # Python's parser keeps the last of two values of a name; the client meant one of them.
    (b'{"message": "first", "message": "second"}', "not valid JSON: 'message' is given twice in one object: which "
                                                  "value is meant is unknown"),
    (b'{"message": "m", "tasks": [{"id": "a", "pool": "codegen", "description": "x", "context": {"k": 1, "k": 2}}]}',
     "not valid JSON: 'k' is given twice in one object: which value is meant is unknown"),
], ids=["surrogate-value", "surrogate-key", "utf-16", "latin-1", "name-twice", "context-name-twice"])
def test_a_body_not_utf8_unicode_or_naming_a_field_twice_is_422_saying_so(stack: Stack, body: bytes, says: str) -> None:
    key = "utf-" + uuid.uuid4().hex
    r = httpx.post(f"{stack.url}/api/execute-parallel", content=body,
                   headers={"content-type": "application/json", "Idempotency-Key": key})
    assert r.status_code == 422 and r.json()["errors"] == [{"field": "body", "message": says}], r.text
    assert httpx.get(f"{stack.url}/api/execution/{_execution_id(Caller(LOCAL_TENANT), key)}").status_code == 404


def test_a_pair_of_surrogates_escaped_is_one_character_and_kept(stack: Stack) -> None:
    body = b'{"message": "m \\ud83d\\ude80", "tasks": [{"id": "a", "pool": "codegen", "description": "x"}]}'
    r = httpx.post(f"{stack.url}/api/execute-parallel", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 202, r.text
    assert r.json()["message"] == "m \U0001F680"
    # A UTF-8 byte order mark is read past, as JSON allows.
    r = httpx.post(f"{stack.url}/api/execute-parallel", content="\ufeff".encode() + body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 202 and r.json()["message"] == "m \U0001F680", r.text


def test_a_chat_message_of_separator_controls_is_422_not_a_crash(stack: Stack) -> None:
    # Python's strip takes \x1c-\x1f for whitespace, pydantic's does not: the chat's one task had no description.
    r = httpx.post(f"{stack.url}/api/chat", json={"message": "\x1f", "wait": False}, timeout=30)
    assert r.status_code == 422 and r.json()["errors"] == [
        {"field": "message", "message": "must not be empty or only whitespace"}], r.text


def test_a_method_a_path_does_not_have_is_405_naming_every_one_it_has(stack: Stack) -> None:
    # Starlette named the methods of the first route on the path: "GET" for an execution, which DELETE cancels too.
    for method in ("PUT", "POST", "PATCH"):
        r = httpx.request(method, f"{stack.url}/api/execution/abc")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET", (method, r.headers)
        assert r.json()["message"] == f"{method} is not allowed here: use DELETE, GET"
    r = httpx.get(f"{stack.url}/api/execute-parallel")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers


def test_a_cancel_wait_that_is_not_a_finite_number_is_422_saying_so(stack: Stack) -> None:
    r = post(stack, {"message": "m", "tasks": [{"id": "a", "pool": "codegen", "description": "x"}]})
    assert r.status_code in (200, 202), r.text
    eid = r.json()["execution_id"]
    for value in ("nan", "inf"):
        r = httpx.delete(f"{stack.url}/api/execution/{eid}", params={"wait_s": value})
        assert r.status_code == 422 and r.json()["errors"] == [
            {"field": "wait_s", "message": "Input should be a finite number"}], r.text


def test_fault_directives_are_refused_where_the_config_turns_them_off(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One tenant's crash_attempts would kill the pool workers every tenant shares.
    cfg = write_config(tmp_path / "c.json", {"simulated": {"faults": False}})
    stack: Stack = stack_factory("nf" + uuid.uuid4().hex[:8], "--config", str(cfg))
    for i, (simulate, asked) in enumerate((({"crash_attempts": 1}, "crash_attempts"),
                                           ({"hang": True, "latency_s": 1}, "hang"),
                                           ({"fail_attempts": 2, "raise_attempts": 1}, "fail_attempts, raise_attempts"),
                                           ({"latency_s": 1e9}, "latency_s 1e+09 (the pool times out at 300 s)"))):
        tasks = [{"id": "ok", "pool": "codegen", "description": "x"},
                 {"id": "bad", "pool": "codegen", "description": "x", "context": {"simulate": simulate}}]
        r = post(stack, {"message": f"faults {i}", "tasks": tasks})
        assert r.status_code == 422, r.text
        assert r.json()["errors"] == [{"field": "tasks[1].context", "message": (
            f"context.simulate: {asked} not allowed here (parallel_execution.simulated.faults is off)")}]
    # What shapes a run without breaking anything still goes.
    plan = [{"id": "slow", "pool": "codegen", "description": "x", "context": {"simulate": {"latency_s": 0.1}}}]
    assert post(stack, {"message": "latency", "tasks": plan, "wait": True}).json()["status"] == "completed"
