"""Property-based requests generated from the gateway's own OpenAPI document: none may end in a 5xx, and every
answer has a status code and a content type the document gives for it."""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance

from tests.conftest import Stack, start_stack, stop_stack, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fuzz_stack(nats_url: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("fuzz")
    # Short waits keep every generated request quick; latency 0 keeps generated executions cheap.
    cfg = write_config(tmp / "c.json", {"gateway": {"default_wait_s": 0.5, "max_wait_s": 1},
                                        "simulated": {"latency_s": {"codegen": 0, "security": 0, "database": 0}}})
    s = start_stack(nats_url, "fz" + uuid.uuid4().hex[:8], tmp, "--config", str(cfg))
    yield s
    assert stop_stack(s) == 0, s.output()[-3000:]


def test_no_generated_request_makes_the_gateway_fail(fuzz_stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_stack.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /api/execute-parallel", "POST /api/chat", "GET /api/execution/{execution_id}",
        "DELETE /api/execution/{execution_id}", "GET /api/execution/{execution_id}/events",
    }
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance],
                                  timeout=15)

        no_server_error()
