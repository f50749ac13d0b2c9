"""Auth mode: one NATS user per service, its permissions in ``deploy/nats/auth.conf``.

The same file is used by the local runner (``openclaw up --nats-auth``) and by the NATS Helm release on
Kubernetes. It holds no secret: each password is a variable that nats-server resolves from its own
environment (``OPENCLAW_NATS_PASSWORD_<SERVICE>``). The runner fills those in from its environment, or
with the fixed development passwords below — never use those outside a laptop or a test.

Permissions name the plain (production) streams and subjects, so auth mode runs in the empty namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from shared.errors import ConfigError

USERS = ("pm", "codegen", "security", "database", "aggregator", "gateway")
ACCOUNT = "OPENCLAW"  # the account every service user belongs to (KEDA's scaler names it)
# The one user allowed to *update* streams (a new replica count, say). The others may only create what is
# missing: update rights would let them rewrite a stream (its subjects, a subject transform) and so get
# around their publish permissions.
TOPOLOGY_OWNER = "pm"
DEFAULT_AUTH_FILE = Path(__file__).resolve().parent.parent / "deploy" / "nats" / "auth.conf"


def password_env(user: str) -> str:
    """The environment variable that carries ``user``'s password to nats-server (and to the runner)."""
    return f"OPENCLAW_NATS_PASSWORD_{user.upper()}"


def dev_password(user: str) -> str:
    """A fixed, public password for local runs and tests only."""
    return f"openclaw-dev-{user}"


def passwords(environ: Mapping[str, str]) -> dict[str, str]:
    """Each user's password: from ``OPENCLAW_NATS_PASSWORD_<USER>`` when set, else the dev default."""
    return {user: environ.get(password_env(user)) or dev_password(user) for user in USERS}


def server_env(pw: Mapping[str, str]) -> dict[str, str]:
    """Environment for a nats-server started with the auth file."""
    return {password_env(user): pw[user] for user in USERS}


def resolve_auth_file(path: str | Path | None) -> Path:
    """The auth file to use: ``path``, or the repository's ``deploy/nats/auth.conf``."""
    p = Path(path) if path else DEFAULT_AUTH_FILE
    if not p.is_file():
        raise ConfigError(f"NATS auth file {p} does not exist: pass --nats-auth FILE (deploy/nats/auth.conf)")
    return p.resolve()
