"""The real stack for a benchmark: ``shared.runner.Stack`` (what ``openclaw up`` runs) with its own
nats-server on free ports, a temporary data dir and a given config: on the simulated provider, or on the
anthropic provider for the cost part, which pays for its calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from shared.natsserver import free_port
from shared.runner import Stack, StackOptions

# Stack children inherit the environment: a real key must never turn a benchmark into paid calls, and no
# OPENCLAW_PROVIDER may change the provider the config names.
PROVIDER_ENV = ("ANTHROPIC_API_KEY", "OPENCLAW_ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENCLAW_PROVIDER")
KEY_ENV = ("ANTHROPIC_API_KEY", "OPENCLAW_ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")  # what the anthropic one keeps


def config_section(**overrides: Any) -> dict[str, Any]:
    """A ``parallel_execution`` section on the simulated provider; ``overrides`` replace top-level keys."""
    section: dict[str, Any] = {"provider": "simulated"}
    section.update(overrides)
    return section


@contextlib.asynccontextmanager
async def running_stack(section: dict[str, Any], *, log_level: str = "WARNING",
                        keep: Path | None = None) -> AsyncIterator[Stack]:
    """Start the stack with ``section`` as its config; stop it (and its nats-server) on exit."""
    kept = KEY_ENV if section["provider"] == "anthropic" else ()
    saved = {k: os.environ.pop(k) for k in PROVIDER_ENV if k in os.environ and k not in kept}
    with tempfile.TemporaryDirectory(prefix="openclaw-bench-") as tmp:
        data = keep or Path(tmp)
        config = data / "config.json"
        data.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps({"parallel_execution": section}))
        stack = Stack(StackOptions(
            data_dir=data / "stack",
            config=config,
            gateway_port=0,  # the runner binds a free port and hands it to the gateway
            nats_port=free_port(),
            log_level=log_level,
        ))
        try:
            await stack.start()
            await stack.wait_ready(60)
            await wait_all_ready(stack)
            yield stack
        finally:
            await stack.stop()
            os.environ.update(saved)


def service_pids(stack: Stack) -> dict[str, int]:
    """Every service process of the stack, from its ``stack.json`` (as an operator would find them)."""
    state = json.loads((stack.opts.data_dir / "stack.json").read_text())
    return {name: int(c["pid"]) for name, c in state["children"].items() if c.get("pid")}


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS in /proc/<pid>/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


async def wait_all_ready(stack: Stack, timeout: float = 60.0) -> None:
    """Until every child answers ``/readyz`` (the gateway alone being ready does not mean the pools are)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        for child in stack.children:
            while True:
                try:
                    if (await client.get(f"http://127.0.0.1:{child.port}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if loop.time() > deadline:
                    raise TimeoutError(f"{child.name} not ready after {timeout:g}s")
                await asyncio.sleep(0.1)
