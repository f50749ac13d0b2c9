"""``openclaw bench``: start the real stack, measure, write ``bench/results.md``, the charts and the README table."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bench import measure
from bench.plans import SCENARIOS, Scenario
from bench.stack import config_section, running_stack
from shared.config import ParallelExecutionConfig, describe_errors, load_config
from shared.errors import ConfigError

log = logging.getLogger("openclaw.bench")

DEFAULT_LIMITS = {"codegen": 3, "security": 2, "database": 2}  # the seed's pools, as the default config has them
WIDE_POOLS = {p: {"max_concurrent": 128, "timeout": 300} for p in DEFAULT_LIMITS}
PARTS = ("speedup", "overhead", "routing", "throughput", "load", "soak")  # on the simulated provider
MODEL_PARTS = ("cost",)  # on the anthropic provider: paid calls
PROVIDERS = ("simulated", "anthropic")


@dataclass
class Options:
    time_factor: float = 0.02
    runs: int = 3
    overhead_n: int = 300
    throughput_n: int = 2000
    throughput_runs: int = 3
    concurrency: int = 64
    load_executions: int = 10
    load_tasks: int = 10
    load_latency_s: float = 2.0
    soak_n: int = 1000
    soak_warmup: int = 300
    routing_n: int = 20000
    scenarios: tuple[str, ...] = tuple(s.name for s in SCENARIOS)
    parts: tuple[str, ...] = PARTS
    out: Path = Path("bench")
    readme: Path | None = None
    charts: bool = True
    command: str = ""
    provider: str = "simulated"
    # The cost part's stack config (a --config file's parallel_execution section, or the defaults) and how long a
    # request waits for its execution: made and checked once, by options_from.
    cost_stack: tuple[dict[str, Any], float] | None = None


@dataclass
class Results:
    options: Options
    machine: dict[str, Any]
    load_before: float = 0.0
    load_after: float = 0.0
    seconds: float = 0.0
    scenarios: list[measure.ScenarioResult] = field(default_factory=list)
    costs: list[measure.ScenarioResult] = field(default_factory=list)  # the cost part: requests the PM planned
    overhead: measure.Overhead | None = None
    primitives: measure.Primitives | None = None
    routing_ms: list[float] = field(default_factory=list)
    throughput: measure.Throughput | None = None  # the median run of throughput_runs
    throughput_rates: list[float] = field(default_factory=list)  # executions/s of every run, ascending
    load: measure.Load | None = None
    soak: measure.Soak | None = None


def _scenarios(names: tuple[str, ...]) -> list[Scenario]:
    known = {s.name: s for s in SCENARIOS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}: choose from {sorted(known)}")
    return [known[n] for n in names]


async def measure_all(opts: Options) -> Results:
    """Every part asked for: on a stack with the default pool limits, then on one with wide limits (load,
    throughput), and the soak on a fresh one of its own."""
    res = Results(opts, measure.machine(), load_before=measure.load_average())
    t0 = time.monotonic()
    if "routing" in opts.parts:
        log.info("routing: %d decisions", opts.routing_n)
        res.routing_ms = measure.run_routing(opts.routing_n)
    if {"speedup", "overhead"} & set(opts.parts):
        # The default limit of 6 tasks a plan, raised for the marketplace's twelve.
        most = max([6, *(len(s.steps) for s in _scenarios(opts.scenarios))])
        async with running_stack(config_section(max_tasks_per_execution=most)) as stack:
            if "speedup" in opts.parts:
                for scenario in _scenarios(opts.scenarios):
                    log.info("speedup: %s × %d runs, time factor %g", scenario.name, opts.runs, opts.time_factor)
                    res.scenarios.append(
                        await measure.run_scenario(stack, scenario, opts.time_factor, opts.runs, DEFAULT_LIMITS))
            if "overhead" in opts.parts:
                log.info("overhead: %d sequential zero-latency fan-outs", opts.overhead_n)
                res.overhead = await measure.run_overhead(stack, opts.overhead_n)
                res.primitives = await measure.run_primitives(stack, document=res.overhead.document)
    wide = config_section(worker_pools=WIDE_POOLS, max_tasks_per_execution=max(10, opts.load_tasks))
    if {"throughput", "load"} & set(opts.parts):
        async with running_stack(wide) as stack:
            if "load" in opts.parts:
                log.info("load: %d executions × %d tasks at once", opts.load_executions, opts.load_tasks)
                res.load = await measure.run_load(stack, opts.load_executions, opts.load_tasks, opts.load_latency_s)
            if "throughput" in opts.parts:
                log.info("throughput: %d × %d executions, %d in flight", opts.throughput_runs, opts.throughput_n,
                         opts.concurrency)
                runs = sorted([await measure.run_throughput(stack, opts.throughput_n, opts.concurrency)
                               for _ in range(opts.throughput_runs)], key=lambda t: t.per_s)
                res.throughput, res.throughput_rates = runs[len(runs) // 2], [t.per_s for t in runs]
                res.throughput.errors = sum(t.errors for t in runs)
    if "cost" in opts.parts:  # the PM's model plans each request; the aggregator's writes each answer
        section, wait_s = opts.cost_stack or model_section(None)
        async with running_stack(section) as stack:
            for scenario in _scenarios(opts.scenarios):
                log.info("cost: %s × %d runs, planned by the model", scenario.name, opts.runs)
                res.costs.append(await measure.run_scenario(stack, scenario, 1.0, opts.runs, DEFAULT_LIMITS,
                                                            planned=False, wait_s=wait_s))
    if "soak" in opts.parts:  # a stack of its own: its warm-up is the only work before it
        async with running_stack(wide) as stack:
            log.info("soak: %d executions after %d of warm-up", opts.soak_n, opts.soak_warmup)
            res.soak = await measure.run_soak(stack, opts.soak_n, opts.concurrency, opts.soak_warmup)
    res.seconds = time.monotonic() - t0
    res.load_after = measure.load_average()
    return res


def model_section(config: Path | None) -> tuple[dict[str, Any], float]:
    """The cost part's config: ``config``'s ``parallel_execution`` section (its models, prices, pools; validated)
    or the defaults, on the anthropic provider, with a gateway that waits as long as an execution may run."""
    pe = load_config(config)
    section = json.loads(config.read_text())["parallel_execution"] if config else {}
    wait_s = pe.execution_timeout_s
    gateway = {**section.get("gateway", {}), "max_wait_s": wait_s,
               "default_wait_s": min(pe.gateway.default_wait_s, wait_s)}
    merged = config_section(**{**section, "provider": "anthropic", "gateway": gateway})
    try:
        ParallelExecutionConfig.model_validate(merged)
    except ValidationError as e:  # told now, not by a stack that does not start
        raise ConfigError(f"config {config or '(the defaults)'} with the bench's gateway waits: "
                          f"{describe_errors(e)}") from None
    return merged, wait_s


def write_outputs(res: Results) -> Path:
    """results.md (+ charts) under ``out``; the README's benchmark table when asked."""
    from bench import report

    opts = res.options
    opts.out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    if opts.charts:
        from bench import charts

        figures = charts.draw_all(res, opts.out)
    path = opts.out / "results.md"
    path.write_text(report.results_markdown(res, figures))
    if opts.readme is not None:
        report.update_readme(opts.readme, report.readme_section(res, path))
    return path


def add_arguments(p: Any) -> None:
    """The ``openclaw bench`` options (an argparse parser)."""
    d = Options()
    p.add_argument("--time-factor", type=float, default=d.time_factor,
                   help=f"seed seconds × this = simulated latency (default {d.time_factor}: 240 s → 4.8 s)")
    p.add_argument("--runs", type=int, default=d.runs,
                   help=f"runs of each scenario, parallel and serial (default {d.runs})")
    p.add_argument("--scenarios", default=",".join(d.scenarios), help="comma-separated: " + ", ".join(d.scenarios))
    p.add_argument("--provider", choices=PROVIDERS, default=d.provider,
                   help="simulated (default; free); anthropic: the cost part, the PM planning each scenario's "
                        "request and the aggregator answering with the configured models, paid with "
                        "ANTHROPIC_API_KEY: --runs × 2 executions a scenario")
    p.add_argument("--config", default=None,
                   help="with --provider anthropic: a config.json whose parallel_execution section (models, "
                        "pricing, pools) the cost part runs with (default: the built-in defaults)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated parts: {', '.join(PARTS)} (simulated; all by default); "
                        f"{', '.join(MODEL_PARTS)} (anthropic; the default there)")
    p.add_argument("--overhead-n", type=int, default=d.overhead_n)
    p.add_argument("--throughput-n", type=int, default=d.throughput_n)
    p.add_argument("--throughput-runs", type=int, default=d.throughput_runs, help="the median run is reported")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="executions in flight (throughput, soak)")
    p.add_argument("--soak-n", type=int, default=d.soak_n)
    p.add_argument("--soak-warmup", type=int, default=d.soak_warmup)
    p.add_argument("--out", default=None,
                   help=f"where results.md and the charts go (default {d.out}/, with --provider anthropic "
                        f"{d.out / 'anthropic'}/)")
    p.add_argument("--readme", default=None, help="also replace the table between the bench markers of this README")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts (no matplotlib needed)")


def options_from(args: Any) -> Options:
    anthropic = args.provider == "anthropic"
    allowed = MODEL_PARTS if anthropic else PARTS
    parts = tuple(x for x in (args.only or ",".join(allowed)).split(",") if x)
    bad = [x for x in parts if x not in allowed]
    if bad and anthropic:
        raise ValueError(f"part(s) {bad} time simulated latencies: with --provider anthropic choose from "
                         f"{', '.join(MODEL_PARTS)}")
    if bad:
        raise ValueError(f"unknown part(s) {bad}: choose from {', '.join(PARTS)}"
                         + (" (the cost part needs --provider anthropic: the simulated provider calls no model)"
                            if set(bad) & set(MODEL_PARTS) else ""))
    if anthropic and not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("OPENCLAW_ANTHROPIC_API_KEY")):
        raise ValueError("--provider anthropic makes paid calls with your key: set ANTHROPIC_API_KEY")
    if args.readme and anthropic:
        raise ValueError("--readme is for the simulated run: the README quotes its table, not a paid run's")
    if args.config and not anthropic:
        raise ValueError("--config is for --provider anthropic: the simulated parts run with their own configs")
    # A bad file is told now, not by a stack that does not start.
    cost_stack = model_section(Path(args.config) if args.config else None) if anthropic else None
    if not args.no_charts and importlib.util.find_spec("matplotlib") is None:  # found out now, not after the run
        raise ValueError("the charts need matplotlib, from the bench extra: `make bench`, or "
                         "`pip install -e '.[bench]'`; or pass --no-charts")
    return Options(
        time_factor=args.time_factor, runs=args.runs, overhead_n=args.overhead_n,
        throughput_n=args.throughput_n, throughput_runs=args.throughput_runs, concurrency=args.concurrency,
        soak_n=args.soak_n,
        soak_warmup=args.soak_warmup, scenarios=tuple(x for x in args.scenarios.split(",") if x), parts=parts,
        out=Path(args.out) if args.out else Options.out / "anthropic" if anthropic else Options.out,
        readme=Path(args.readme) if args.readme else None, charts=not args.no_charts,
        command="openclaw bench" + "".join(f" {shlex.quote(a)}" for a in sys.argv[2:]), provider=args.provider,
        cost_stack=cost_stack,
    )


async def main(args: Any) -> int:
    opts = options_from(args)
    res = await measure_all(opts)
    path = write_outputs(res)
    from bench import report

    print(report.summary_table(res))  # noqa: T201 - the command's output
    print(f"\nwritten: {path}")  # noqa: T201
    return 0
