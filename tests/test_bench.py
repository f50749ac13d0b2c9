"""The benchmark machinery (bench/), exercised on known plans and on one tiny real run.

No timing is asserted here: performance figures live in `make bench`, not in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from bench import report
from bench.bound import critical_path, greedy, lower_bound, optimum
from bench.measure import cost_overhead, max_overlap, percentile, ts
from bench.plans import MARKETPLACE, MIGRATION, RESTAURANT, SCENARIOS, SECURITY_AUDIT
from bench.run import PARTS, Options, add_arguments, measure_all, model_section, options_from, write_outputs
from shared.errors import ConfigError
from tests.fake_anthropic import PLAN, FakeAnthropic
from tests.test_e2e_anthropic import PLAN_ON_OPUS, SYNTHESIS_ON_SONNET, TASK_ON_SONNET

LIMITS = {"codegen": 3, "security": 2, "database": 2}


def test_the_restaurant_plan_reproduces_the_seed_timeline() -> None:
    d, deps, pools = RESTAURANT.durations(), RESTAURANT.deps(), RESTAURANT.pools()
    assert sum(d.values()) == 240  # seed: serial ~240 s
    assert critical_path(d, deps) == 150
    assert optimum(d, deps, pools, LIMITS).makespan == 150  # seed: parallel ~150 s


def test_bounds_honour_the_pool_limits() -> None:
    # Migration: the database pool (2 slots) has 3 tasks after the plan, so the limit, not the chain, binds.
    d, deps, pools = MIGRATION.durations(), MIGRATION.deps(), MIGRATION.pools()
    assert critical_path(d, deps) == 60
    assert lower_bound(d, deps, pools, LIMITS) == 65  # 130 s of database work / 2 slots
    assert optimum(d, deps, pools, LIMITS).makespan == 90  # 20 + (40 ‖ 40, then 30)
    # Security-only: 100 s of work on 2 slots cannot beat 50 s, i.e. 2.0×.
    d, deps, pools = SECURITY_AUDIT.durations(), SECURITY_AUDIT.deps(), SECURITY_AUDIT.pools()
    assert optimum(d, deps, pools, LIMITS).makespan == 50
    # The marketplace, twelve tasks: two chains of 150 s, which the default limits leave room for (2.833×).
    d, deps, pools = MARKETPLACE.durations(), MARKETPLACE.deps(), MARKETPLACE.pools()
    assert len(d) == 12 and sum(d.values()) == 425 and critical_path(d, deps) == 150
    assert optimum(d, deps, pools, LIMITS).makespan == 150
    assert optimum(d, deps, pools, {**LIMITS, "codegen": 2}).makespan > 150  # codegen's limit is what binds next
    # With unlimited pools every scenario reaches its critical path.
    for s in SCENARIOS:
        wide = dict.fromkeys(LIMITS, 100)
        assert optimum(s.durations(), s.deps(), s.pools(), wide).makespan == critical_path(s.durations(), s.deps())


def test_the_optimum_may_need_a_delay_that_greedy_fifo_never_takes() -> None:
    # x: B (10 s) is ready at once, A (1 s) only after P; C (10 s, on y) needs A. Greedy starts B at 0 and
    # makes C wait for it (21 s); the optimum keeps x free for A (12 s).
    d = {"P": 1.0, "A": 1.0, "B": 10.0, "C": 10.0}
    deps = {"P": [], "A": ["P"], "B": [], "C": ["A"]}
    pools = {"P": "y", "A": "x", "B": "x", "C": "y"}
    limits = {"x": 1, "y": 1}
    assert greedy(d, deps, pools, limits).makespan == 21
    best = optimum(d, deps, pools, limits)
    assert best.makespan == 12 and best.start["A"] == 1 and best.start["B"] == 2
    assert lower_bound(d, deps, pools, limits) <= best.makespan


def test_helpers() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4
    assert max_overlap([(0, 2), (1, 3), (2, 4)]) == 2  # touching intervals do not overlap
    with pytest.raises(ValueError, match="cycle"):
        critical_path({"a": 1, "b": 1}, {"a": ["b"], "b": ["a"]})


def test_a_tiny_real_run_writes_the_report_and_the_readme_table(tmp_path: Path) -> None:
    """One scenario (parallel and serial), a few overhead probes, a small load: the real stack end to end."""
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Benchmarks\n\nhow to run\n\n" + report.README_START + "\nold\n" + report.README_END
                      + "\n\n## After\n")
    # CPU time comes from /proc in clock ticks (10 ms): 40 probes give the gateway several ticks even on a quick
    # machine (about 1.5 ms an execution), where 5 could give it none.
    opts = Options(time_factor=0.002, runs=1, overhead_n=40, scenarios=("security_audit", "marketplace"),
                   parts=("speedup", "overhead", "routing", "load", "throughput", "soak"), throughput_n=4,
                   throughput_runs=3, concurrency=2, load_executions=2, load_tasks=3, soak_n=10, soak_warmup=2,
                   load_latency_s=0.2, routing_n=200, out=tmp_path / "out", readme=readme, charts=False,
                   command="pytest")
    res = asyncio.run(measure_all(opts))

    sc, big = res.scenarios
    # The marketplace's twelve tasks are more than a plan may hold by default: the bench's stack allows them.
    assert [len(d["tasks"]) for d in big.parallel_docs + big.serial_docs] == [12, 12]
    assert big.parallel_docs[0]["status"] == big.serial_docs[0]["status"] == "completed"
    assert len(sc.parallel_docs) == len(sc.serial_docs) == 1
    par, ser = sc.parallel_docs[0], sc.serial_docs[0]
    assert par["status"] == ser["status"] == "completed" and ser["mode"] == "serial"
    # Serial really ran one task at a time; parallel ran two at once (the security pool's limit).
    spans = lambda doc: [(ts(a["started_at"]), ts(a["finished_at"]))  # noqa: E731
                         for t in doc["tasks"] for a in t["attempts"]]
    assert max_overlap(spans(ser)) == 1 and max_overlap(spans(par)) == 2
    assert sc.bounds()["optimum"] == pytest.approx(50 * 0.002)
    assert res.overhead is not None and len(res.overhead.samples_ms) == 40 and res.overhead.cpu_ms["gateway-1"] > 0
    assert res.load is not None and res.load.errors == 0 and res.load.max_concurrent_tasks == 6
    p = res.primitives
    assert p is not None and min(p.publish_us, p.kv_write_us, p.kv_read_us, p.hop_us, p.wakeup_us) > 0
    assert p.floor_ms() == pytest.approx((3 * p.hop_us + 3 * p.kv_write_us) / 1000)
    assert p.document_bytes == len(res.overhead.document) > 1000 and min(p.work_us) > 0  # a real final document

    path = write_outputs(res)
    text = path.read_text()
    assert "Security-only audit" in text and "| measure | target | measured | met |" in text
    assert f"**{p.floor_ms():.1f} ms** before any service code" in text
    assert f"to another process and back took {p.wakeup_us:.0f} µs" in text
    assert f"took {p.work_us[0]:.0f} µs back to back, {p.work_us[1]:.0f} µs right after sleeping 5 ms" in text
    # Throughput: the median of the runs is reported, with every run beside it.
    t = res.throughput
    assert t is not None and t.errors == 0 and t.executions == 4 and t.warmup == 4
    assert len(res.throughput_rates) == 3 and res.throughput_rates == sorted(res.throughput_rates)
    assert t.per_s == res.throughput_rates[1]
    assert f"median of 3 runs ({res.throughput_rates[0]:.0f}–{res.throughput_rates[2]:.0f})" in text
    # The soak reports the nats-server's memory beside the services', judged apart; the cost row says it measured
    # nothing here, rather than "met".
    sk = res.soak
    assert sk is not None and sk.errors == 0 and len(sk.rss_kib) == 11
    assert set(sk.rss_kib[0][1]) == {"nats-server", "pm-1", "codegen-1", "security-1", "database-1", "aggregator-1",
                                     "gateway-1"}
    assert "on a stack of their own, after 2 of warm-up" in text and "| nats-server |" in text
    cost_row = next(line for line in text.splitlines() if line.startswith("| Cost overhead"))
    assert cost_row.endswith("| n/a |") and "not measurable on the simulated provider" in cost_row
    assert f"| {sc.speedup:.3f}× ({sc.serial:.3f} s → {sc.parallel:.3f} s) |" in text
    updated = readme.read_text()
    assert "old" not in updated and "Security-only audit: speedup over serial" in updated
    assert updated.endswith("## After\n")
    json.dumps(res.machine)  # plain data: cores, CPU, Python, nats-server version
    assert res.machine["nats"].startswith("nats-server")


def test_a_plan_that_allows_exactly_two_times_is_held_to_two_times_whatever_the_floating_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(report, "cost_overhead", lambda r: {"extra_share": 0.0})
    for bound_speedup in (2.0, 1.9999999999999998):  # work / optimum at some time factors
        r = SimpleNamespace(scenario=SECURITY_AUDIT, bounds=lambda: {"optimum": 1.0}, parallel=1.012, serial=2.017,
                            factor=0.02, vs_bound=0.012, speedup=2.017 / 1.012, bound_speedup=bound_speedup)
        res = SimpleNamespace(scenarios=[r], costs=[], overhead=None, throughput=None, routing_ms=[], load=None,
                              soak=None)
        [_, speedup, _] = report.summary_rows(res)  # type: ignore[arg-type]
        assert speedup[1:] == ("≥ 2.0× (the plan allows 2.000× exactly)", "1.993× (2.017 s → 1.012 s)", "**no**")


def test_charts_without_matplotlib_are_refused_before_anything_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    # It measured for minutes, then failed importing matplotlib before writing anything.
    import argparse
    import importlib.util

    from bench import run

    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    real = importlib.util.find_spec
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    with pytest.raises(ValueError, match=r"the charts need matplotlib, from the bench extra: `make bench`"):
        run.options_from(parser.parse_args(["--only", "routing"]))
    assert not run.options_from(parser.parse_args(["--only", "routing", "--no-charts"])).charts


def test_the_cost_part_measures_what_a_models_planning_and_answer_add(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_anthropic: FakeAnthropic,
) -> None:
    """`--provider anthropic --only cost`: the real stack on the anthropic provider (the real SDK, a local Messages
    API), each scenario's request planned by the PM's model, in both modes; the row is judged on the calls' usage."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"parallel_execution": {
        "anthropic": {"base_url": fake_anthropic.url, "timeout_s": 30},
        "pm_coordinator": {"reasoning_effort": "medium"}}}))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-bench")
    monkeypatch.setenv("OPENCLAW_PROVIDER", "simulated")  # would make the run free, and its figure zero
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = options_from(parser.parse_args(["--provider", "anthropic", "--config", str(config), "--runs", "1",
                                           "--scenarios", "security_audit", "--no-charts", "--out",
                                           str(tmp_path / "out")]))
    assert opts.parts == ("cost",)
    res = asyncio.run(measure_all(opts))

    [r] = res.costs
    docs = r.parallel_docs + r.serial_docs
    assert [(d["mode"], d["planner"], d["status"]) for d in docs] == [("parallel", "llm", "completed"),
                                                                     ("serial", "llm", "completed")]
    # Every call reached the model: a plan and an answer per execution, and each planned task.
    assert len(fake_anthropic.of("plan")) == len(fake_anthropic.of("synthesis")) == 2
    assert len(fake_anthropic.of("task")) == 2 * len(PLAN["tasks"])
    extra = PLAN_ON_OPUS + SYNTHESIS_ON_SONNET
    share = extra / (extra + len(PLAN["tasks"]) * TASK_ON_SONNET)
    assert cost_overhead(r)["extra_share"] == pytest.approx(share, abs=1e-6)

    text = write_outputs(res).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Cost overhead"))
    assert f"| {share * 100:.1f} % at most (Security-only audit; the median over the 1 parallel executions " in row
    assert row.endswith("| **no** |")  # an Opus plan with thinking is far more than 2 % of three tasks
    assert "Models: decomposition claude-opus-4-6; tasks claude-sonnet-4-6; synthesis claude-sonnet-4-6. " \
           "Planned by: llm 2×. Ended: completed 2×." in text
    assert "the anthropic provider (the configured models through the Messages API; paid calls)" in text
    assert f"| ${extra:.4f} | {share * 100:.1f} % |" in text


def test_the_cost_part_measures_nothing_where_the_models_did_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_anthropic: FakeAnthropic,
) -> None:
    # Every answer call refused: the answers come from the template, and the extra would be the plan alone.
    fake_anthropic.next("synthesis", "400", "400")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-bench")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_anthropic.url)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    res = asyncio.run(measure_all(options_from(parser.parse_args([
        "--provider", "anthropic", "--runs", "1", "--scenarios", "security_audit", "--no-charts",
        "--out", str(tmp_path / "out")]))))
    [r] = res.costs
    assert [c["error"] is not None for d in r.parallel_docs + r.serial_docs for c in d["calls"]
            if c["phase"] == "synthesis"] == [True, True]
    assert cost_overhead(r)["extra_share"] > 0  # the plan's cost alone, which is no measurement of the extra
    text = write_outputs(res).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Cost overhead"))
    assert "not measured: no execution of Security-only audit was both planned and answered" in row
    assert row.endswith("| n/a |")


def test_the_cost_part_is_refused_where_it_would_measure_nothing_or_pay_unasked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENCLAW_ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ValueError, match="paid calls with your key: set ANTHROPIC_API_KEY"):
        options_from(parser.parse_args(["--provider", "anthropic", "--no-charts"]))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-bench")
    with pytest.raises(ValueError, match=r"\['speedup'\] time simulated latencies: with --provider anthropic"):
        options_from(parser.parse_args(["--provider", "anthropic", "--only", "speedup", "--no-charts"]))
    with pytest.raises(ValueError, match="the cost part needs --provider anthropic"):
        options_from(parser.parse_args(["--only", "cost", "--no-charts"]))
    with pytest.raises(ValueError, match="--config is for --provider anthropic"):
        options_from(parser.parse_args(["--config", "x.json", "--no-charts"]))
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"parallel_execution": {"max_tasks_per_execution": 0}}))
    with pytest.raises(ConfigError, match="max_tasks_per_execution"):
        options_from(parser.parse_args(["--provider", "anthropic", "--config", str(bad), "--no-charts"]))
    with pytest.raises(ValueError, match="--readme is for the simulated run"):
        options_from(parser.parse_args(["--provider", "anthropic", "--readme", "README.md", "--no-charts"]))
    # A deadline shorter than the gateway's default wait: the bench's gateway waits as long as an execution runs.
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"parallel_execution": {"execution_timeout_s": 30}}))
    section, wait_s = model_section(short)
    assert (section["gateway"], wait_s, section["provider"]) == ({"max_wait_s": 30, "default_wait_s": 30}, 30,
                                                                 "anthropic")
    anthropic = options_from(parser.parse_args(["--provider", "anthropic", "--no-charts"]))
    assert (anthropic.parts, anthropic.out) == (("cost",), Path("bench/anthropic"))  # not over the free run's report
    simulated = options_from(parser.parse_args(["--no-charts"]))
    assert (simulated.parts, simulated.out) == (PARTS, Path("bench"))
