"""The measurements, each against a running stack through its REST API (real HTTP, real NATS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import nats
from nats.js.api import ConsumerConfig, StreamConfig

from bench.bound import critical_path, greedy, lower_bound, optimum
from bench.plans import FAN_OUT_6, Scenario, fan_out
from bench.stack import rss_kib, service_pids
from shared.distributor import distribute
from shared.natsserver import binary
from shared.runner import Stack
from shared.schemas import Execution

Doc = dict[str, Any]


# ---------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nats = subprocess.run([binary(), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        nats = "nats-server (version unknown)"
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "nats": nats.replace("nats-server: ", "nats-server "),
    }


def load_average() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- helpers


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


WAIT_S = 600.0  # how long a request waits for its execution: far beyond any simulated run


def client(stack: Stack, connections: int = 32, wait_s: float = WAIT_S) -> aiohttp.ClientSession:
    """The load generator's HTTP client (aiohttp: about a quarter of httpx's CPU per request here)."""
    return aiohttp.ClientSession(base_url=stack.gateway_url, connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=wait_s + 30))


async def execute(http: aiohttp.ClientSession, message: str, tasks: list[dict[str, Any]] | None,
                  mode: str = "parallel", timeout_s: float = WAIT_S) -> tuple[float, Doc]:
    """POST with wait=true; the client-side wall time and the terminal execution document. ``tasks`` None: the
    PM plans the request."""
    body = {"message": message, "tasks": tasks, "mode": mode, "wait": True, "timeout_s": timeout_s}
    t0 = time.perf_counter()
    async with http.post("/api/execute-parallel", json=body) as r:
        raw = await r.read()
    elapsed = time.perf_counter() - t0
    if r.status != 200:
        raise RuntimeError(f"execution not finished: HTTP {r.status}: {raw[:300]!r}")
    doc: Doc = json.loads(raw)
    return elapsed, doc


def attempts(doc: Doc) -> list[dict[str, Any]]:
    """Every attempt of every task, with its task id and pool, times in seconds since the execution's creation."""
    t0 = ts(doc["created_at"])
    out = []
    for task in doc["tasks"]:
        for a in task.get("attempts") or []:
            if a.get("started_at") and a.get("finished_at"):
                out.append({"task": task["id"], "pool": task["pool"], "n": a["n"], "worker": a.get("worker"),
                            "outcome": a.get("outcome"), "start": ts(a["started_at"]) - t0,
                            "finish": ts(a["finished_at"]) - t0})
    return out


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(f, -1) for _, f in intervals], key=lambda e: (e[0], e[1]))
    best = now = 0
    for _, d in edges:
        now += d
        best = max(best, now)
    return best


# ---------------------------------------------------------------- speedup vs the bound


@dataclass
class ScenarioResult:
    scenario: Scenario
    factor: float
    limits: dict[str, int]
    parallel_s: list[float] = field(default_factory=list)
    serial_s: list[float] = field(default_factory=list)
    parallel_docs: list[Doc] = field(default_factory=list)
    serial_docs: list[Doc] = field(default_factory=list)

    @property
    def work_s(self) -> float:
        return self.scenario.serial_seconds * self.factor

    def bounds(self) -> dict[str, float]:
        d, deps, pools = self.scenario.durations(self.factor), self.scenario.deps(), self.scenario.pools()
        return {
            "critical_path": critical_path(d, deps),
            "lower_bound": lower_bound(d, deps, pools, self.limits),
            "greedy": greedy(d, deps, pools, self.limits).makespan,
            "optimum": optimum(d, deps, pools, self.limits).makespan,
        }

    @property
    def parallel(self) -> float:
        return statistics.median(self.parallel_s)

    @property
    def serial(self) -> float:
        return statistics.median(self.serial_s)

    @property
    def speedup(self) -> float:
        return self.serial / self.parallel

    @property
    def bound_speedup(self) -> float:
        return self.work_s / self.bounds()["optimum"]

    @property
    def vs_bound(self) -> float:
        """How far the measured parallel time is above the optimum, as a fraction of it."""
        return self.parallel / self.bounds()["optimum"] - 1


async def run_scenario(stack: Stack, scenario: Scenario, factor: float, runs: int,
                       limits: dict[str, int], planned: bool = True, wait_s: float = WAIT_S) -> ScenarioResult:
    """``runs`` × (parallel, serial) of the same plan, alternating which goes first. ``planned`` False: the
    scenario's request alone, for the PM to plan (on the anthropic provider, its model; each run its own plan)."""
    result = ScenarioResult(scenario, factor, limits)
    plan = scenario.plan(factor) if planned else None
    async with client(stack, wait_s=wait_s) as http:
        for i in range(runs):
            for mode in (("parallel", "serial") if i % 2 == 0 else ("serial", "parallel")):
                elapsed, doc = await execute(http, scenario.message, plan, mode, wait_s)
                # A model's run may end partial or failed (a refusal, a cut-off answer): what it cost still counts.
                if planned and doc["status"] != "completed":
                    failures = {t["id"]: t["error"] for t in doc["tasks"] if t.get("error")}
                    raise RuntimeError(f"{scenario.name} ({mode}) ended {doc['status']}: "
                                       f"{doc.get('error') or failures}")
                (result.parallel_s if mode == "parallel" else result.serial_s).append(elapsed)
                (result.parallel_docs if mode == "parallel" else result.serial_docs).append(doc)
    return result


# ---------------------------------------------------------------- orchestration overhead


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVER = "nats-server"  # the broker's process, named beside the services'


def stack_pids(stack: Stack, client: bool = True) -> dict[str, int]:
    """Every service process, the nats-server (when the stack started one) and, with ``client``, this process."""
    pids = service_pids(stack)
    if stack.server is not None and stack.server.proc is not None:
        pids[SERVER] = stack.server.proc.pid
    if client:
        pids["client"] = os.getpid()
    return pids


@dataclass
class Overhead:
    samples_ms: list[float]
    server_ms: list[float]  # finished_at − created_at, as the execution records it
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per execution, by process
    document: bytes = b""  # the last probe's final document, as the gateway returned it

    def stat(self, p: float, server: bool = False) -> float:
        return percentile(self.server_ms if server else self.samples_ms, p)


async def run_overhead(stack: Stack, n: int, warmup: int = 20) -> Overhead:
    """Sequential 6-task fan-outs of zero-latency agents: everything measured is orchestration.

    The simulated work on the critical path is 0, so the overhead is the whole end-to-end time.
    """
    plan = fan_out(FAN_OUT_6, 0.0)
    out = Overhead([], [])
    pids = stack_pids(stack)
    async with client(stack, 4) as http:
        for i in range(warmup + n):
            if i == warmup:
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            elapsed, doc = await execute(http, "overhead probe: 6-task fan-out", plan)
            if doc["status"] != "completed":
                raise RuntimeError(f"overhead probe ended {doc['status']}")
            if i >= warmup:
                out.samples_ms.append(elapsed * 1000)
                out.server_ms.append((ts(doc["finished_at"]) - ts(doc["created_at"])) * 1000)
    out.cpu_ms = {name: (cpu_seconds(pid) - before[name]) / n * 1000 for name, pid in pids.items()}
    out.document = json.dumps(doc).encode()
    return out


# ---------------------------------------------------------------- throughput


@dataclass
class Throughput:
    concurrency: int
    executions: int
    tasks: int
    seconds: float
    errors: int
    latency_ms: list[float]
    cpu_pct: dict[str, float] = field(default_factory=dict)  # of one core, by process, during the run
    warmup: int = 0  # executions run before, not measured

    @property
    def per_s(self) -> float:
        return self.executions / self.seconds

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds


async def run_concurrent(stack: Stack, n: int, concurrency: int, plan: list[dict[str, Any]],
                         message: str = "throughput probe") -> tuple[Throughput, list[Doc]]:
    """``n`` executions of ``plan``, at most ``concurrency`` in flight; errors are counted, not raised."""
    sem = asyncio.Semaphore(concurrency)
    docs: list[Doc] = []
    latencies: list[float] = []
    errors = 0

    async def one(http: aiohttp.ClientSession) -> None:
        nonlocal errors
        async with sem:
            try:
                elapsed, doc = await execute(http, message, plan)
            except (RuntimeError, aiohttp.ClientError):
                errors += 1
                return
            if doc["status"] != "completed":
                errors += 1
            latencies.append(elapsed * 1000)
            docs.append(doc)

    async with client(stack, concurrency) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(http) for _ in range(n)))
        seconds = time.perf_counter() - t0
    done = sum(1 for d in docs if d["status"] == "completed")
    return Throughput(concurrency, done, done * len(plan), seconds, errors, latencies), docs


async def run_throughput(stack: Stack, n: int, concurrency: int) -> Throughput:
    plan = fan_out(FAN_OUT_6, 0.0)
    warmup = min(100, n)
    await run_concurrent(stack, warmup, concurrency, plan)
    pids = stack_pids(stack)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result, _ = await run_concurrent(stack, n, concurrency, plan)
    result.cpu_pct = {name: (cpu_seconds(pid) - before[name]) / result.seconds * 100 for name, pid in pids.items()}
    result.warmup = warmup
    return result


# ---------------------------------------------------------------- load and soak


@dataclass
class Load:
    executions: int
    tasks: int
    completed: int
    errors: int
    max_concurrent_tasks: int
    seconds: float


async def run_load(stack: Stack, executions: int, tasks_each: int, latency_s: float) -> Load:
    """``executions`` at once, ``tasks_each`` independent tasks each: all tasks should run at the same time."""
    per_pool = {"codegen": 0, "security": 0, "database": 0}
    for i in range(tasks_each):
        per_pool[("codegen", "security", "database")[i % 3]] += 1
    plan = fan_out(per_pool, latency_s)
    result, docs = await run_concurrent(stack, executions, executions, plan, "load probe")
    intervals = []
    for doc in docs:
        t0 = ts(doc["created_at"])
        intervals += [(a["start"] + t0, a["finish"] + t0) for a in attempts(doc)]
    return Load(executions, executions * tasks_each, result.executions, result.errors, max_overlap(intervals),
                result.seconds)


@dataclass
class Soak:
    executions: int
    errors: int
    seconds: float
    rss_kib: list[tuple[int, dict[str, int]]]  # (executions done, {service: RSS})

    def growth(self) -> dict[str, float]:
        """Per service: (RSS at the end − RSS after warm-up) / RSS after warm-up."""
        first, last = self.rss_kib[0][1], self.rss_kib[-1][1]
        return {s: (last[s] - first[s]) / first[s] for s in first if s in last}


async def run_soak(stack: Stack, n: int, concurrency: int, warmup: int, samples: int = 10) -> Soak:
    """``warmup`` executions, then ``n`` more in ``samples`` slices, RSS of every service (and of the nats-server
    the stack started, if it did) after each slice."""
    pids = stack_pids(stack, client=False)
    plan = fan_out(FAN_OUT_6, 0.0)
    await run_concurrent(stack, warmup, concurrency, plan, "soak warm-up")
    series = [(0, {name: rss_kib(pid) for name, pid in pids.items()})]
    errors, seconds, done = 0, 0.0, 0
    for i in range(samples):
        size = n // samples + (1 if i < n % samples else 0)
        result, _ = await run_concurrent(stack, size, concurrency, plan, "soak")
        errors += result.errors
        seconds += result.seconds
        done += size
        series.append((done, {name: rss_kib(pid) for name, pid in pids.items()}))
    if service_pids(stack).items() - pids.items():
        raise RuntimeError("a service restarted during the soak: its memory figures would mean nothing")
    return Soak(n, errors, seconds, series)


# ---------------------------------------------------------------- routing


ROUTING_MESSAGES = (
    "Build a restaurant website with online ordering",
    "Audit the login flow for CSRF and SQL injection",
    "Migrate our MySQL 5.7 database to PostgreSQL 16 without downtime",
    "Add a dashboard page with React components for the order history",
    "Design the schema for reservations, menu items and inventory, with indexes",
    "Make the checkout PCI compliant and encrypt the customers' passwords",
    "Write a poem about the sea",
    "Refactor the backend API endpoints and add rate limiting; review access control",
)


# ---------------------------------------------------------------- primitives


@dataclass
class Primitives:
    """What one messaging step costs here (µs, medians): the floor under the orchestration overhead."""

    publish_us: float  # JetStream publish, waiting for the stream's ack
    kv_write_us: float  # compare-and-set write of a 12 kB document
    kv_read_us: float  # read of that document
    hop_us: float  # publish → delivered to a pull consumer fetching on another connection
    n: int
    wakeup_us: float = 0.0  # one byte there and back through pipes between two processes: the machine's wake-up cost
    # Parsing and re-serialising an execution's final document: back to back, and right after sleeping ASLEEP_S.
    work_us: tuple[float, float] = (0.0, 0.0)
    document_bytes: int = 0

    def floor_ms(self) -> float:
        """An execution's critical path in primitives: 3 hops (request → PM, task → pool, result →
        aggregator) and 3 document writes in sequence (create, plan, final; the gateway hears of the final one
        as the bucket republishes it, as its writer hears the acknowledgement)."""
        return (3 * self.hop_us + 3 * self.kv_write_us) / 1000


def wakeup_round_trip_us(n: int = 2000) -> float:
    """Median time for one byte to reach a child process through a pipe and come back: two wake-ups of a
    sleeping process, the unit every hop between services pays (and that virtualisation makes dear)."""
    child = subprocess.Popen([sys.executable, "-c", "import os\nwhile os.read(0, 1): os.write(1, b'x')"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    out, back = child.stdin.fileno(), child.stdout.fileno()
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(out, b"x")
            os.read(back, 1)
            times.append(time.perf_counter() - t0)
    finally:
        child.stdin.close()
        child.wait(10)
        child.stdout.close()
    return statistics.median(times) * 1e6


ASLEEP_S = 0.005


def work_after_sleep_us(document: bytes, n: int = 200) -> tuple[float, float]:
    """Median time to parse and re-serialise ``document`` (an execution), back to back and right after
    sleeping ``ASLEEP_S``. Every step of a sequential execution starts in a service that was asleep."""

    def once() -> float:
        t0 = time.perf_counter()
        Execution.model_validate_json(document).model_dump_json()
        return time.perf_counter() - t0

    for _ in range(20):
        once()
    hot = [once() for _ in range(n)]
    after_sleep = []
    for _ in range(n):
        time.sleep(ASLEEP_S)
        after_sleep.append(once())
    return statistics.median(hot) * 1e6, statistics.median(after_sleep) * 1e6


async def run_primitives(stack: Stack, n: int = 300, document: bytes = b"") -> Primitives:
    """Time the bare steps with nats-py against the stack's own nats-server, on a stream and bucket of
    their own (removed afterwards), while the stack is idle."""
    stream, bucket, subject = "BENCH_PRIMITIVES", "bench_primitives", "bench.primitives"
    pub_nc, sub_nc = await nats.connect(stack.nats_url), await nats.connect(stack.nats_url)
    js = pub_nc.jetstream()
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{subject}.>"]))
        kv = await js.create_key_value(bucket=bucket)
        doc = b"x" * 12_000

        async def timed(step: Callable[[int], Awaitable[object]]) -> float:
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                await step(i)
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6

        publish_us = await timed(lambda i: js.publish(f"{subject}.pub", b"x", headers={"Nats-Msg-Id": str(i)}))
        revision = [await kv.put("doc", doc)]

        async def write(_: int) -> None:
            revision[0] = await kv.update("doc", doc, last=revision[0])

        kv_write_us = await timed(write)
        kv_read_us = await timed(lambda _: kv.get("doc"))

        await js.add_consumer(stream, ConsumerConfig(durable_name="hop", filter_subject=f"{subject}.hop"))
        sub = await sub_nc.jetstream().pull_subscribe_bind("hop", stream=stream)
        hops: list[float] = []

        async def consume() -> None:
            while len(hops) < n:
                with contextlib.suppress(TimeoutError):
                    for m in await sub.fetch(1, timeout=5):
                        hops.append(time.perf_counter() - float(m.data))
                        await m.ack()

        consumer = asyncio.create_task(consume())
        for _ in range(n):
            await js.publish(f"{subject}.hop", str(time.perf_counter()).encode())
            await asyncio.sleep(0.002)  # pacing: one message in flight at a time, as on a sequential path
        await asyncio.wait_for(consumer, 30)
        wakeup_us = await asyncio.to_thread(wakeup_round_trip_us)
        work_us = await asyncio.to_thread(work_after_sleep_us, document) if document else (0.0, 0.0)
        return Primitives(publish_us, kv_write_us, kv_read_us, statistics.median(hops) * 1e6, n, wakeup_us,
                          work_us, len(document))
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        with contextlib.suppress(Exception):
            await js.delete_key_value(bucket)
        await sub_nc.close()
        await pub_nc.close()


def run_routing(n: int) -> list[float]:
    """``distribute`` (rule-based routing) timings in ms, over a mix of short and long requests."""
    long = " ".join(ROUTING_MESSAGES) * 4  # ~1.7 kB: a long client request
    texts = [*ROUTING_MESSAGES, long]
    for t in texts:
        distribute(t)  # warm the regex cache
    out = []
    for i in range(n):
        text = texts[i % len(texts)]
        t0 = time.perf_counter()
        distribute(text)
        out.append((time.perf_counter() - t0) * 1000)
    return out


# ---------------------------------------------------------------- cost


def cost_by_phase(doc: Doc) -> dict[str, float]:
    phases = doc["cost"].get("by_phase") or {}
    return {k: float(phases.get(k, 0.0)) for k in ("tasks", "decomposition", "synthesis")}


def by_the_models(doc: Doc) -> bool:
    """Whether models planned and answered this execution: its plan is the decomposition model's and a synthesis
    call succeeded. After a fallback to the rules or the template, either extra is $0: no measurement."""
    return doc.get("planner") == "llm" and any(c["phase"] == "synthesis" and not c.get("error") for c in doc["calls"])


def cost_overhead(result: ScenarioResult, models: bool = False) -> dict[str, float]:
    """Medians over the runs: the parallel and serial totals, the parallel runs' tasks and decomposition +
    synthesis, and the share of each parallel execution's total that those two make (``models``: only of the
    executions models planned and answered; ``measured`` says how many)."""
    par = [cost_by_phase(d) for d in result.parallel_docs]
    ser = [cost_by_phase(d) for d in result.serial_docs]

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    par_total = statistics.median(sum(r.values()) for r in par)
    ser_total = statistics.median(sum(r.values()) for r in ser)
    shares = [(r["decomposition"] + r["synthesis"]) / total
              for r, d in zip(par, result.parallel_docs, strict=True)
              if (total := sum(r.values())) and (by_the_models(d) or not models)]
    return {
        "parallel_total": par_total,
        "serial_total": ser_total,
        "tasks": med(par, "tasks"),
        "extra": med(par, "decomposition") + med(par, "synthesis"),
        "extra_share": statistics.median(shares) if shares else 0.0,
        "measured": len(shares),
        "difference": (par_total - ser_total) / ser_total if ser_total else 0.0,
    }


def rss_now(stack: Stack) -> dict[str, int]:
    return {name: rss_kib(pid) for name, pid in service_pids(stack).items()}
