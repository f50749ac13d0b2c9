"""Process settings from the environment (``OPENCLAW_*``), shared by every service."""

from __future__ import annotations

import difflib
import os
import re
import socket
import ssl
from collections.abc import Mapping
from functools import cached_property
from typing import Literal

from pydantic import AliasChoices, Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.config import MISSING_API_KEY, ParallelExecutionConfig, load_config
from shared.errors import ConfigError, said
from shared.names import Names

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
NATS_SCHEMES = ("nats://", "tls://", "ws://", "wss://")
SCHEME_RULE = "must start with nats://, tls://, ws:// or wss://"


class Settings(BaseSettings):
    """Where to find NATS, the config file and the port to serve on."""

    model_config = SettingsConfigDict(env_prefix="OPENCLAW_", extra="ignore", frozen=True)

    nats_url: str = Field(
        default="nats://127.0.0.1:4222",
        validation_alias=AliasChoices("OPENCLAW_NATS_URL", "NATS_URL"),
    )
    nats_user: str | None = Field(default=None, pattern=r"^[a-z0-9_-]+$", description="NATS user (auth mode)")
    nats_password: SecretStr | None = Field(default=None, description="password of nats_user")
    nats_ca_file: FilePath | None = Field(default=None, description="PEM bundle of the CA(s) that signed the NATS "
                                          "server's certificate (TLS; default: the system's)")
    nats_cert_file: FilePath | None = Field(default=None, description="client certificate (PEM), for a server that "
                                            "verifies clients")
    nats_key_file: FilePath | None = Field(default=None, description="the client certificate's private key (PEM)")
    stream_replicas: int = Field(default=1, ge=1, le=5, description="replicas of every stream and the KV bucket")
    config: str | None = Field(default=None, description="path to config.json")
    namespace: str = Field(default="", pattern=r"^[a-z0-9]*$")
    host: str = "0.0.0.0"
    port: int | None = Field(default=None, ge=0, le=65535, description="HTTP port (default: per service)")
    api_keys: SecretStr | None = Field(default=None, description="tenant=key,tenant=key; unset: local mode")
    provider: Literal["auto", "simulated", "anthropic"] | None = Field(
        default=None, description="replaces parallel_execution.provider of config.json (prod: anthropic, so that a "
        "missing or empty ANTHROPIC_API_KEY stops the services rather than running them on the simulated provider)")
    listen_fd: int | None = Field(default=None, ge=0, description="a listening socket inherited from the runner")
    slots: int | None = Field(default=None, ge=1, description="tasks one pool replica runs at once "
                              "(default: the pool's max_concurrent; the broker caps the pool as a whole)")
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    log_format: str = Field(default="json", pattern=r"^(json|text)$")
    anthropic_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "OPENCLAW_ANTHROPIC_API_KEY")
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        level = {"WARN": "WARNING"}.get(v.upper(), v.upper())
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("nats_url")
    @classmethod
    def _nats_scheme(cls, v: str) -> str:
        if not v.startswith(NATS_SCHEMES):
            raise ValueError(SCHEME_RULE)
        return v

    @model_validator(mode="after")
    def _user_and_password(self) -> Settings:
        if (self.nats_user is None) != (self.nats_password is None):
            raise ValueError("set OPENCLAW_NATS_USER and OPENCLAW_NATS_PASSWORD together (or neither)")
        if self.nats_user is not None and self.namespace:
            raise ValueError("OPENCLAW_NAMESPACE cannot be combined with OPENCLAW_NATS_USER: the NATS users' "
                             "permissions name the production subjects and streams (unset one of them)")
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if (self.nats_cert_file is None) != (self.nats_key_file is None):
            raise ValueError("set OPENCLAW_NATS_CERT_FILE and OPENCLAW_NATS_KEY_FILE together (or neither)")
        _ = self.nats_tls  # unreadable PEM files fail here, at start-up (and the context is built once)
        return self

    @cached_property
    def nats_tls(self) -> ssl.SSLContext | None:
        """The TLS context for NATS: with a ``tls://`` URL or any TLS file set; None for plain ``nats://``."""
        if not (self.nats_url.startswith("tls://") or self.nats_ca_file or self.nats_cert_file):
            return None
        try:
            ctx = ssl.create_default_context(cafile=self.nats_ca_file)
        except (ssl.SSLError, ValueError) as e:
            raise ValueError(f"OPENCLAW_NATS_CA_FILE {self.nats_ca_file}: not a PEM certificate bundle ({e})") from None
        if self.nats_cert_file is not None:
            try:
                ctx.load_cert_chain(self.nats_cert_file, self.nats_key_file)
            except ssl.SSLError as e:
                raise ValueError(f"OPENCLAW_NATS_CERT_FILE / OPENCLAW_NATS_KEY_FILE: not a certificate and its key "
                                 f"in PEM ({e})") from None
        return ctx

    @property
    def nats_inbox_prefix(self) -> str:
        """Replies come back under a per-user inbox, so the auth file can keep each user's replies private."""
        return f"_INBOX_{self.nats_user}" if self.nats_user else "_INBOX"

    @cached_property
    def names(self) -> Names:
        return Names(self.namespace)

    @cached_property
    def pe(self) -> ParallelExecutionConfig:
        pe = load_config(self.config)
        return pe.model_copy(update={"provider": self.provider}) if self.provider else pe


def _variable(loc: tuple[int | str, ...]) -> str:
    """The environment variable behind an error's location (an aliased field's is its variable already)."""
    name = ".".join(map(str, loc)).upper()
    return name if name.startswith("OPENCLAW_") else f"OPENCLAW_{name}"


# OPENCLAW_* variables read elsewhere: the command line's client key, the NATS auth file's passwords (resolved by
# nats-server), the test suite's switch to Docker.
READ_ELSEWHERE = ("OPENCLAW_API_KEY", "OPENCLAW_TEST_DOCKER")
READ_ELSEWHERE_PREFIX = "OPENCLAW_NATS_PASSWORD_"
# What Kubernetes puts into every pod of a namespace for each Service whose name starts with openclaw- (service
# links, when enableServiceLinks is left on): OPENCLAW_GATEWAY_SERVICE_HOST, OPENCLAW_GATEWAY_PORT_8080_TCP, ...
SERVICE_LINK = re.compile(r"OPENCLAW(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)"
                          r"(_(PROTO|PORT|ADDR))?)|OPENCLAW_[A-Z0-9_]+_PORT")


def variables() -> set[str]:
    """Every OPENCLAW_* variable Settings reads."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c for c in alias.choices if isinstance(c, str) and c.startswith("OPENCLAW_")}
        else:
            names.add(f"OPENCLAW_{name.upper()}")
    return names


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """OPENCLAW_* variables nothing reads (a misspelt name would otherwise leave its setting at the default),
    each with the known name it most resembles."""
    known = variables()
    # The services' own settings only, compared without the prefix every one of them shares.
    suffixes = sorted(v.removeprefix("OPENCLAW_") for v in known)
    out = []
    for key in sorted(environ):
        name = key.upper()  # pydantic-settings reads the environment case-insensitively
        if (not name.startswith("OPENCLAW_") or name in known or name in READ_ELSEWHERE
                or name.startswith(READ_ELSEWHERE_PREFIX) or SERVICE_LINK.fullmatch(name)):
            continue
        near = difflib.get_close_matches(name.removeprefix("OPENCLAW_"), suffixes, n=1, cutoff=0.75)
        out.append(f"{key} (did you mean OPENCLAW_{near[0]}?)" if near else key)
    return out


def load_settings(models: bool = True, **overrides: object) -> Settings:
    """Settings from env plus overrides; config errors surface here, at start-up. ``models``: for a process that
    calls models, which needs ANTHROPIC_API_KEY when the provider is ``anthropic`` (the gateway calls none)."""
    unknown = unknown_variables(os.environ)
    if unknown:
        raise ConfigError(f"unknown environment variable(s): {', '.join(unknown)}; the variables read are listed "
                          "in the README (Configuration)")
    try:
        s = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        bad = "; ".join(f"{_variable(x['loc'])}: {said(x)}" if x["loc"] else said(x) for x in e.errors())
        raise ConfigError(f"invalid environment: {bad}") from None
    pe = s.pe  # loads and validates config.json now
    if models and pe.provider == "anthropic" and not s.anthropic_api_key:
        raise ConfigError(MISSING_API_KEY)
    return s
