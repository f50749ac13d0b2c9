"""One exception base for the project; each message says what to do about it."""


class OpenClawError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(OpenClawError):
    """Configuration is missing or invalid; the message names what to set."""


class PlanError(OpenClawError):
    """A plan of tasks is not runnable (unknown pool, duplicate id, missing dependency, cycle)."""
