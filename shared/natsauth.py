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
from shared.names import POOLS, Names

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


# ---------------------------------------------------------------- the file, rendered from the topology

HEADER = """\
# NATS users of OpenClaw, one per service, each allowed only what it needs.
# GENERATED from shared/names.py by `openclaw nats-auth-conf` — edit shared/natsauth.py, not this file
# (a test fails when the two differ).
#
# ONE file for every place the system runs:
#   - local runner: `openclaw up --nats-auth` starts nats-server with `-c deploy/nats/auth.conf`;
#   - Kubernetes: the NATS Helm release includes it (deploy/nats/values.yaml, `config.merge.$include`),
#     installed with `--set-file 'configMap.merge.data.auth\\.conf=deploy/nats/auth.conf'`.
#
# No secret lives here. `$OPENCLAW_NATS_PASSWORD_<SERVICE>` are resolved by nats-server from its
# environment: on Kubernetes from the Secret `openclaw-nats-credentials`; under the runner from the
# runner's environment or the fixed development passwords `openclaw-dev-<service>` — dev only.
#
# Names are the production ones (empty OPENCLAW_NAMESPACE): auth mode runs without a namespace. Every
# service may create (when missing) and read the info of the streams and the KV bucket; only the
# topology owner may update them. Each user receives replies on its own inbox prefix `_INBOX_<user>`.
"""


def _durable(stream: str, durable: str, subject: str | None) -> list[str]:
    """What binding to one durable pull consumer takes: create it, read its info (queue gauges), fetch
    from it, ack its deliveries."""
    create = f"$JS.API.CONSUMER.CREATE.{stream}.{durable}" + (f".{subject}" if subject else "")
    return [create, f"$JS.API.CONSUMER.INFO.{stream}.{durable}", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>"]


def _dead_letters(n: Names, stream: str, consumer: str) -> list[str]:
    """Where a consumer puts the messages it refuses: a subject per message; and, so that an image rolled back
    to the version before still may, the consumer's one subject of that version."""
    every = n.dlq(stream, consumer, "*")
    return [every, every.removesuffix(".*")]


def permissions(names: Names | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """Each user's (publish, subscribe) allow-lists."""
    n = names or Names("")
    streams = [*n.all_streams, n.kv_stream]
    kv_read = [f"$JS.API.STREAM.MSG.GET.{n.kv_stream}", f"$JS.API.DIRECT.GET.{n.kv_stream}.>"]
    kv_write = [f"$KV.{n.kv_bucket}.>"]
    tasks = [n.tasks(p) for p in POOLS]
    events = n.events("*", "*")
    # following events from a point in the stream: an ordered (ephemeral) consumer on EVENTS
    follow = [f"$JS.API.CONSUMER.CREATE.{n.events_stream}", f"$JS.API.CONSUMER.CREATE.{n.events_stream}.>",
              f"$JS.API.CONSUMER.DELETE.{n.events_stream}.>", "$JS.FC.>"]

    def base(user: str) -> list[str]:
        verbs = ("CREATE", "UPDATE", "INFO") if user == TOPOLOGY_OWNER else ("CREATE", "INFO")
        return [f"$JS.API.STREAM.{v}.{s}" for s in streams for v in verbs]

    pub: dict[str, list[str]] = {
        "pm": [*_durable(n.executions_stream, n.pm_consumer, n.execution_requested), *kv_read, *kv_write,
               *tasks, events, *_dead_letters(n, n.executions_stream, n.pm_consumer)],
        "aggregator": [
            *_durable(n.results_stream, n.aggregator_consumer, n.results_all),
            *_durable(n.executions_stream, n.deadlines_consumer, n.execution_deadline),
            *_durable(n.executions_stream, n.cancels_consumer, n.execution_cancel),
            *_durable(n.advisories_stream, n.dead_letters_consumer, None),
            *kv_read, *kv_write, *tasks, events, n.results("*"), n.dlq_all,
            # dead letters: read the message a consumer gave up on, and drop it from the work queue
            *(f"$JS.API.STREAM.MSG.GET.{s}" for s in n.consumed_streams),
            # whether an execution finished long ago was announced (a redelivery past the duplicate window)
            f"$JS.API.STREAM.MSG.GET.{n.events_stream}",
            f"$JS.API.STREAM.MSG.DELETE.{n.tasks_stream}",
        ],
        "gateway": [*kv_read, *kv_write, n.execution_requested, n.execution_deadline_schedules, n.execution_cancel,
                    *follow],  # replaying an execution's events
    }
    for p in POOLS:
        # A pool follows the executions' endings and reads the execution state (to skip or abandon work of an
        # ended execution) but never writes it.
        pub[p] = [*_durable(n.tasks_stream, n.pool_consumer(p), n.tasks(p)), *kv_read, *follow, n.results("*"),
                  n.cost_event("*"), *_dead_letters(n, n.tasks_stream, n.pool_consumer(p))]
    sub = {u: [f"_INBOX_{u}.>"] for u in USERS}
    sub["gateway"].append(n.document("*"))  # each stored version of a document it waits on, as republished
    return {u: (base(u) + pub[u], sub[u]) for u in USERS}


def render(names: Names | None = None) -> str:
    """The auth file's text."""

    def strings(items: list[str], indent: str) -> str:
        return (",\n" + indent).join(f'"{i}"' for i in items)

    users = []
    for user, (pub, sub) in permissions(names).items():
        users.append(
            "      {\n"
            f"        user: {user}\n"
            f"        password: ${password_env(user)}\n"
            "        permissions: {\n"
            "          publish: { allow: [\n"
            f"            {strings(pub, '            ')}\n"
            "          ] }\n"
            f"          subscribe: {{ allow: [{strings(sub, ' ')}] }}\n"
            "        }\n"
            "      }"
        )
    return HEADER + f"\naccounts: {{\n  {ACCOUNT}: {{\n    jetstream: enabled\n    users: [\n" + "\n".join(
        users) + "\n    ]\n  }\n}\n"
