"""The parallel_execution config model: seed defaults, strict validation, file and env loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cli import main
from shared.config import ParallelExecutionConfig, load_config
from shared.errors import ConfigError
from shared.settings import load_settings
from tests.conftest import write_config


def test_defaults_follow_the_seed() -> None:
    pe = ParallelExecutionConfig()
    assert pe.enabled is True and pe.max_tasks_per_execution == 6
    pools = pe.worker_pools
    assert (pools.codegen.max_concurrent, pools.codegen.timeout) == (3, 300)
    assert (pools.security.max_concurrent, pools.security.timeout) == (2, 300)
    assert (pools.database.max_concurrent, pools.database.timeout) == (2, 180)
    assert pe.pm_coordinator.decomposition_model == "claude-opus-4-6"
    assert pe.result_aggregation.conflict_resolution == "security_first"
    assert pe.retries.max_retries == 2
    assert [pe.retries.delay(n) for n in (1, 2, 3, 4)] == [1.0, 3.0, 9.0, 9.0]


def test_file_overrides_and_ignores_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"gateway": {"port": 1}, "parallel_execution": {"worker_pools": '
                    '{"codegen": {"max_concurrent": 5, "timeout": 60}}}}')
    pe = load_config(path)
    assert pe.worker_pools.codegen.max_concurrent == 5 and pe.worker_pools.codegen.timeout == 60
    assert pe.worker_pools.security.max_concurrent == 2
    # A pool's section changes what it names, the rest of that pool keeps its defaults.
    path.write_text('{"parallel_execution": {"worker_pools": {"database": {"max_concurrent": 4}}}}')
    pools = load_config(path).worker_pools
    assert pools.database.max_concurrent == 4 and pools.database.timeout == 180
    assert pools.database.model == "claude-sonnet-4-6" and pools.codegen.max_concurrent == 3
    # So do prices and simulated latencies: a model of one's own is one entry, not every price again.
    path.write_text('{"parallel_execution": {"pricing": {"my-model": {"input": 1, "output": 2}, '
                    '"claude-sonnet-4-6": {"input": 2, "output": 10}}, "simulated": {"latency_s": {"codegen": 0.1}}}}')
    pe = load_config(path)
    assert pe.price("my-model").output == 2 and pe.price("claude-sonnet-4-6").input == 2
    assert pe.price("claude-opus-4-6").output == 25  # built in, kept
    assert pe.simulated.latency_s == {"codegen": 0.1, "security": 0.9, "database": 0.7, "pm": 0.0}


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"max_tasks_per_execution": 0}, "parallel_execution.max_tasks_per_execution: Input should be greater"),
        ({"worker_pools": {"codegen": {"max_concurrent": 3, "timeout": "long"}}},
         "parallel_execution.worker_pools.codegen.timeout: Input should be a valid number"),
        ({"pm_coordinator": {"reasoning_effort": "extreme"}}, "parallel_execution.pm_coordinator.reasoning_effort"),
        ({"worker_pools": {"codegen": {"max_concurrent": 1, "timeout": 1, "model": "gpt"}}},
         "pricing has no entry for model(s) ['gpt']"),
        ({"simulated": {"latency_s": {"frontend": 1}}}, "unknown role(s) ['frontend']"),
        ({"ack_wait_s": 30, "announce_start_after_s": 20}, "announce_start_after_s (20) must be at most ack_wait_s"),
        ({"ack_wait_s": 3, "coalesce_results_s": 2}, "coalesce_results_s (2) must be at most ack_wait_s / 3 (1)"),
        ({"coalesce_results_s": -1}, "parallel_execution.coalesce_results_s: Input should be greater than or equal"),
        # Valid JSON numbers that no consumer could be made with: every service crash-looped on them.
        ({"ack_wait_s": 1e300}, "parallel_execution.ack_wait_s: Input should be less than or equal to 86400"),
        ({"ack_wait_s": 0.5}, "parallel_execution.ack_wait_s: Input should be greater than or equal to 1"),
        ({"shutdown_grace_s": float("inf")}, "parallel_execution.shutdown_grace_s: Input should be a finite number"),
        ({"retries": {"backoff_s": [-5]}}, "parallel_execution.retries.backoff_s.0: Input should be greater than or"),
        # JSON's own types only: a string is no boolean, a boolean no count.
        ({"enabled": "yes"}, "parallel_execution.enabled: Input should be a valid boolean"),
        ({"max_tasks_per_execution": True}, "parallel_execution.max_tasks_per_execution: Input should be a valid int"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, section: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path / "c.json", section))
    assert says in str(err.value)
    assert str(tmp_path / "c.json") in str(err.value)


def test_a_file_without_the_section_is_reported_not_taken_for_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text('{"parallel_executon": {"max_tasks_per_execution": 2}}')
    with pytest.raises(ConfigError, match="has no parallel_execution section \\(its top-level keys: "
                                          "'parallel_executon'\\); add one, \\{\\} for the defaults"):
        load_config(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"parallel_execution": {}, "gateway_ui": {"theme": "dark"}}')
    assert load_config(tmp_path / "c.json") == load_config(None)  # other programs' sections are theirs


def test_a_file_that_is_not_json_text_is_reported(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(tmp_path / "c.json")
    (tmp_path / "c.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(tmp_path / "c.json")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} cannot be read: Is a directory"):
        load_config(tmp_path)


def test_settings_read_openclaw_config_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "c.json", {"max_tasks_per_execution": 2})
    monkeypatch.setenv("OPENCLAW_CONFIG", str(cfg))
    monkeypatch.setenv("OPENCLAW_NAMESPACE", "abc")
    s = load_settings()
    assert s.pe.max_tasks_per_execution == 2
    assert s.names.tasks("codegen") == "abc.tasks.codegen" and s.names.tasks_stream == "abc_TASKS"


def test_check_config_validates_the_file_a_service_would_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_config(tmp_path / "bad.json", {"max_tasks_per_execution": 0})
    good = write_config(tmp_path / "good.json", {"max_tasks_per_execution": 4})
    monkeypatch.setenv("OPENCLAW_CONFIG", str(bad))
    with pytest.raises(SystemExit) as out:
        main(["check-config"])  # no file named: OPENCLAW_CONFIG's, as the services read it
    assert out.value.code == 2 and "max_tasks_per_execution" in capsys.readouterr().err
    with pytest.raises(SystemExit) as out:
        main(["check-config", str(good)])  # a file named: that one
    assert out.value.code == 0 and capsys.readouterr().out == f"{good}: valid\n"
    monkeypatch.delenv("OPENCLAW_CONFIG")
    with pytest.raises(SystemExit) as out:
        main(["check-config"])
    assert out.value.code == 0 and capsys.readouterr().out == "(built-in defaults): valid\n"


def test_bad_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCLAW_NATS_URL", "http://nats:4222")
    with pytest.raises(ConfigError, match="environment: OPENCLAW_NATS_URL: must start with nats://"):
        load_settings()
    monkeypatch.delenv("OPENCLAW_NATS_URL")
    monkeypatch.setenv("OPENCLAW_LOG_LEVEL", "loud")  # every service crash-looped on it
    with pytest.raises(ConfigError, match="environment: OPENCLAW_LOG_LEVEL: must be one of DEBUG"):
        load_settings()


def test_a_misspelt_variable_stops_start_up_naming_the_one_meant(monkeypatch: pytest.MonkeyPatch) -> None:
    # OPENCLAW_API_KEYZ on the gateway was ignored, which left it in local mode: open.
    monkeypatch.setenv("OPENCLAW_NATS_URI", "nats://nats:4222")
    monkeypatch.setenv("openclaw_strem_replicas", "3")  # read case-insensitively, so refused so too
    with pytest.raises(ConfigError, match=r"unknown environment variable\(s\): OPENCLAW_NATS_URI \(did you mean "
                       r"OPENCLAW_NATS_URL\?\), openclaw_strem_replicas \(did you mean OPENCLAW_STREAM_REPLICAS\?\)"):
        load_settings()
    monkeypatch.delenv("OPENCLAW_NATS_URI")
    monkeypatch.delenv("openclaw_strem_replicas")
    monkeypatch.setenv("OPENCLAW_FOO", "1")  # like nothing: no guess (OPENCLAW_PORT shares only the prefix)
    with pytest.raises(ConfigError, match=r"variable\(s\): OPENCLAW_FOO; the variables read are listed"):
        load_settings()
    monkeypatch.delenv("OPENCLAW_FOO")
    # The gateway's keys, not the command line's one (which leaves the gateway open in local mode).
    monkeypatch.setenv("OPENCLAW_API_KEYZ", "acme=k-0123456789abcdef")
    with pytest.raises(ConfigError, match=r"OPENCLAW_API_KEYZ \(did you mean OPENCLAW_API_KEYS\?\)"):
        load_settings()
    monkeypatch.delenv("OPENCLAW_API_KEYZ")
    # Read by others (the command line, the NATS auth file, the tests), or put there by Kubernetes for a Service.
    for key in ("OPENCLAW_API_KEY", "OPENCLAW_NATS_PASSWORD_CODEGEN", "OPENCLAW_TEST_DOCKER",
                "OPENCLAW_GATEWAY_SERVICE_HOST", "OPENCLAW_GATEWAY_SERVICE_PORT", "OPENCLAW_GATEWAY_SERVICE_PORT_HTTP",
                "OPENCLAW_GATEWAY_PORT", "OPENCLAW_GATEWAY_PORT_8080_TCP", "OPENCLAW_GATEWAY_PORT_8080_TCP_ADDR",
                # a Service named openclaw itself
                "OPENCLAW_SERVICE_HOST", "OPENCLAW_SERVICE_PORT_HTTP", "OPENCLAW_PORT_8080_TCP_PROTO"):
        monkeypatch.setenv(key, "x")
    monkeypatch.setenv("OPENCLAW_STREAM_REPLICAS", "3")
    assert load_settings().stream_replicas == 3


def test_a_namespace_with_nats_users_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # The users' permissions name the production subjects: every request was refused, retried, and the service
    # reported only that JetStream was not available.
    for key, value in {"OPENCLAW_NAMESPACE": "staging", "OPENCLAW_NATS_USER": "codegen",
                       "OPENCLAW_NATS_PASSWORD": "secret"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="OPENCLAW_NAMESPACE cannot be combined with OPENCLAW_NATS_USER"):
        load_settings()


# A Secret made from an unset variable (or a file from `echo "$UNSET"`): the gateway ran in local mode, every caller
# one tenant, unlimited.
@pytest.mark.parametrize("keys", ["", " , ", "\n"], ids=["empty", "only-commas", "a-newline"])
def test_api_keys_set_but_empty_stop_the_gateway_at_start_up(monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    from services.gateway.service import create_app

    monkeypatch.setenv("OPENCLAW_API_KEYS", keys)
    with pytest.raises(ConfigError, match="OPENCLAW_API_KEYS is set but empty: give tenant=key pairs"):
        create_app(load_settings(models=False))
    monkeypatch.delenv("OPENCLAW_API_KEYS")
    assert create_app(load_settings(models=False)).state.api_keys.local_mode  # unset: local mode, as documented

    # One letter short, the command line's key: the gateway would have run open.
    monkeypatch.setenv("OPENCLAW_API_KEY", "acme-k-0123456789")
    with pytest.raises(ConfigError, match="OPENCLAW_API_KEY is set and OPENCLAW_API_KEYS is not"):
        create_app(load_settings(models=False))
    monkeypatch.setenv("OPENCLAW_API_KEYS", "acme=acme-k-0123456789")
    assert not create_app(load_settings(models=False)).state.api_keys.local_mode


def test_one_key_for_two_tenants_stops_the_gateway_at_start_up() -> None:
    from services.gateway.access import ApiKeys

    key = "shared-key-0123456789"
    with pytest.raises(ConfigError, match="gives tenant 'globex' a key another tenant has already"):
        ApiKeys(f"acme={key}, globex={key}")
    assert ApiKeys(f"acme={key}, globex={key}x").identify(key).tenant == "acme"  # type: ignore[union-attr]
    # Local mode's one tenant: a keyed tenant of that name would be anyone's after a restart without keys.
    with pytest.raises(ConfigError, match="names a tenant 'local', the name local mode gives every caller"):
        ApiKeys(f"acme={key}, local={key}x")


@pytest.mark.parametrize("key", ["clé-secrète-0123456789", "two words-0123456789", "tab\there-0123456789"])
def test_a_key_no_header_can_carry_stops_the_gateway_at_start_up(key: str) -> None:
    # Starlette reads a header's bytes as latin-1 and the key is hashed as UTF-8: such a key would never match.
    from services.gateway.access import ApiKeys

    with pytest.raises(ConfigError, match="gives tenant 'acme' a key with a character other than printable ASCII"):
        ApiKeys(f"acme={key}")
