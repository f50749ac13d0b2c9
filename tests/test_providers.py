"""The anthropic provider through the real SDK against a local Messages API; provider choice and the key."""

from __future__ import annotations

import contextlib
import email.utils
import logging
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.codegen.prompts import SYSTEM as CODEGEN_SYSTEM
from services.codegen.prompts import format_prompt as codegen_prompt
from services.database.prompts import format_prompt as database_prompt
from shared.config import ParallelExecutionConfig
from shared.costs import usd
from shared.errors import ConfigError
from shared.failures import RETRY_AFTER_MAX_S, Strategy, decide, model_for
from shared.natsserver import free_port
from shared.providers import AnthropicProvider, ModelUse, Prompt, ProviderError, SimulatedProvider, make_provider
from shared.schemas import TaskSpec, Usage
from shared.settings import load_settings
from tests.conftest import ROOT, ready_on, stack_env, wait_until, write_config
from tests.fake_anthropic import FIRST_DELTA_CHARS, STREAM_BREAKS, FakeAnthropic

KEY = "sk-ant-test-0123"
# USD by hand from the fake's usage and the default list prices (per MTok: input, output; cache read 0.1×
# input, cache write 1.25× input): a task on claude-sonnet-4-6 is 2100×3 + 940×15 + 1500×0.3 + 300×3.75.
TASK_ON_SONNET = 21_975 / 1e6
PLAN_ON_OPUS = (1850 * 5 + 2600 * 25 + 1320 * 6.25) / 1e6  # 0.0825


def anthropic_config(fake: FakeAnthropic, **section: Any) -> ParallelExecutionConfig:
    anthropic = {"base_url": fake.url, "timeout_s": 2, **section.pop("anthropic", {})}
    return ParallelExecutionConfig.model_validate({"provider": "anthropic", "anthropic": anthropic, **section})


@pytest.fixture
async def provider(fake_anthropic: FakeAnthropic) -> AsyncIterator[AnthropicProvider]:
    p = AnthropicProvider(anthropic_config(fake_anthropic, anthropic={"max_tokens": 8000}), KEY)
    yield p
    await p.aclose()


SPEC = TaskSpec(id="api", pool="codegen", description="Build the ordering REST API")


async def test_a_task_is_one_forced_tool_call_with_a_cached_system_prompt(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    reply = await provider.run_task("codegen", SPEC, codegen_prompt(SPEC), "claude-sonnet-4-6", 1)

    [req] = fake_anthropic.requests
    headers = req["headers"]  # the key travels as x-api-key or as a bearer token, depending on the SDK version
    assert KEY in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
    assert headers["x-stainless-retry-count"] == "0"
    body = req["body"]
    assert body["model"] == "claude-sonnet-4-6" and body["max_tokens"] == 8000
    assert body["system"] == [{"type": "text", "text": CODEGEN_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    assert body["messages"] == [{"role": "user", "content": codegen_prompt(SPEC).user}]
    [tool] = body["tools"]
    assert tool["name"] == "submit_result"
    schema = tool["input_schema"]
    assert set(schema["properties"]) == {"summary", "artifacts", "findings", "recommendations"}
    assert schema["required"] == ["summary"] and "$defs" not in schema and "$ref" not in str(schema)
    assert schema["properties"]["findings"]["items"]["properties"]["severity"]["enum"][-1] == "critical"
    assert body["tool_choice"] == {"type": "tool", "name": "submit_result", "disable_parallel_tool_use": True}
    assert "thinking" not in body and "output_config" not in body

    assert reply.provider == "anthropic" and reply.output.simulated is False
    assert reply.output.summary == "Implemented: Build the ordering REST API"
    assert [a.path for a in reply.output.artifacts] == ["api/orders.py"]
    assert reply.usage == Usage(input_tokens=2100, output_tokens=940, cache_read_tokens=1500, cache_write_tokens=300)
    # Priced under the configured name, not the dated snapshot the endpoint reports.
    assert reply.model == "claude-sonnet-4-6"
    assert usd(ParallelExecutionConfig(), reply.model, reply.usage) == pytest.approx(TASK_ON_SONNET, abs=1e-12)


async def test_decomposition_thinks_adaptively_at_the_configured_effort_and_returns_the_plan(
    fake_anthropic: FakeAnthropic,
) -> None:
    pe = anthropic_config(fake_anthropic, pm_coordinator={"reasoning_effort": "max"})
    p = AnthropicProvider(pe, KEY)
    try:
        reply = await p.decompose(Prompt("plan it", "Build a shop"), "claude-opus-4-6", "max")
    finally:
        await p.aclose()
    [body] = fake_anthropic.of("plan")
    assert body["model"] == "claude-opus-4-6" and body["max_tokens"] == 16_000
    assert body["thinking"] == {"type": "adaptive"}
    assert body["output_config"] == {"effort": "max"}
    # A forced tool choice is not allowed with thinking: the tool is offered, the prompt asks for it.
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    [tool] = body["tools"]
    assert tool["name"] == "submit_plan"
    task_schema = tool["input_schema"]["properties"]["tasks"]["items"]
    assert task_schema["properties"]["pool"]["enum"] == ["codegen", "security", "database"]
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}

    assert reply is not None  # the thinking block before the tool call is skipped
    assert [(t.id, t.pool, t.depends_on) for t in reply.plan.tasks] == [
        ("schema", "database", []), ("api", "codegen", ["schema"]), ("audit", "security", ["api"])]
    assert reply.plan.tasks[0].context == {"database": "PostgreSQL"}
    assert usd(pe, reply.model, reply.usage) == pytest.approx(PLAN_ON_OPUS, abs=1e-12)


async def test_synthesis_is_a_plain_text_call(provider: AnthropicProvider, fake_anthropic: FakeAnthropic) -> None:
    reply = await provider.synthesize(Prompt("persona", "facts"), "claude-sonnet-4-6")
    [body] = fake_anthropic.of("synthesis")
    assert "tools" not in body and "tool_choice" not in body and "thinking" not in body
    assert body["system"] == [{"type": "text", "text": "persona", "cache_control": {"type": "ephemeral"}}]
    assert reply is not None and reply.text.startswith("All done!")
    assert reply.usage.cache_read_tokens == 800


@pytest.mark.parametrize(
    ("behaviour", "kind", "says", "billed"),
    [
        ("429", "rate_limit", "HTTP 429", False),
        ("529", "overloaded", "HTTP 529", False),
        ("500", "server", "HTTP 500", False),
        ("400", "request", "HTTP 400", False),
        ("409", "server", "HTTP 409", False),  # a lock that timed out: retried, as the SDK would
        ("504", "timeout", "HTTP 504", False),  # the API's timeout_error, as in a stream
        ("spend_limit", "request", "HTTP 429", False),  # no wait gets past a spend limit, nor does the other model
        ("no_retry", "request", "HTTP 500", False),  # x-should-retry: false
        ("max_tokens", "truncated", "cut off after 940 output tokens (stop_reason max_tokens)", True),
        ("refusal", "refusal", "declined to answer (stop_reason refusal)", True),
        ("slow", "timeout", "did not answer within 0.5s", False),  # before the model started: nothing billed
        # Streamed answers that break after their first delta: the input is billed, the output so far estimated.
        ("stall", "timeout", "did not answer within 0.5s", True),
        ("pings", "timeout", "did not answer within 0.5s", True),  # kept alive, but not for longer than timeout_s
        ("cut", "server", "the stream ended before the answer did", True),
        ("stream_error", "overloaded", "error in the stream", True),
        ("no_tool", "invalid_output", "did not call submit_result (stop_reason end_turn)", True),
        ("bad_input", "invalid_output", "invalid submit_result input: summary: Field required", True),
        ("not_json", "invalid_output", "malformed response", False),
    ],
)
async def test_failures_map_to_error_kinds_and_the_sdk_does_not_retry(
    fake_anthropic: FakeAnthropic, behaviour: Any, kind: str, says: str, billed: bool
) -> None:
    p = AnthropicProvider(anthropic_config(fake_anthropic, anthropic={"timeout_s": 0.5}), KEY)
    fake_anthropic.next("task", behaviour)
    fake_anthropic.task_chars = 2000  # longer than what a broken stream sends first
    try:
        with pytest.raises(ProviderError) as err:
            await p.run_task("codegen", SPEC, codegen_prompt(SPEC), "claude-sonnet-4-6", 1)
    finally:
        await p.aclose()
    assert err.value.kind == kind
    assert says in str(err.value)
    # Billed output that was unusable keeps its usage, so its cost can still be counted.
    assert (err.value.usage is not None) == billed
    if behaviour in STREAM_BREAKS:  # the endpoint's input count; the output from the 400 characters that came
        assert err.value.usage == Usage(input_tokens=2100, output_tokens=FIRST_DELTA_CHARS // 4, cache_read_tokens=1500,
                                        cache_write_tokens=300, estimated=True)
    assert err.value.retry_after_s == (fake_anthropic.retry_after_s if behaviour in ("429", "spend_limit") else None)
    assert len(fake_anthropic.requests) == 1  # max_retries=0: retrying is the pool worker's job


async def test_a_tool_input_no_utf_8_text_can_hold_is_invalid_output(provider: AnthropicProvider,
                                                                     fake_anthropic: FakeAnthropic) -> None:
    # A lone surrogate, escaped in JSON: Python's json takes it, and the result could then not be sent on; the paid
    # call ran again on every delivery, unrecorded, and the task was dead-lettered at the last.
    fake_anthropic.task_answer = {"summary": "done \ud800 here"}
    with pytest.raises(ProviderError) as err:
        await provider.run_task("codegen", SPEC, codegen_prompt(SPEC), "claude-sonnet-4-6", 1)
    assert err.value.kind == "invalid_output" and "malformed response" in str(err.value)
    assert err.value.usage is not None and err.value.usage.input_tokens == 2100  # paid for all the same


async def test_an_answer_split_over_two_tool_calls_is_not_half_used(provider: AnthropicProvider,
                                                                     fake_anthropic: FakeAnthropic) -> None:
    # The first call was taken and the second dropped without a word: a finding in it, or the final plan after a
    # draft. One call is asked for (disable_parallel_tool_use); two are invalid output, paid for all the same.
    fake_anthropic.next("task", "two_calls")
    fake_anthropic.next("plan", "two_calls")
    with pytest.raises(ProviderError) as task_err:
        await provider.run_task("codegen", SPEC, codegen_prompt(SPEC), "claude-sonnet-4-6", 1)
    with pytest.raises(ProviderError) as plan_err:
        await provider.decompose(Prompt("persona", "plan this"), "claude-opus-4-6", "high")
    for err, tool in ((task_err, "submit_result"), (plan_err, "submit_plan")):
        assert err.value.kind == "invalid_output" and f"called {tool} 2 times" in str(err.value)
        assert err.value.usage is not None and err.value.usage.input_tokens > 0


async def test_a_stream_without_its_output_count_is_invalid_output_with_its_usage_estimated(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    # Its usage failed validation outside the provider's errors: a plan or an answer paid for was recorded at $0.
    fake_anthropic.next("synthesis", "no_output_count")
    with pytest.raises(ProviderError) as err:
        await provider.synthesize(Prompt("persona", "facts"), "claude-sonnet-4-6")
    assert err.value.kind == "invalid_output" and "no output token count" in str(err.value)
    usage = err.value.usage
    assert usage is not None and usage.input_tokens == 3300 and usage.output_tokens > 1 and usage.estimated


async def test_an_answer_with_a_lone_surrogate_keeps_its_text_as_text_utf_8_can_hold(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    # Taken as it came, the answer could not be stored: the execution stayed running, and every redelivery of its
    # last result paid for another answer.
    fake_anthropic.synthesis_text = "All done \ud83d here"
    reply = await provider.synthesize(Prompt("persona", "facts"), "claude-sonnet-4-6")
    assert reply.text.startswith("All done \ufffd here")
    reply.text.encode()  # what storing it takes


async def test_a_model_the_endpoint_does_not_know_is_its_own_kind_whatever_the_retry_header_says(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.retired.add("claude-sonnet-4-6")  # answered 404 not_found_error with x-should-retry: false
    with pytest.raises(ProviderError) as err:
        await provider.run_task("codegen", SPEC, codegen_prompt(SPEC), "claude-sonnet-4-6", 1)
    assert (err.value.kind, err.value.usage) == ("model_unavailable", None)  # nothing billed
    assert "HTTP 404" in str(err.value) and "claude-sonnet-4-6" in str(err.value)
    reply = await provider.run_task("codegen", SPEC, codegen_prompt(SPEC), "claude-haiku-4-5", 2)
    assert reply.model.startswith("claude-haiku-4-5")


async def test_upstream_outputs_reach_the_prompt(provider: AnthropicProvider, fake_anthropic: FakeAnthropic) -> None:
    spec = TaskSpec(id="db", pool="database", description="Index the orders table",
                    context={"upstream": {"api": {"summary": "orders API"}}})
    await provider.run_task("database", spec, database_prompt(spec), "claude-haiku-4-5", 1)
    [body] = fake_anthropic.of("task")
    assert "orders API" in body["messages"][0]["content"] and body["model"] == "claude-haiku-4-5"


def test_auto_uses_anthropic_only_with_a_key_and_says_which_it_runs(fake_anthropic: FakeAnthropic,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "shared.providers")
    assert isinstance(make_provider(ParallelExecutionConfig(), None), SimulatedProvider)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "model provider: simulated (provider 'auto' and no ANTHROPIC_API_KEY): answers are labelled "
                    "[simulated], no model is called")]
    assert isinstance(make_provider(ParallelExecutionConfig(), ""), SimulatedProvider)
    caplog.clear()
    assert isinstance(make_provider(anthropic_config(fake_anthropic), KEY), AnthropicProvider)
    assert caplog.messages == [f"model provider: anthropic ({fake_anthropic.url})"]
    assert isinstance(make_provider(ParallelExecutionConfig(), KEY), AnthropicProvider)
    assert isinstance(make_provider(ParallelExecutionConfig(provider="simulated"), KEY), SimulatedProvider)
    with pytest.raises(ConfigError, match="set ANTHROPIC_API_KEY"):
        make_provider(anthropic_config(fake_anthropic), None)


def test_provider_anthropic_without_a_key_fails_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "c.json", {"provider": "anthropic"})
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENCLAW_ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY is not set"):
        load_settings(config=str(cfg))
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    assert load_settings(config=str(cfg)).anthropic_api_key == KEY

    # A service exits 2 (the runner's "bad configuration": not restarted), saying what to set.
    r = subprocess.run([sys.executable, "-m", "services.pm"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=stack_env(OPENCLAW_CONFIG=str(cfg), OPENCLAW_PORT="0", OPENCLAW_LOG_FORMAT="text"))
    assert r.returncode == 2
    assert "set ANTHROPIC_API_KEY" in r.stdout + r.stderr


def test_openclaw_provider_anthropic_stops_every_model_caller_whose_key_is_empty_but_not_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nats_url: str,
) -> None:
    # Prod's overlay: config.json says "auto", the environment says anthropic. A Secret made from an unset variable
    # holds an empty key: under "auto" that ran the agents on the simulated provider, for paying clients.
    cfg = write_config(tmp_path / "c.json", {"provider": "auto"})
    monkeypatch.setenv("OPENCLAW_PROVIDER", "anthropic")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "")
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY is not set, or empty"):
        load_settings(config=str(cfg))
    assert load_settings(models=False, config=str(cfg)).pe.provider == "anthropic"
    env = stack_env(OPENCLAW_CONFIG=str(cfg), OPENCLAW_PROVIDER="anthropic", ANTHROPIC_API_KEY="",
                    OPENCLAW_NATS_URL=nats_url, OPENCLAW_NAMESPACE="pk" + uuid.uuid4().hex[:8], OPENCLAW_PORT="0",
                    OPENCLAW_LOG_FORMAT="text")
    for service in ("pm", "codegen", "aggregator"):
        r = subprocess.run([sys.executable, "-m", f"services.{service}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env=env)
        assert r.returncode == 2 and "set ANTHROPIC_API_KEY" in r.stdout + r.stderr, (service, r.stderr[-500:])
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=ROOT,
                               env={**env, "OPENCLAW_PORT": str(port)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: gateway.poll() is not None or ready_on(port), 60, "the gateway to be ready or to exit")
        assert gateway.poll() is None  # it calls no model: it needs no key
    finally:
        gateway.terminate()
        assert gateway.wait(30) == 0


@pytest.mark.parametrize(
    ("entry", "section", "use", "says"),
    [
        ({"capabilities.thinking.types.adaptive": {"supported": False}}, {},
         ModelUse("pm_coordinator.decomposition_model", "claude-haiku-4-5", "high"),
         "parallel_execution.pm_coordinator.decomposition_model (claude-haiku-4-5) does not support adaptive thinking"),
        ({"capabilities.effort.max": {"supported": False}}, {},
         ModelUse("pm_coordinator.decomposition_model", "claude-opus-4-6", "max"),
         "reasoning_effort (max) is not an effort level parallel_execution.pm_coordinator.decomposition_model"),
        ({"capabilities.effort.supported": False}, {},
         ModelUse("pm_coordinator.decomposition_model", "claude-opus-4-6", "high"),
         "reasoning_effort (high) is not an effort level parallel_execution.pm_coordinator.decomposition_model"),
        ({"max_tokens": 8192}, {"anthropic": {"max_tokens": 16000}},
         ModelUse("worker_pools.codegen.fallback_model", "claude-haiku-4-5"),
         "anthropic.max_tokens (16000) is above what parallel_execution.worker_pools.codegen.fallback_model "
         "(claude-haiku-4-5) allows (8192)"),
    ],
)
async def test_start_up_refuses_a_model_that_cannot_take_its_calls(
    fake_anthropic: FakeAnthropic, entry: dict[str, Any], section: dict[str, Any], use: ModelUse, says: str,
) -> None:
    fake_anthropic.models[use.model] = entry
    p = AnthropicProvider(anthropic_config(fake_anthropic, **section), KEY)
    try:
        with pytest.raises(ConfigError) as err:
            await p.check_models([use])
        assert says in str(err.value)
        # The same model, for what it can do: passes (no thinking asked of a pool's model; an effort it has).
        await p.check_models([ModelUse(use.setting, use.model, "high" if use.effort == "max" else None)]
                             if "max_tokens" not in entry and "capabilities.effort.supported" not in entry else [])
    finally:
        await p.aclose()
    assert fake_anthropic.lookups[0] == use.model


async def test_a_model_check_the_endpoint_cannot_answer_or_a_retired_model_is_logged_not_fatal(
    fake_anthropic: FakeAnthropic, caplog: pytest.LogCaptureFixture,
) -> None:
    p = AnthropicProvider(anthropic_config(fake_anthropic), KEY)
    try:
        fake_anthropic.models_api = False  # a compatible endpoint without the Models API
        with caplog.at_level(logging.WARNING, logger="shared.providers"):
            await p.check_models([ModelUse("worker_pools.codegen.model", "claude-sonnet-4-6")])
        assert "could not look up claude-sonnet-4-6 (worker_pools.codegen.model) in the Models API: HTTP 404" \
            in caplog.text
        fake_anthropic.models_api = True
        fake_anthropic.retired.add("claude-sonnet-4-5")  # its calls go to the fallback model: running, not refused
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shared.providers"):
            await p.check_models([ModelUse("worker_pools.security.model", "claude-sonnet-4-5")])
        [record] = caplog.records
        assert record.levelno == logging.ERROR
        assert "worker_pools.security.model (claude-sonnet-4-5) is retired" in record.getMessage()
        # A deprecated one whose retirement date does not parse; an answer that is not JSON: logged all the same.
        fake_anthropic.models["claude-haiku-4-5"] = {"lifecycle": "deprecated", "retires_at": "TBD"}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shared.providers"):
            await p.check_models([ModelUse("worker_pools.codegen.fallback_model", "claude-haiku-4-5")])
            fake_anthropic.models_api = "garbled"
            await p.check_models([ModelUse("worker_pools.codegen.model", "claude-sonnet-4-6")])
        deprecated, garbled = (r.getMessage() for r in caplog.records)
        assert "claude-haiku-4-5) is deprecated: its calls still run" in deprecated
        assert "could not look up claude-sonnet-4-6 (worker_pools.codegen.model) in the Models API: " in garbled
    finally:
        await p.aclose()


def test_a_service_whose_model_cannot_plan_stops_at_start_up_saying_what_to_set(
    fake_anthropic: FakeAnthropic, tmp_path: Path, nats_url: str,
) -> None:
    fake_anthropic.models["claude-haiku-4-5"] = {"capabilities.thinking.types.adaptive": {"supported": False}}
    cfg = write_config(tmp_path / "c.json", {"provider": "anthropic", "anthropic": {"base_url": fake_anthropic.url},
                                             "pm_coordinator": {"decomposition_model": "claude-haiku-4-5"}})
    env = stack_env(OPENCLAW_CONFIG=str(cfg), ANTHROPIC_API_KEY=KEY, OPENCLAW_NATS_URL=nats_url,
                    OPENCLAW_NAMESPACE="mc" + uuid.uuid4().hex[:8], OPENCLAW_PORT="0", OPENCLAW_LOG_FORMAT="text")
    r = subprocess.run([sys.executable, "-m", "services.pm"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2, r.stderr[-800:]
    assert "decomposition_model (claude-haiku-4-5) does not support adaptive thinking" in r.stdout + r.stderr
    assert fake_anthropic.lookups == ["claude-haiku-4-5"]


@pytest.mark.parametrize("form", ["seconds", "milliseconds", "http-date"])
async def test_a_rate_limits_wait_is_read_in_every_form_the_sdk_reads(fake_anthropic: FakeAnthropic, form: str) -> None:
    # The SDK (which does not retry here) would read retry-after-ms first, then retry-after as seconds or a date.
    fake_anthropic.retry_after_headers = {
        "seconds": {"retry-after": "20"}, "milliseconds": {"retry-after-ms": "20000", "retry-after": "1"},
        "http-date": {"retry-after": email.utils.formatdate(time.time() + 20, usegmt=True)}}[form]
    fake_anthropic.next("task", "429")
    p = AnthropicProvider(anthropic_config(fake_anthropic), KEY)
    try:
        with pytest.raises(ProviderError) as err:
            await p.run_task("codegen", SPEC, codegen_prompt(SPEC), "claude-sonnet-4-6", 1)
    finally:
        await p.aclose()
    assert err.value.kind == "rate_limit"
    assert err.value.retry_after_s == pytest.approx(20, abs=2)  # a date is to the second, and read a moment later


async def test_an_endpoint_that_takes_no_connection_fails_the_attempt_at_the_connect_timeout() -> None:
    # A listener whose accept queue is full: the kernel drops the next connection's SYN, as a firewall that drops
    # packets would. The call must not hold its pool slot for the whole of timeout_s.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    queued = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        queued.append(c)
    pe = ParallelExecutionConfig.model_validate({"provider": "anthropic", "anthropic": {
        "base_url": f"http://127.0.0.1:{port}", "timeout_s": 3, "connect_timeout_s": 0.3}})
    p = AnthropicProvider(pe, KEY)
    try:
        with pytest.raises(ProviderError) as err:
            await p.run_task("codegen", SPEC, codegen_prompt(SPEC), "claude-sonnet-4-6", 1)
    finally:
        await p.aclose()
        for c in [*queued, server]:
            c.close()
    assert err.value.kind == "server" and "no connection within 0.3s" in str(err.value)
    assert err.value.usage is None  # nothing reached a model
    # Shorter than the SDK's 5 s: the whole call's timeout bounds connecting too.
    short = ParallelExecutionConfig.model_validate({"provider": "anthropic", "anthropic": {"timeout_s": 2}})
    q = AnthropicProvider(short, KEY)
    assert (q.client.timeout.connect, q.client.timeout.read) == (2, 2)
    await q.aclose()


def test_anthropic_settings_are_validated(tmp_path: Path) -> None:
    from shared.config import load_config

    with pytest.raises(ConfigError, match="parallel_execution.anthropic.base_url"):
        load_config(write_config(tmp_path / "c.json", {"anthropic": {"base_url": "api.example.com"}}))
    with pytest.raises(ConfigError, match="parallel_execution.anthropic.timeout_s"):
        load_config(write_config(tmp_path / "c.json", {"anthropic": {"timeout_s": 0}}))
    pe = load_config(write_config(tmp_path / "c.json", {"pm_coordinator": {"tone": "formal", "emoji": False}}))
    assert pe.pm_coordinator.tone == "formal" and pe.anthropic.base_url is None


@pytest.mark.parametrize("behaviour", ["max_tokens", "refusal"])
async def test_a_plan_or_an_answer_that_was_cut_off_or_declined_is_not_used(
    fake_anthropic: FakeAnthropic, behaviour: Any
) -> None:
    # The plan cut off still validates (its tasks so far), and so does the answer's text: neither is whole.
    p = AnthropicProvider(anthropic_config(fake_anthropic), KEY)
    fake_anthropic.next("plan", behaviour)
    fake_anthropic.next("synthesis", behaviour)
    try:
        with pytest.raises(ProviderError) as plan:
            await p.decompose(Prompt("plan", "Build a shop"), "claude-opus-4-6", "high")
        with pytest.raises(ProviderError) as answer:
            await p.synthesize(Prompt("persona", "facts"), "claude-sonnet-4-6")
    finally:
        await p.aclose()
    kind = "truncated" if behaviour == "max_tokens" else "refusal"
    assert (plan.value.kind, answer.value.kind) == (kind, kind)
    assert plan.value.usage is not None and answer.value.usage is not None  # billed all the same


def test_a_call_that_would_fail_the_same_way_again_is_not_retried() -> None:
    pe = ParallelExecutionConfig()  # 2 retries
    for kind in ("request", "truncated"):
        first = decide(pe, "codegen", 1, kind, 1000, model="claude-sonnet-4-6")
        assert first.final and first.strategy is Strategy.ESCALATE, kind
        assert decide(pe, "security", 1, kind, 1000).strategy is Strategy.SKIP
    assert decide(pe, "codegen", 1, "invalid_output", 1000).strategy is Strategy.RETRY  # a model may answer better


@pytest.mark.parametrize("switch", ["refusal", "model_unavailable"])
def test_a_declined_task_or_an_unknown_model_goes_to_the_other_model_and_never_back(switch: str) -> None:
    pe = ParallelExecutionConfig()  # codegen: claude-sonnet-4-6, falling back to claude-haiku-4-5
    sonnet, haiku = "claude-sonnet-4-6", "claude-haiku-4-5"
    declined = decide(pe, "codegen", 1, switch, 1000, model=sonnet)
    assert declined.strategy is Strategy.FALLBACK and not declined.final and declined.delay_s == 1
    assert model_for(pe, "codegen", 2, [switch]) == haiku  # the next attempt, not only the last
    assert model_for(pe, "codegen", 2, ["timeout"]) == sonnet
    assert decide(pe, "codegen", 2, switch, 1000, model=haiku).final  # declined by both, or unknown to both
    # The fallback model fails otherwise: the last attempt stays on it, and waits what its endpoint asked for.
    assert model_for(pe, "codegen", 3, [switch, "server"]) == haiku
    busy = decide(pe, "codegen", 2, "rate_limit", 1000, retry_after_s=7, model=haiku)
    assert busy.strategy is Strategy.RETRY and busy.delay_s == 7
    longer = ParallelExecutionConfig.model_validate({"retries": {"max_retries": 4}})
    assert [model_for(longer, "codegen", n, [switch, "server", "timeout", "invalid_output"][:n - 1])
            for n in range(2, 6)] == [haiku] * 4


def test_a_retry_waits_as_long_as_the_endpoint_asked_and_the_fallback_keeps_the_backoff() -> None:
    pe = ParallelExecutionConfig()  # 2 retries, backoff 1 s, 3 s
    first = decide(pe, "codegen", 1, "rate_limit", 1000, retry_after_s=7)
    assert first.strategy is Strategy.RETRY and first.delay_s == 7
    assert decide(pe, "codegen", 1, "rate_limit", 1000, retry_after_s=0.2).delay_s == 1  # never under the backoff
    assert decide(pe, "codegen", 1, "rate_limit", 10_000, retry_after_s=3600).delay_s == RETRY_AFTER_MAX_S
    last = decide(pe, "codegen", 2, "rate_limit", 1000, retry_after_s=7)  # on the lighter model: its own limits
    assert last.strategy is Strategy.FALLBACK and last.delay_s == 3
    # Asked to wait past the deadline: the lighter model now (its own limits), after the backoff's delay, instead of
    # the task giving up; already on it, there is no other model to go to.
    sonnet, haiku = "claude-sonnet-4-6", "claude-haiku-4-5"
    hurried = decide(pe, "codegen", 1, "rate_limit", 5, retry_after_s=7, model=sonnet)
    assert (hurried.strategy, hurried.final, hurried.delay_s) == (Strategy.FALLBACK, False, 1)
    assert model_for(pe, "codegen", 2, ["rate_limit"], [hurried.strategy]) == haiku
    assert model_for(pe, "codegen", 2, ["rate_limit"], ["retry"]) == sonnet
    assert decide(pe, "codegen", 1, "rate_limit", 100, retry_after_s=3600, model=sonnet).strategy is Strategy.FALLBACK
    assert decide(pe, "codegen", 1, "rate_limit", 5, retry_after_s=7, model=haiku).final
    assert decide(pe, "codegen", 1, "rate_limit", 0.5, retry_after_s=7, model=sonnet).final  # not even the backoff
