"""One exception base for the project; each message says what to do about it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class OpenClawError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(OpenClawError):
    """Configuration is missing or invalid; the message names what to set."""


class PlanError(OpenClawError):
    """A plan of tasks is not runnable (unknown pool, duplicate id, missing dependency, cycle). ``calls``: the model
    calls made for it (a decomposition), paid all the same, for the execution's cost."""

    def __init__(self, message: str, calls: list[Any] | None = None) -> None:
        super().__init__(message)
        self.calls = calls or []


def said(error: Mapping[str, Any]) -> str:
    """What one of pydantic's errors says, without the "Value error, " it puts before a validator's own words."""
    return str(error["msg"]).removeprefix("Value error, ")
