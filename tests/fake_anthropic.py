"""A local HTTP server that speaks the Messages API (``POST /v1/messages``), scripted per test.

The real ``anthropic`` SDK talks to it through ``base_url``. It tells the three kinds of call apart
by the tool offered (``submit_plan`` → plan, ``submit_result`` → task, none → synthesis), answers
them with tool_use blocks (a thinking block first for the plan), text, and usage with cache tokens,
records every request, and can be told to answer the next call(s) of a kind with 400, 409, 429, 529, 500 (also
one that says ``x-should-retry: false``), 504, a 429 for a spent limit, a response slower than any client
timeout, malformed output, an answer cut off at ``max_tokens``, or a refusal. A call naming a model in
``retired`` gets the API's 404. ``GET /v1/models/{id}`` answers the Models API's entry for a model (``model_info``).
A request with ``stream: true`` gets the answer as the API streams it (server-sent events: ``message_start`` with
the input usage, a start, deltas and a stop per content block, ``message_delta`` with the output count,
``message_stop``); streamed, a call can also stop answering after its first delta (``stall``), send only pings
from there (``pings``), end there (``cut``), or meet an error event there (``stream_error``, an overload).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Kind = Literal["plan", "task", "synthesis"]
Behaviour = Literal["ok", "400", "409", "429", "529", "500", "504", "spend_limit", "no_retry", "slow", "no_tool",
                    "bad_input", "not_json", "max_tokens", "refusal", "retired", "stall", "pings", "cut",
                    "stream_error", "two_calls", "no_output_count"]
STREAM_BREAKS = ("stall", "pings", "cut", "stream_error")  # what happens after the first delta of a streamed answer
FIRST_DELTA_CHARS = 400  # how much of the answer a broken stream sends first

USAGE: dict[Kind, dict[str, int]] = {
    "plan": {"input_tokens": 1850, "output_tokens": 2600, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 1320},
    "task": {"input_tokens": 2100, "output_tokens": 940, "cache_read_input_tokens": 1500,
             "cache_creation_input_tokens": 300},
    "synthesis": {"input_tokens": 3300, "output_tokens": 610, "cache_read_input_tokens": 800,
                  "cache_creation_input_tokens": 0},
}

PLAN: dict[str, Any] = {"tasks": [
    {"id": "schema", "pool": "database", "description": "Design the orders and menu schema with migrations",
     "context": {"database": "PostgreSQL"}},
    {"id": "api", "pool": "codegen", "description": "Build the ordering REST API", "depends_on": ["schema"]},
    {"id": "audit", "pool": "security", "description": "Audit checkout and payments", "depends_on": ["api"]},
]}

ERRORS = {400: "invalid_request_error", 409: "api_error", 429: "rate_limit_error", 529: "overloaded_error",
          500: "api_error", 504: "timeout_error"}


def task_output(system: str, user: str) -> dict[str, Any]:
    """A plausible result for the pool whose system prompt this is."""
    first = user.split("\n\n")[1] if "\n\n" in user else user
    if "security auditor" in system:
        return {"summary": f"Audited: {first}", "findings": [
            {"severity": "critical", "topic": "payments", "detail": "card data reaches the API",
             "recommendation": "Use hosted payment fields"}],
            "recommendations": [{"topic": "session handling", "choice": "server-side sessions",
                                 "rationale": "httpOnly cookies"}]}
    if "database engineer" in system:
        return {"summary": f"Schema for: {first}", "artifacts": [
            {"path": "db/001_orders.sql", "kind": "sql", "content": "CREATE TABLE orders (id BIGSERIAL);"}],
            "recommendations": [{"topic": "database", "choice": "PostgreSQL", "rationale": "relational"}]}
    return {"summary": f"Implemented: {first}", "artifacts": [
        {"path": "api/orders.py", "kind": "code", "content": "def create_order(): ..."}]}


def stream_events(message: dict[str, Any], behaviour: Behaviour = "ok") -> list[tuple[str, dict[str, Any]]]:
    """``message`` as the Messages API streams it; a ``behaviour`` of STREAM_BREAKS stops after the first delta."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1}}
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": start})]
    for i, block in enumerate(message["content"]):
        if block["type"] == "text":
            empty, deltas = {"type": "text", "text": ""}, [{"type": "text_delta", "text": block["text"]}]
        elif block["type"] == "thinking":
            empty = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block["thinking"]},
                      {"type": "signature_delta", "signature": block["signature"]}]
        else:
            empty = {**block, "input": {}}
            text = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": text[j:j + 64]} for j in range(0, len(text), 64)]
        events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": empty}))
        for delta in deltas:
            events.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}))
            if behaviour in STREAM_BREAKS:  # the first FIRST_DELTA_CHARS of the answer, then the break
                if delta["type"] == "input_json_delta":
                    events[-1][1]["delta"]["partial_json"] = text[:FIRST_DELTA_CHARS]
                if behaviour == "stream_error":
                    events.append(("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                        "message": "Overloaded"}}))
                return events
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                                     "usage": {"output_tokens": usage["output_tokens"]}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


class FakeAnthropic:
    """The server; ``url`` is its base_url. Start with ``start()``, stop with ``stop()``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # {"kind", "body", "headers"} in arrival order
        self.plan: dict[str, Any] = PLAN
        self.usage: dict[Kind, dict[str, int]] = {k: dict(v) for k, v in USAGE.items()}
        self.synthesis_text = "All done! The schema, the ordering API and the security audit are finished."
        self.task_chars = 0  # when set, each task's answer carries a text this long (its first artifact or finding)
        self.task_answer: dict[str, Any] | None = None  # when set, every task's tool input, as given
        self._script: dict[Kind, deque[Behaviour]] = {"plan": deque(), "task": deque(), "synthesis": deque()}
        self._lock = threading.Condition()
        self._hold: dict[Kind, int] = {}
        self.release = threading.Event()  # a "slow" answer waits for this (set at stop)
        self.retry_after_s = 2  # what a 429 asks the client to wait
        self.retry_after_headers: dict[str, str] | None = None  # when set, how a 429 says it instead
        self.retired: set[str] = set()  # models this endpoint no longer knows: 404, whatever was scripted
        self.models: dict[str, dict[str, Any]] = {}  # per model, what its Models API entry says otherwise (model_info)
        self.models_api: bool | str = True  # False: GET /v1/models/… is a 404 (a compatible endpoint without it)
        self.lookups: list[str] = []  # the models looked up, in order
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        with self._lock:
            self._hold.clear()
            self._lock.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def next(self, kind: Kind, *behaviours: Behaviour) -> None:
        """Answer the next calls of ``kind`` like this, in order; afterwards "ok" again."""
        with self._lock:
            self._script[kind].extend(behaviours)

    def hold(self, kind: Kind, count: int) -> None:
        """Answer no call of ``kind`` until ``count`` of them have arrived (to make callers overlap)."""
        with self._lock:
            self._hold[kind] = count

    def of(self, kind: Kind) -> list[dict[str, Any]]:
        """The bodies of the requests of ``kind`` received so far."""
        with self._lock:
            return [r["body"] for r in self.requests if r["kind"] == kind]

    # ---------------------------------------------------------------- serving

    def _arrive(self, kind: Kind, body: dict[str, Any], headers: dict[str, str]) -> tuple[Behaviour, int]:
        with self._lock:
            self.requests.append({"kind": kind, "body": body, "headers": headers})
            n = sum(r["kind"] == kind for r in self.requests)
            if body.get("model") in self.retired:
                behaviour: Behaviour = "retired"  # the script is for calls that reach a model
            else:
                behaviour = self._script[kind].popleft() if self._script[kind] else "ok"
            self._lock.notify_all()
            self._lock.wait_for(lambda: sum(r["kind"] == kind for r in self.requests) >= self._hold.get(kind, 0),
                                timeout=30)
            return behaviour, n

    def _answer(self, kind: Kind, behaviour: Behaviour, body: dict[str, Any], n: int) -> tuple[int, Any]:
        if behaviour in ("400", "409", "429", "529", "500", "504"):
            code = int(behaviour)
            return code, {"type": "error", "error": {"type": ERRORS[code], "message": f"scripted {code}"}}
        if behaviour == "spend_limit":  # a 429 that no wait gets past: the organisation's monthly threshold
            return 429, {"type": "error", "error": {"type": "rate_limit_error", "message": "spend limit reached",
                                                    "details": {"error_code": "enforced_spend_limit_reached"}}}
        if behaviour == "slow":
            self.release.wait(60)
        usage = dict(self.usage[kind])
        if behaviour == "no_output_count":  # message_delta's output_tokens null: a malformed end of the stream
            usage["output_tokens"] = None
        system = "".join(b["text"] for b in body.get("system", []))
        user = body["messages"][0]["content"]
        content: list[dict[str, Any]]
        if behaviour == "refusal":  # what comes before the model stops is not an answer, whatever it holds
            content, stop = [{"type": "text", "text": "I can't help with that."}], "refusal"
        elif kind == "synthesis":
            text = "" if behaviour == "no_tool" else f"{self.synthesis_text} (answer #{n})"
            content = [{"type": "text", "text": text}] if text else []
            stop = "end_turn"
        elif behaviour == "no_tool":
            content, stop = [{"type": "text", "text": "Here is my plan in prose instead."}], "end_turn"
        else:
            tool = "submit_plan" if kind == "plan" else "submit_result"
            if behaviour == "bad_input":
                data: Any = ({"tasks": [{"id": "ui", "pool": "frontend", "description": "x"}]} if kind == "plan"
                             else {"artifacts": "none"})
            else:
                data = self.plan if kind == "plan" else self.task_answer or task_output(system, user)
                if kind == "task" and self.task_chars:
                    text = ('return "é"\n' * (self.task_chars // 11 + 1))[:self.task_chars]
                    long = data["artifacts"][0] if data.get("artifacts") else data["findings"][0]
                    long["content" if "content" in long else "detail"] = text
            content = [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": tool, "input": data}]
            if behaviour == "two_calls":  # the answer in two parts, as a model may split it if the API lets it
                content.append({**content[0], "id": f"toolu_{uuid.uuid4().hex[:20]}"})
            stop = "tool_use"
        if behaviour == "max_tokens":  # cut off: the input so far still validates, which must not make it whole
            stop = "max_tokens"
        if kind == "plan":
            content.insert(0, {"type": "thinking", "thinking": "Schema first, then the API, then the audit.",
                               "signature": "c2lnbmF0dXJl"})
        return 200, {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                     "model": f"{body['model']}-20990101", "content": content, "stop_reason": stop,
                     "stop_sequence": None, "usage": usage}

    def model_info(self, model: str) -> dict[str, Any]:
        """What ``GET /v1/models/{model}`` answers: every capability supported, unless ``models`` says otherwise."""
        yes = {"supported": True}
        info: dict[str, Any] = {
            "type": "model", "id": model, "display_name": model, "created_at": "2026-02-01T00:00:00Z",
            "lifecycle": "retired" if model in self.retired else "active", "max_input_tokens": 1_000_000,
            "max_tokens": 64_000,
            "capabilities": {
                "batch": yes, "citations": yes, "code_execution": yes, "context_management": yes,
                "effort": {"supported": True, "low": yes, "medium": yes, "high": yes, "max": yes},
                "image_input": yes, "pdf_input": yes, "server_tools": yes, "structured_outputs": yes,
                "thinking": {"supported": True, "types": {"adaptive": yes, "enabled": yes, "disabled": yes}},
            },
        }
        for path, value in self.models.get(model, {}).items():  # "capabilities.thinking.types.adaptive": {...}
            *outer, last = path.split(".")
            node = info
            for key in outer:
                node = node[key]
            node[last] = value
        return info

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?")[0]
                if not path.startswith("/v1/models/") or not fake.models_api:
                    self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": path}})
                    return
                with fake._lock:
                    fake.lookups.append(path.removeprefix("/v1/models/"))
                if fake.models_api == "garbled":  # a 200 whose body is not JSON
                    self._send(200, None, raw=b'{"id": "claude')
                    return
                self._send(200, fake.model_info(path.removeprefix("/v1/models/")))

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/v1/messages":
                    self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                tools = {t["name"] for t in body.get("tools", [])}
                kind: Kind = "plan" if "submit_plan" in tools else "task" if "submit_result" in tools else "synthesis"
                behaviour, n = fake._arrive(kind, body, {k.lower(): v for k, v in self.headers.items()})
                if behaviour == "not_json":
                    if body.get("stream"):
                        self._events([], raw=b'event: message_start\ndata: {"type": "message_start", "message": {\n\n')
                    else:
                        self._send(200, None, raw=b'{"id": "msg_1", "content": [')
                    return
                if behaviour == "retired":
                    self._send(404, {"type": "error", "error": {"type": "not_found_error",
                                                                "message": f"model: {body['model']}"}},
                               headers={"x-should-retry": "false"})
                    return
                if behaviour == "no_retry":  # the API's own word that another try would fail too
                    self._send(*fake._answer(kind, "500", body, n), headers={"x-should-retry": "false"})
                    return
                code, answer = fake._answer(kind, "ok" if behaviour in STREAM_BREAKS else behaviour, body, n)
                if code == 200 and body.get("stream"):
                    self._events(stream_events(answer, behaviour), stall=behaviour == "stall",
                                 pings=behaviour == "pings")
                else:
                    self._send(code, answer)

            def _events(self, events: list[tuple[str, dict[str, Any]]], raw: bytes = b"", stall: bool = False,
                        pings: bool = False) -> None:
                try:
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("cache-control", "no-cache")
                    self.end_headers()  # no length: the stream ends when the connection closes
                    for name, data in events:
                        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(raw)
                    self.wfile.flush()
                    if stall:
                        fake.release.wait(60)
                    while pings and not fake.release.wait(0.1):  # alive, saying nothing
                        self.wfile.write(b'event: ping\ndata: {"type": "ping"}\n\n')
                        self.wfile.flush()
                    self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def _send(self, code: int, payload: Any, raw: bytes | None = None,
                      headers: dict[str, str] | None = None) -> None:
                data = raw if raw is not None else json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    if code == 429:  # as the Messages API does: how long until the limit lets a request through
                        asked = fake.retry_after_headers or {"retry-after": str(fake.retry_after_s)}
                        for name, value in asked.items():
                            self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        return Handler
