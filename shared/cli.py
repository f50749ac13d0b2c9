"""``openclaw``: run the stack locally, submit work to it, look at an execution."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from shared import natsauth
from shared.errors import ConfigError
from shared.ops import HTTP_GRACE_S
from shared.runner import SERVICES, Stack, StackOptions, parse_replicas
from shared.schemas import Execution
from shared.settings import LOG_LEVELS, NATS_SCHEMES, SCHEME_RULE, Settings, load_settings

EXAMPLE = (
    "Build a restaurant website with online ordering: menu browsing, a cart and checkout with card "
    "payments, order tracking for customers, and an admin page to edit the menu."
)
TERMINAL = {"completed", "partial", "failed", "cancelled"}
TASK_EVENTS = {"started", "retrying", "task_completed", "task_failed", "skipped", "task_cancelled"}


def _line(at_s: float, pool: str, task_id: str, status: str, attempt: int | None, cost: float | None,
          error: str | None) -> str:
    """One task's state, ``at_s`` seconds into the execution."""
    extra = f" attempt {attempt}" if attempt else ""
    err = f" — {error}" if error and status != "completed" else ""
    return (f"  {at_s:6.1f}s  [{pool:<8}] {task_id:<16} {status:<9}{extra:<10}"
            f"  ${cost or 0.0:.4f}{err}")


def _message(r: httpx.Response) -> str:
    """The API's error message (its JSON shape), else the body as text."""
    try:
        return str(r.json()["message"])
    except (ValueError, KeyError, TypeError):
        return r.text


async def sse(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of a Server-Sent Events stream."""
    event, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


async def submit_and_follow(base_url: str, message: str, *, force_parallel: bool = False,
                            api_key: str | None = None) -> dict[str, Any]:
    """Submit ``message``, print each task's progress from the event stream, return the terminal document."""
    t0 = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(30, read=None)) as client:
        r = await client.post("/api/execute-parallel", json={"message": message, "force_parallel": force_parallel})
        if r.status_code >= 400:
            hint = " (give the key with --api-key or $OPENCLAW_API_KEY)" if r.status_code == 401 else ""
            raise RuntimeError(f"gateway refused the request ({r.status_code}): {_message(r)}{hint}")
        doc = r.json()
        print(f"execution {doc['execution_id']}: {doc['status']}, {len(doc['tasks'])} task(s) planned by "
              f"{doc.get('planner')}")
        for t in doc["tasks"]:
            print(_line(time.monotonic() - t0, t["pool"], t["id"], t["status"], None, None, None))
        async with client.stream("GET", f"/api/execution/{doc['execution_id']}/events") as events:
            async for kind, data in sse(events):
                body = json.loads(data)
                if kind == "completed":
                    final: dict[str, Any] = body["execution"]
                    return final
                if kind in TASK_EVENTS:
                    print(_line(time.monotonic() - t0, body["pool"], body["task_id"], body["status"],
                                body.get("attempt"), body.get("cost_usd"), body.get("error")))
    raise RuntimeError("the event stream ended before the execution did")


def print_final(doc: dict[str, Any]) -> None:
    print()
    print(f"=== {doc['status'].upper()} — ${doc['cost']['total_usd']:.4f} ===")
    print(doc.get("final_response") or doc.get("error") or "(no final response)")


async def _up(args: argparse.Namespace) -> int:
    settings = _settings(args)  # a bad config stops us here, before anything starts
    opts = StackOptions(
        data_dir=Path(args.data_dir),
        config=Path(args.config) if args.config else None,
        gateway_port=args.gateway_port,
        nats_url=args.nats_url,
        nats_port=args.nats_port,
        replicas=parse_replicas(args.replicas),
        namespace=args.namespace,
        nats_auth=natsauth.resolve_auth_file(args.nats_auth) if args.nats_auth is not None else None,
        log_format=args.log_format,
        log_level=args.log_level,
        stop_grace_s=settings.pe.shutdown_grace_s + HTTP_GRACE_S + 5,
    )
    stack = Stack(opts)
    loop = asyncio.get_running_loop()
    signalled: list[int] = []

    def stop(sig: int) -> None:
        signalled.append(sig)
        stack.stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        loop.add_signal_handler(sig, stop, sig)
    code = 0
    try:
        await stack.start()
        await stack.wait_ready()
        print(f"OpenClaw is up: {stack.gateway_url}  (API docs: {stack.gateway_url}/docs; Ctrl-C stops)", flush=True)
        if args.example:
            # The key a client of this gateway sends: $OPENCLAW_API_KEY, else the first of the keys it was given.
            key = os.environ.get("OPENCLAW_API_KEY") or first_key(settings.api_keys)
            following = asyncio.ensure_future(submit_and_follow(stack.gateway_url, EXAMPLE, force_parallel=True,
                                                                api_key=key))
            stopping = asyncio.ensure_future(stack.stopping.wait())
            await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not following.done():  # Ctrl-C, or the stack stopping under it: the example is not waited for
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await following
                if signalled:
                    logging.getLogger("openclaw").warning("interrupted before the example finished")
                    return 128 + signalled[0]
                raise RuntimeError("the stack stopped before the example finished (a service's log above says why)")
            doc = following.result()
            print_final(doc)
            code = 0 if doc["status"] in ("completed", "partial") else 1
        if not args.once:
            await stack.stopping.wait()
            if not signalled:  # stopped by itself: a child that may not be restarted, or nats-server
                logging.getLogger("openclaw").error("the stack stopped (the log above says why)")
                code = 2 if stack.misconfigured else 1
    except ConfigError as e:  # what to set: exit 2, like a bad config
        logging.getLogger("openclaw").error("%s", e)
        code = 2
    except (RuntimeError, TimeoutError) as e:
        if signalled:  # Ctrl-C during start-up: interrupted, not broken
            logging.getLogger("openclaw").warning("interrupted during start-up")
            code = 128 + signalled[0]
        else:
            logging.getLogger("openclaw").error("%s", e)
            code = 2 if stack.misconfigured else 1  # a service's configuration error is the stack's
    finally:
        await stack.stop()
    return code


async def _run(args: argparse.Namespace) -> int:
    doc = await submit_and_follow(args.url, args.message, force_parallel=args.force_parallel, api_key=args.api_key)
    print_final(doc)
    return 0 if doc["status"] in ("completed", "partial") else 1


async def _status(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, timeout=10, headers=headers) as client:
        r = await client.get(f"/api/execution/{args.execution_id}")
    if r.status_code != 200:
        raise RuntimeError(f"gateway answered {r.status_code}: {_message(r)}")
    doc = r.json()
    print(f"execution {doc['execution_id']}: {doc['status']} (planner {doc.get('planner')})")
    for line in task_lines(Execution.model_validate(doc)):
        print(line)
    if doc["status"] in TERMINAL:
        print_final(doc)
    return 0


def task_lines(ex: Execution) -> list[str]:
    """A line per task: the attempt its fields describe (the one that completed it, not a later delivery it
    superseded), and when that attempt last had news."""
    lines = []
    for t in ex.tasks:
        shown = t.shown()
        when = (shown.finished_at or shown.started_at) if shown else None
        at_s = (when - ex.created_at).total_seconds() if when else 0.0
        lines.append(_line(at_s, t.pool, t.id, t.status, shown.n if shown else None, t.cost_usd, t.error))
    return lines


async def _bench(args: argparse.Namespace) -> int:
    try:
        from bench.run import main as bench_main  # not in the service image: only a checkout has bench/
    except ImportError as e:
        raise ConfigError(f"openclaw bench needs a checkout of the repository with bench/ ({e})") from None
    try:
        return await bench_main(args)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _settings(args: argparse.Namespace) -> Settings:
    """The settings with the file given, else OPENCLAW_CONFIG's, as a service would load them."""
    return load_settings(**({"config": args.config} if args.config else {}))


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(f"{settings.config or '(built-in defaults)'}: valid")
    return 0


def _nats_auth_conf(args: argparse.Namespace) -> int:
    print(natsauth.render(), end="")
    return 0


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: a port number, 0 to 65535 (0: any free one)")
    return int(value)


def _nats_url(value: str) -> str:
    if not value.startswith(NATS_SCHEMES):
        raise argparse.ArgumentTypeError(f"{value!r}: {SCHEME_RULE}")
    return value


def _namespace(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9]*", value):
        raise argparse.ArgumentTypeError(f"{value!r}: lower-case letters and digits only")
    return value


def _gateway_url(value: str) -> str:
    """A gateway's address: http(s)://host[:port]."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not a URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.host or not 0 < (url.port or 80) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: give the gateway's address as http(s)://host[:port]")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openclaw", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start nats-server and every service locally")
    up.add_argument("--config", help="config.json with a parallel_execution section")
    up.add_argument("--data-dir", default=".openclaw", help="JetStream store and runner state (default .openclaw)")
    up.add_argument("--gateway-port", type=_port, default=8080)
    nats = up.add_mutually_exclusive_group()
    nats.add_argument("--nats-port", type=_port,
                      help="port of the local nats-server (default 4222; 0: any free port)")
    nats.add_argument("--nats-url", type=_nats_url, help="use this NATS server instead of starting one")
    up.add_argument("--replicas", default="", help=f"e.g. codegen=2,security=2 (services: {', '.join(SERVICES)})")
    up.add_argument("--namespace", default=os.environ.get("OPENCLAW_NAMESPACE", ""), type=_namespace,
                    help="prefix of every stream and subject (lower-case letters, digits; default: "
                         "$OPENCLAW_NAMESPACE)")
    up.add_argument("--nats-auth", nargs="?", const="", metavar="FILE",
                    help="one NATS user per service with least privilege, from FILE (default deploy/nats/auth.conf); "
                         "passwords from OPENCLAW_NATS_PASSWORD_<SERVICE> or fixed dev defaults")
    up.add_argument("--log-format", choices=("text", "json"), default="text")
    up.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    up.add_argument("--example", action="store_true", help="submit the restaurant-website example once ready")
    up.add_argument("--once", action="store_true", help="stop after the example instead of serving until Ctrl-C")
    up.set_defaults(func=_up)

    run = sub.add_parser("run", help="submit work to a running gateway and follow it")
    run.add_argument("message")
    run.add_argument("--url", default="http://127.0.0.1:8080", type=_gateway_url)
    run.add_argument("--force-parallel", action="store_true")
    run.add_argument("--api-key", default=os.environ.get("OPENCLAW_API_KEY"), help="default: $OPENCLAW_API_KEY")
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="show an execution")
    status.add_argument("execution_id")
    status.add_argument("--url", default="http://127.0.0.1:8080", type=_gateway_url)
    status.add_argument("--api-key", default=os.environ.get("OPENCLAW_API_KEY"), help="default: $OPENCLAW_API_KEY")
    status.set_defaults(func=_status)

    bench = sub.add_parser("bench", help="benchmark the real stack: speedup, overhead, throughput, load "
                                         "(writes bench/results.md and charts)")
    try:
        from bench.run import add_arguments
    except ImportError:  # an installed package without the repository's bench/: the command explains itself
        pass
    else:
        add_arguments(bench)
    bench.set_defaults(func=_bench)

    auth = sub.add_parser("nats-auth-conf", help="print the NATS users file (deploy/nats/auth.conf) for the topology")
    auth.set_defaults(func=_nats_auth_conf)

    check = sub.add_parser("check-config", help="validate a config file (default: OPENCLAW_CONFIG's) and exit")
    check.add_argument("config", nargs="?")
    check.set_defaults(func=_check_config)
    return p


def first_key(spec: SecretStr | None) -> str | None:
    """The first key of an ``OPENCLAW_API_KEYS`` value (``tenant=key,…``), if any."""
    for part in (spec.get_secret_value() if spec else "").split(","):
        if "=" in part:
            return part.split("=", 1)[1].strip()
    return None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.func in (_check_config, _nats_auth_conf):
            sys.exit(args.func(args))
        sys.exit(asyncio.run(args.func(args)))
    except KeyboardInterrupt:  # run, status, bench: interrupted, which is not success
        sys.exit(128 + signal.SIGINT)
    except ConfigError as e:
        print(f"openclaw: {e}", file=sys.stderr)
        sys.exit(2)
    except httpx.HTTPError as e:  # run / status: the gateway unreachable, or not speaking HTTP
        where = f" ({e.request.url})" if _has_request(e) else ""
        hint = "; is a gateway running there? `openclaw up` starts one, --url names another" if isinstance(
            e, httpx.ConnectError) else ""
        print(f"openclaw: {str(e) or type(e).__name__}{where}{hint}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # the gateway refusing
        print(f"openclaw: {str(e) or type(e).__name__}", file=sys.stderr)
        sys.exit(1)


def _has_request(e: httpx.HTTPError) -> bool:
    try:
        e.request  # noqa: B018 - raises when the error carries none
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    main()
