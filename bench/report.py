"""Markdown for ``bench/results.md`` and for the README's benchmark section."""

from __future__ import annotations

import statistics
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bench.measure import (
    ASLEEP_S,
    SERVER,
    Doc,
    Overhead,
    Primitives,
    ScenarioResult,
    by_the_models,
    cost_overhead,
    percentile,
)

if TYPE_CHECKING:
    from bench.run import Results

README_START = "<!-- bench:start (written by `make bench`; edit bench/report.py, not this table) -->"
README_END = "<!-- bench:end -->"
OK, MISS = "yes", "**no**"

TARGETS = {
    "bound": 0.01,  # parallel within 1 % of the optimum
    "large": 1.5,
    "allows": 2.0,
    "overhead_p50": 8.0,
    "overhead_p99": 30.0,
    "throughput": 200.0,
    "routing_p99": 1.0,
    "cost": 0.02,
    "rss": 0.05,
}


def machine_line(res: Results) -> str:
    m = res.machine
    return f"{m['cores']} cores, {m['cpu']}, Python {m['python']}, {m['nats']}"


def caption(res: Results, runs: str) -> str:
    """What every figure states: the machine, the command, the run count."""
    return f"{machine_line(res)} · `{res.options.command or 'openclaw bench'}` · {runs}"


def _met(ok: bool) -> str:
    return OK if ok else MISS


def _s(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.2f} s"


def summary_rows(res: Results) -> list[tuple[str, str, str, str]]:
    """(what, target, measured, met) for every target of issue 7 that was measured."""
    rows: list[tuple[str, str, str, str]] = []
    for r in res.scenarios:
        b = r.bounds()["optimum"]
        name = r.scenario.title
        excess = r.parallel - b
        at_seed = excess / (b / r.factor)  # the same milliseconds on the seed's own time scale
        rows.append((f"{name}: parallel vs the bound ({_s(b)})", "within 1 %",
                     f"{_s(r.parallel)}, {r.vs_bound * 100:+.1f} % ({excess * 1000:+.0f} ms; "
                     f"{at_seed * 100:+.2f} % at the seed's scale)",
                     _met(r.vs_bound <= TARGETS["bound"])))
        if r.scenario.large:
            target, ok = "≥ 1.5× (large project)", r.speedup >= TARGETS["large"]
        elif r.bound_speedup >= TARGETS["allows"] - 1e-9:  # 2.0× in floating point may come out a hair under
            exactly = " exactly" if r.bound_speedup < TARGETS["allows"] + 5e-4 else ""
            target = f"≥ 2.0× (the plan allows {r.bound_speedup:.3f}×{exactly})"
            ok = r.speedup >= TARGETS["allows"]
        else:
            target = f"the plan allows {r.bound_speedup:.3f}× (under 2.0×): within 1 % of it"
            ok = r.speedup >= r.bound_speedup / (1 + TARGETS["bound"])
        rows.append((f"{name}: speedup over serial", target,
                     f"{r.speedup:.3f}× ({_s(r.serial)} → {_s(r.parallel)})", _met(ok)))
    if res.overhead:
        o = res.overhead
        p50, p99 = o.stat(50), o.stat(99)
        what = "Orchestration overhead, 6-task fan-out, zero-latency agents"
        rows.append((f"{what}: p50", "≤ 8 ms", f"{p50:.1f} ms", _met(p50 <= TARGETS["overhead_p50"])))
        rows.append((f"{what}: p99", "≤ 30 ms", f"{p99:.1f} ms", _met(p99 <= TARGETS["overhead_p99"])))
    if res.throughput:
        t = res.throughput
        rows.append((f"Throughput, 6-task zero-latency executions, {t.concurrency} in flight (pool limits 128)",
                     "≥ 200 executions/s",
                     f"{t.per_s:.0f} executions/s = {t.tasks_per_s:.0f} tasks/s ({t.errors} errors); "
                     f"median of {_runs(res.throughput_rates)}",
                     _met(t.per_s >= TARGETS["throughput"] and t.errors == 0)))
    if res.routing_ms:
        p99 = percentile(res.routing_ms, 99)
        rows.append(("Routing decision (rule-based `distribute`), p99", "< 1 ms",
                     f"{p99 * 1000:.0f} µs (p50 {percentile(res.routing_ms, 50) * 1000:.0f} µs)",
                     _met(p99 < TARGETS["routing_p99"])))
    if res.costs:
        what = "Cost overhead: decomposition + synthesis, share of a parallel execution's cost (anthropic provider)"
        by_title = {r.scenario.title: cost_overhead(r, models=True) for r in res.costs}
        unmeasured = [k for k, c in by_title.items() if not c["measured"]]
        if unmeasured:  # a fallback to the rules or the template makes the extra $0: nothing was measured
            rows.append((what, "≤ 2 %", f"not measured: no execution of {', '.join(unmeasured)} was both planned "
                         "and answered by the models (see the cost section)", "n/a"))
        else:
            title = max(by_title, key=lambda k: by_title[k]["extra_share"])
            c = by_title[title]
            rows.append((what, "≤ 2 %", f"{c['extra_share'] * 100:.1f} % at most ({title}; the median over the "
                         f"{c['measured']:.0f} parallel executions the models planned and answered)",
                         _met(c["extra_share"] <= TARGETS["cost"])))
    elif res.scenarios:
        # Not a measurement on this provider: it plans by rules and answers by template, at no cost (see the section).
        costs = [cost_overhead(r) for r in res.scenarios]
        worst = max(c["extra_share"] for c in costs)
        rows.append(("Cost overhead of parallel over serial (decomposition + synthesis)", "≤ 2 %",
                     f"not measurable on the simulated provider: {worst * 100:.1f} % by construction (no "
                     "decomposition or synthesis call is made)", "n/a"))
    if res.load:
        ld = res.load
        rows.append((f"Load: {ld.executions} concurrent executions, {ld.tasks} concurrent tasks", "no error",
                     f"{ld.completed}/{ld.executions} completed, {ld.errors} errors, "
                     f"{ld.max_concurrent_tasks} tasks running at once",
                     _met(ld.errors == 0 and ld.completed == ld.executions)))
    if res.soak:
        sk = res.soak
        growth = sk.growth()
        services = {name: g for name, g in growth.items() if name != SERVER}
        worst_service = max(services, key=lambda s: services[s])
        server = f"; nats-server {growth[SERVER] * 100:+.0f} % (the messages it keeps)" if SERVER in growth else ""
        rows.append((f"Soak: {sk.executions} executions on a fresh stack, RSS growth of every service after "
                     f"{res.options.soak_warmup} of warm-up", "< 5 %",
                     f"max {services[worst_service] * 100:+.1f} % ({worst_service}); {sk.errors} errors{server}",
                     _met(services[worst_service] < TARGETS["rss"] and sk.errors == 0)))
    return rows


def summary_table(res: Results) -> str:
    lines = ["| measure | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(res)]
    return "\n".join(lines)


def scenario_table(results: list[ScenarioResult]) -> str:
    lines = [
        "| scenario | tasks | serial work | critical path | lower bound | **bound** (optimum under the limits) "
        "| parallel (measured) | serial (measured) | speedup | bound allows | parallel − bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r.bounds()
        lines.append(
            f"| {r.scenario.title} | {len(r.scenario.steps)} | {_s(r.work_s)} | {_s(b['critical_path'])} "
            f"| {_s(b['lower_bound'])} | **{_s(b['optimum'])}** | {_s(r.parallel)} | {_s(r.serial)} "
            f"| {r.speedup:.3f}× | {r.bound_speedup:.3f}× | {(r.parallel - b['optimum']) * 1000:+.0f} ms "
            f"({r.vs_bound * 100:+.1f} %) |"
        )
    return "\n".join(lines)


def plan_table(r: ScenarioResult) -> str:
    lines = ["| task | pool | seed s | depends on |", "|---|---|---|---|"]
    for s in r.scenario.steps:
        lines.append(f"| {s.id} | {s.pool} | {s.seconds:g} | {', '.join(s.depends_on) or '—'} |")
    return "\n".join(lines)


def overhead_section(o: Overhead) -> str:
    cpu = " · ".join(f"{k} {v:.1f}" for k, v in sorted(o.cpu_ms.items(), key=lambda kv: -kv[1]))
    return (
        f"{len(o.samples_ms)} sequential executions (after 20 of warm-up). End-to-end through the gateway "
        f"(POST with `wait: true`, client clock): p50 **{o.stat(50):.1f} ms**, p90 {o.stat(90):.1f} ms, "
        f"p99 **{o.stat(99):.1f} ms**, max {max(o.samples_ms):.1f} ms, mean {statistics.fmean(o.samples_ms):.1f} ms. "
        f"As the execution records it (`finished_at − created_at`, i.e. without HTTP and the gateway's own work): "
        f"p50 {o.stat(50, True):.1f} ms, p99 {o.stat(99, True):.1f} ms.\n\n"
        f"CPU per execution, ms, by process: {cpu} (total {sum(o.cpu_ms.values()):.1f} ms)."
    )


def _runs(rates: list[float]) -> str:
    return f"{len(rates)} runs ({min(rates):.0f}–{max(rates):.0f})" if len(rates) > 1 else "1 run"


def primitives_section(p: Primitives) -> str:
    return (
        "The floor under it, measured on the same nats-server with the same client library (nats-py), "
        f"medians of {p.n}: an acknowledged JetStream publish {p.publish_us:.0f} µs, a compare-and-set write of "
        f"a 12 kB document {p.kv_write_us:.0f} µs, reading it {p.kv_read_us:.0f} µs, and one hop — publish → "
        f"delivered to a pull consumer on another connection — {p.hop_us:.0f} µs. One execution's critical path "
        "has three hops in sequence (request → PM, task → pool, result → aggregator) and three document writes "
        "(the gateway's create, the plan, the final answer, which reaches the gateway as the bucket republishes "
        f"it): **{p.floor_ms():.1f} ms** "
        "before any service code, HTTP or a second process on the same core. Each hop wakes sleeping "
        f"processes: one byte through a pipe to another process and back took {p.wakeup_us:.0f} µs in this run."
        + (f" And a process that was asleep works slower: parsing and re-serialising the final document "
           f"({p.document_bytes / 1000:.0f} kB) took {p.work_us[0]:.0f} µs back to back, {p.work_us[1]:.0f} µs "
           f"right after sleeping {ASLEEP_S * 1000:g} ms (medians of 200) — and every step of a sequential "
           "execution starts in a service that was asleep." if p.document_bytes else "")
    )


def results_markdown(res: Results, figures: dict[str, str]) -> str:
    o = res.options
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmark results",
        "",
        f"Measured {when} in {res.seconds:.0f} s on **{machine_line(res)}**; load average "
        f"{res.load_before:.2f} before, {res.load_after:.2f} after (the machine is shared: other work ran "
        "beside the benchmark). Command: `" + (o.command or "openclaw bench") + "`.",
        "",
        "Everything is the real system started by `shared.runner.Stack` (what `openclaw up` runs): its own "
        "nats-server (JetStream, file store) on free ports, the six services as processes (log level WARNING), "
        + ("the anthropic provider (the configured models through the Messages API; paid calls), "
           if o.provider == "anthropic" else "the simulated provider (`context.simulate.latency_s` per task), ")
        + "requests over HTTP to the gateway "
        "(`POST /api/execute-parallel` with `wait: true`, aiohttp). Times are medians of the runs unless "
        "a percentile is named.",
        "",
        "## Summary",
        "",
        summary_table(res),
        "",
    ]
    if o.provider == "simulated":
        out += ["Where the targets are missed, what the profiles showed and what was changed because of them: "
                "[PROFILE.md](PROFILE.md) (written by hand; this file is regenerated by every run).", ""]
    if res.scenarios:
        out += [
            "## Parallel vs serial vs the bound",
            "",
            f"Each scenario is a client plan (`tasks` with pools, `depends_on` and simulated latencies = seed "
            f"seconds × {o.time_factor:g}), submitted {o.runs}× as is and {o.runs}× with `\"mode\": \"serial\"` "
            "(the same plan, one task at a time in plan order), alternating which goes first. Pool limits are "
            "the defaults: codegen 3, security 2, database 2.",
            "",
            scenario_table(res.scenarios),
            "",
            "- **critical path**: the longest dependency chain, ignoring the pool limits.",
            "- **lower bound**: max(critical path, each pool's work ÷ its limit).",
            "- **bound**: the best any scheduler could do under the pool limits — the exact minimum makespan, "
            "computed by `bench/bound.py` (branch and bound over the serial schedule-generation scheme, which "
            "generates every active schedule and so an optimal one; it returns the system's own non-delay FIFO "
            "list schedule at once when that already meets the lower bound). For these plans the system's "
            "FIFO policy reaches the optimum, so the whole gap to the bound is orchestration time.",
            "- **parallel − bound**: what the orchestration costs on top of the work: each dependency level "
            "adds one hop (result → aggregator → KV → released task → pool). It is a fixed number of "
            "milliseconds, so its share shrinks as the time factor grows: at the seed's scale (factor 1) the "
            "same milliseconds are a fraction of a percent.",
            "",
        ]
        for r in res.scenarios:
            out += [f"**{r.scenario.title}** ({r.scenario.note}):", "", plan_table(r), ""]
        if "speedup" in figures:
            out += [f"![parallel vs serial vs bound]({figures['speedup']})", ""]
        if "gantt" in figures:
            out += [
                "### Worker pool activity (one execution of each mode)",
                "",
                "Drawn from the recorded attempt timings (`GET /api/execution/{id}` → "
                "`tasks[].attempts[].started_at/finished_at/worker`): a lane per pool, a bar per attempt.",
                "",
                f"![gantt]({figures['gantt']})",
                "",
            ]
    if res.overhead:
        out += ["## Orchestration overhead", "", overhead_section(res.overhead), ""]
        if res.primitives:
            out += [primitives_section(res.primitives), ""]
        if "overhead" in figures:
            out += [f"![overhead]({figures['overhead']})", ""]
    if res.throughput:
        t = res.throughput
        out += [
            "## Throughput",
            "",
            f"{len(res.throughput_rates)} runs of {res.options.throughput_n} executions of 6 zero-latency "
            f"tasks (2 per pool), {t.concurrency} in flight (asyncio + aiohttp, bounded by a semaphore), each "
            f"after {t.warmup} of warm-up, on a stack with pool limits of 128. The median run: "
            f"**{t.per_s:.0f} executions/s**, {t.tasks_per_s:.0f} tasks/s; latency p50 "
            f"{percentile(t.latency_ms, 50):.0f} ms, p99 {percentile(t.latency_ms, 99):.0f} ms. Every run, "
            f"executions/s: {', '.join(f'{r:.0f}' for r in res.throughput_rates)}; {t.errors} errors in all.",
            "",
            "CPU during the median run, % of one core, by process: "
            + " · ".join(f"{k} {v:.0f}" for k, v in sorted(t.cpu_pct.items(), key=lambda kv: -kv[1]))
            + f" (total {sum(t.cpu_pct.values()):.0f} % of the machine's {res.machine['cores'] * 100} %; "
            f"{sum(t.cpu_pct.values()) * 10 / t.per_s if t.per_s else 0:.1f} ms of CPU per execution).",
            "",
        ]
    if res.routing_ms:
        r_ms = res.routing_ms
        out += [
            "## Routing decision time",
            "",
            f"`shared.distributor.distribute` on {len(r_ms)} requests (short ones and a 1.7 kB one, in "
            f"process): p50 {percentile(r_ms, 50) * 1000:.0f} µs, p99 {percentile(r_ms, 99) * 1000:.0f} µs, "
            f"max {max(r_ms) * 1000:.0f} µs.",
            "",
        ]
    if res.costs or res.scenarios:
        out += ["## Cost: parallel vs serial", "", cost_section(res.costs or res.scenarios, measured=bool(res.costs)),
                ""]
    if res.load or res.soak:
        out += ["## Load and soak", ""]
    if res.load:
        ld = res.load
        out += [
            f"{ld.executions} executions of {ld.tasks // ld.executions} independent tasks each "
            f"({res.options.load_latency_s:g} s simulated latency), all submitted at once (pool limits 128, "
            f"`max_tasks_per_execution` 10): {ld.completed} completed, {ld.errors} errors, "
            f"**{ld.max_concurrent_tasks} tasks running at the same instant** (from the recorded attempt "
            f"intervals), all done in {ld.seconds:.2f} s.",
            "",
        ]
    if res.soak:
        sk = res.soak
        growth = sk.growth()
        first, last = sk.rss_kib[0][1], sk.rss_kib[-1][1]
        lines = ["| process | RSS after warm-up | RSS at the end | growth |", "|---|---|---|---|"]
        for s in sorted(first, key=lambda name: (name == SERVER, name)):
            lines.append(f"| {s} | {first[s] / 1024:.1f} MiB | {last[s] / 1024:.1f} MiB | {growth[s] * 100:+.1f} % |")
        out += [
            f"{sk.executions} executions ({sk.executions // 10} per slice, {res.options.concurrency} in flight) on a "
            f"stack of their own, after {res.options.soak_warmup} of warm-up, in {sk.seconds:.1f} s, {sk.errors} "
            "errors. Resident memory (VmRSS in /proc/<pid>/status of every service process, and of the nats-server; "
            "pids from the runner's stack.json) after the warm-up and at the end:",
            "",
            "\n".join(lines),
            "",
            "The target is the services'. The nats-server's memory grows with what it is asked to keep: every "
            "execution's document (the KV bucket keeps them 30 days), its results and events (the streams keep "
            "them 7 days), which the file store caches in memory as it writes them; it is shown, not judged.",
            "",
        ]
        if "soak" in figures:
            out += [f"![soak]({figures['soak']})", ""]
    out += [
        "## Reproduce",
        "",
        "```sh",
        "make bench                       # installs the bench extra (matplotlib), runs everything, updates README",
        "openclaw bench --only speedup --runs 5 --time-factor 0.05   # one part, more runs, longer tasks",
        "```",
        "",
    ]
    return "\n".join(out)


def cost_section(results: list[ScenarioResult], measured: bool) -> str:
    lines = ["| scenario | parallel total | serial total | of which tasks | decomposition + synthesis | extra share "
             "| parallel vs serial |", "|---|---|---|---|---|---|---|"]
    for r in results:
        c = cost_overhead(r, models=measured)
        share = f"{c['extra_share'] * 100:.1f} %" if c["measured"] else "n/a"
        lines.append(f"| {r.scenario.title} | ${c['parallel_total']:.4f} | ${c['serial_total']:.4f} | "
                     f"${c['tasks']:.4f} | ${c['extra']:.4f} | {share} | {c['difference'] * 100:+.1f} % |")
    head = ("From each execution's `cost.by_phase` (tasks, decomposition, synthesis), medians over the runs; the "
            "extra share is the median of each parallel execution's decomposition + synthesis over its total.\n\n"
            + "\n".join(lines) + "\n\n")
    if measured:
        docs = [d for r in results for d in r.parallel_docs + r.serial_docs]
        judged = sum(by_the_models(d) for r in results for d in r.parallel_docs)
        return head + (
            f"Each scenario's request alone, with no plan of the client's, submitted {len(results[0].parallel_docs)}× "
            "as is and as many times with `\"mode\": \"serial\"` on the anthropic provider, for the PM's model to "
            "plan, the pools' models to run and the aggregator's model to answer; every figure is the usage the API "
            "reported × the price table. " + models_line(docs) + f" {judged} of the "
            f"{sum(len(r.parallel_docs) for r in results)} parallel executions were planned and answered by the "
            "models, and only those make the extra share: after a fallback to the rules or the template the extra is "
            "$0, which measures nothing. Serial mode makes the same kinds of calls; its total differs from the "
            "parallel one by the plans the model wrote for each run."
        )
    return head + (
        "What it means: on the simulated provider the task cost is priced from plausible token counts "
        "(identical prompts in both modes, so identical task cost), and the simulated provider makes no "
        "decomposition or synthesis call — a client plan skips decomposition anyway, and the final answer "
        "comes from the template. So the parallel mode's extra is exactly $0 here, by construction, not by "
        "measurement of a model. With the anthropic provider the extra is the synthesis call (and, without a "
        "client plan, the decomposition call), which serial execution through the same API pays too: "
        "`openclaw bench --provider anthropic` measures it with your key and your models (paid calls)."
    )


def models_line(docs: list[Doc]) -> str:
    """Which models made the calls, by phase, and which planner each execution ended with."""
    used: dict[str, set[str]] = {}
    for d in docs:
        for c in d["calls"]:
            used.setdefault(c["phase"], set()).add(c["model"])
        for t in d["tasks"]:
            used.setdefault("tasks", set()).update(a["model"] for a in t["attempts"] if a.get("model"))
    planners = Counter(str(d.get("planner")) for d in docs)
    ended = Counter(d["status"] for d in docs)
    phases = "; ".join(f"{phase} {', '.join(sorted(used[phase]))}" for phase in
                       ("decomposition", "tasks", "synthesis") if phase in used)
    return (f"Models: {phases or 'none'}. Planned by: "
            + ", ".join(f"{k} {v}×" for k, v in sorted(planners.items())) + ". Ended: "
            + ", ".join(f"{k} {v}×" for k, v in sorted(ended.items())) + ".")


def readme_section(res: Results, results_path: Path) -> str:
    return "\n".join([
        README_START,
        "",
        f"Latest run ({datetime.now(UTC).strftime('%Y-%m-%d')}, {machine_line(res)}, load average "
        f"{res.load_before:.1f}; `{res.options.command or 'openclaw bench'}`; full report, method and charts in "
        f"[{results_path.as_posix()}]({results_path.as_posix()})):",
        "",
        summary_table(res),
        "",
        README_END,
    ])


def update_readme(readme: Path, section: str) -> None:
    """Replace what is between the bench markers (append a section when there are none)."""
    text = readme.read_text()
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## Benchmarks\n\n" + section + "\n"
    readme.write_text(text)
