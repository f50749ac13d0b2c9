"""PNG charts of a benchmark run (matplotlib, the ``bench`` extra); each states machine, command and runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.measure import SERVER, attempts, percentile  # noqa: E402
from bench.report import TARGETS, caption  # noqa: E402

if TYPE_CHECKING:
    from bench.run import Results

POOL_COLOURS = {"codegen": "#4C72B0", "security": "#C44E52", "database": "#55A868"}
POOLS = ("codegen", "security", "database")


def _save(fig: Any, res: Results, runs: str, path: Path) -> None:
    text = caption(res, runs).replace("`", "").split(" · ", 1)
    fig.text(0.01, 0.005, "\n".join(text), fontsize=6.5, color="#555555", ha="left", va="bottom", wrap=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedup(res: Results, path: Path) -> None:
    rows = res.scenarios
    fig, ax = plt.subplots(figsize=(9, 1.6 + 1.3 * len(rows)))
    labels = [r.scenario.title for r in rows]
    series = [
        ("serial (measured)", [r.serial for r in rows], "#999999"),
        ("parallel (measured)", [r.parallel for r in rows], "#4C72B0"),
        ("bound: optimum under the pool limits", [r.bounds()["optimum"] for r in rows], "#55A868"),
        ("critical path (no limits)", [r.bounds()["critical_path"] for r in rows], "#DDAA33"),
    ]
    h = 0.2
    for i, (name, values, colour) in enumerate(series):
        ys = [j + (i - 1.5) * h for j in range(len(rows))]
        ax.barh(ys, values, height=h, label=name, color=colour)
        for y, v in zip(ys, values, strict=True):
            ax.text(v, y, f" {v:.2f} s", va="center", fontsize=7)
    for j, r in enumerate(rows):
        ax.text(0.01, j - 0.45, f"speedup {r.speedup:.2f}× (bound {r.bound_speedup:.2f}×), "
                f"parallel {r.vs_bound * 100:+.1f} % vs bound", fontsize=7, transform=ax.get_yaxis_transform())
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"seconds (seed timeline × {res.options.time_factor:g}); medians")
    ax.set_title("Parallel vs serial vs the best possible schedule")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(0, max(max(v) for _, v, _ in series) * 1.25)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, res, f"{res.options.runs} runs per mode and scenario", path)


def _lanes(ax: Any, doc: dict[str, Any], title: str) -> None:
    """A lane per pool; inside it a row per concurrently busy slot; a bar per attempt."""
    rows = attempts(doc)
    y, ticks, labels = 0.0, [], []
    for pool in POOLS:
        mine = sorted((a for a in rows if a["pool"] == pool), key=lambda a: a["start"])
        slots: list[float] = []  # finish time of the last bar in each row
        placed = []
        for a in mine:
            k = next((i for i, f in enumerate(slots) if f <= a["start"] + 1e-6), None)
            if k is None:
                slots.append(a["finish"])
                k = len(slots) - 1
            else:
                slots[k] = a["finish"]
            placed.append((k, a))
        n = max(1, len(slots))
        for k, a in placed:
            yy = y + k
            ax.barh(yy, a["finish"] - a["start"], left=a["start"], height=0.7, color=POOL_COLOURS[pool],
                    alpha=0.9 if a["outcome"] == "completed" else 0.4, edgecolor="black", linewidth=0.4)
            ax.text(a["start"] + (a["finish"] - a["start"]) / 2, yy, a["task"], ha="center", va="center",
                    fontsize=6.5, color="white")
        ticks.append(y + (n - 1) / 2)
        labels.append(pool)
        y += n + 0.6
    ax.set_yticks(ticks, labels)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def gantt(res: Results, path: Path) -> None:
    r = res.scenarios[0]
    par, ser = r.parallel_docs[0], r.serial_docs[0]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5.2), sharex=True)
    end = lambda d: max(a["finish"] for a in attempts(d))  # noqa: E731
    _lanes(a1, par, f"{r.scenario.title}, parallel: {end(par):.2f} s of tasks "
                    f"(bound {r.bounds()['optimum']:.2f} s); execution {par['execution_id'][:8]}")
    _lanes(a2, ser, f"same plan, mode=serial: {end(ser):.2f} s; execution {ser['execution_id'][:8]}")
    a2.set_xlabel("seconds since the execution was created")
    fig.suptitle("Worker pool activity: a lane per pool, a bar per task attempt", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, res, "one execution per mode (the first run)", path)


def overhead(res: Results, path: Path) -> None:
    o = res.overhead
    assert o is not None
    fig, ax = plt.subplots(figsize=(9, 3.6))
    top = percentile(o.samples_ms, 99.5)
    ax.hist([min(x, top) for x in o.samples_ms], bins=50, color="#4C72B0", alpha=0.85)
    for value, label, style in ((o.stat(50), "p50", "-"), (o.stat(99), "p99", "-"),
                                (TARGETS["overhead_p50"], "target p50", ":"),
                                (TARGETS["overhead_p99"], "target p99", ":")):
        ax.axvline(value, color="black" if style == "-" else "#C44E52", linestyle=style, linewidth=1)
        ax.text(value, ax.get_ylim()[1] * 0.95, f" {label} {value:.1f}", rotation=90, va="top", fontsize=7)
    ax.set_xlabel("end-to-end ms through the gateway, 6-task fan-out, zero-latency agents (clipped at p99.5)")
    ax.set_ylabel("executions")
    ax.set_title("Orchestration overhead (sequential executions)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, res, f"{len(o.samples_ms)} executions", path)


def soak(res: Results, path: Path) -> None:
    sk = res.soak
    assert sk is not None
    fig, ax = plt.subplots(figsize=(9, 3.8))
    services = sorted(s for s in sk.rss_kib[0][1] if s != SERVER)  # its growth is data kept (results.md)
    xs = [n for n, _ in sk.rss_kib]
    for s in services:
        ax.plot(xs, [rss[s] / 1024 for _, rss in sk.rss_kib], marker="o", markersize=3, label=s)
    ax.set_xlabel(f"executions after {res.options.soak_warmup} of warm-up")
    ax.set_ylabel("RSS, MiB")
    ax.set_title("Resident memory of every service during the soak")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, res, f"{sk.executions} executions, one run", path)


def draw_all(res: Results, out: Path) -> dict[str, str]:
    """Every chart the results allow; returns {name: file name relative to ``out``}."""
    figs: dict[str, str] = {}
    if res.scenarios:
        speedup(res, out / "speedup.png")
        gantt(res, out / "gantt.png")
        figs.update(speedup="speedup.png", gantt="gantt.png")
    if res.overhead:
        overhead(res, out / "overhead.png")
        figs["overhead"] = "overhead.png"
    if res.soak:
        soak(res, out / "soak.png")
        figs["soak"] = "soak.png"
    return figs
