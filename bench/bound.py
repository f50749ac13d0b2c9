"""The best any scheduler could do with a plan under the pool limits.

A plan is tasks with a duration, a pool and dependencies; a pool runs at most ``limits[pool]`` tasks
at once; a task starts only after all its dependencies finished and then runs without interruption.
This is resource-constrained project scheduling with one renewable resource per pool, each task
using one unit of its pool.

- ``critical_path``: the longest chain of durations, ignoring the pool limits (a lower bound).
- ``lower_bound``: max(critical path, for each pool its work / its limit); cheap and always ≤ optimum.
- ``greedy``: what a non-delay FIFO scheduler does — the system's own policy: a task is queued when its
  last dependency finishes and a pool starts queued tasks in queue order whenever it has a free slot.
- ``optimum``: the exact minimum makespan, by branch and bound over the serial schedule-generation
  scheme (each task in a precedence-feasible order placed at its earliest feasible start). That scheme
  generates every *active* schedule, and for makespan some active schedule is optimal, so the search
  is exact; it prunes with the partial makespan and heads + tails, and is instant for plans of the
  size the system accepts (≤ 12 tasks here). When the greedy schedule already meets the lower bound it
is returned at once: it is then provably optimal. Exact for tasks of positive duration: a task of zero
duration is taken to hold a slot of its pool for that instant, which can delay another start there, so
with such tasks ``optimum`` may exceed the true minimum (the benchmark's plans have none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Deps = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Schedule:
    makespan: float
    start: dict[str, float]

    def finish(self, durations: Mapping[str, float]) -> dict[str, float]:
        return {t: s + durations[t] for t, s in self.start.items()}


def _topological(deps: Deps) -> list[str]:
    order: list[str] = []
    done: set[str] = set()
    pending = list(deps)
    while pending:
        ready = [t for t in pending if all(d in done for d in deps[t])]
        if not ready:
            raise ValueError(f"dependency cycle among {sorted(pending)}")
        for t in ready:
            order.append(t)
            done.add(t)
            pending.remove(t)
    return order


def critical_path(durations: Mapping[str, float], deps: Deps) -> float:
    """Longest dependency chain, ignoring pool limits."""
    finish: dict[str, float] = {}
    for t in _topological(deps):
        finish[t] = max((finish[d] for d in deps[t]), default=0.0) + durations[t]
    return max(finish.values(), default=0.0)


def lower_bound(durations: Mapping[str, float], deps: Deps, pools: Mapping[str, str],
                limits: Mapping[str, int]) -> float:
    """max(critical path, each pool's total work / its limit): no schedule can beat it."""
    load: dict[str, float] = {}
    for t, d in durations.items():
        load[pools[t]] = load.get(pools[t], 0.0) + d
    return max([critical_path(durations, deps), *(w / limits[p] for p, w in load.items())])


def greedy(durations: Mapping[str, float], deps: Deps, pools: Mapping[str, str],
           limits: Mapping[str, int]) -> Schedule:
    """Non-delay FIFO list scheduling: the policy the system itself follows.

    A task enters its pool's queue when its last dependency finishes (ties in plan order); whenever
    a slot is free the pool starts the head of its queue.
    """
    queue: dict[str, list[str]] = {p: [] for p in limits}
    start: dict[str, float] = {}
    finished: set[str] = set()
    running: dict[str, float] = {}  # task -> finish time

    def release() -> None:
        for t in durations:  # plan order
            queued = any(t in q for q in queue.values())
            if t not in start and not queued and all(d in finished for d in deps[t]):
                queue[pools[t]].append(t)

    now = 0.0
    release()
    while len(finished) < len(durations):
        for p, q in queue.items():
            while q and sum(1 for t in running if pools[t] == p) < limits[p]:
                t = q.pop(0)
                start[t], running[t] = now, now + durations[t]
        if not running:
            raise ValueError("unschedulable plan (unknown dependency?)")
        now = min(running.values())
        for t in sorted((t for t, f in running.items() if f == now), key=list(durations).index):
            del running[t]
            finished.add(t)
        release()
    return Schedule(max((start[t] + durations[t] for t in start), default=0.0), start)


def _earliest(pool_jobs: list[tuple[float, float]], limit: int, ready: float, duration: float) -> float:
    """Earliest start ≥ ``ready`` where the pool has a free slot for the whole ``duration``."""
    candidates = sorted({ready, *(f for _, f in pool_jobs if f > ready)})
    for t in candidates:
        end = t + duration
        # Usage is piecewise constant and only rises at job starts: check at t and at every start inside.
        points = [t, *(s for s, _ in pool_jobs if t < s < end)]
        if all(sum(1 for s, f in pool_jobs if s <= x < f or (s == x == f)) < limit for x in points):
            return t
    return candidates[-1]  # unreachable: after the last finish the pool is empty


def optimum(durations: Mapping[str, float], deps: Deps, pools: Mapping[str, str],
            limits: Mapping[str, int], max_tasks: int = 12) -> Schedule:
    """The exact minimum makespan (see the module docstring); plans above ``max_tasks`` are refused."""
    tasks = list(durations)
    if len(tasks) > max_tasks:
        raise ValueError(f"exact search is for plans of at most {max_tasks} tasks")
    _topological(deps)  # refuse cycles early
    succs: dict[str, list[str]] = {t: [] for t in tasks}
    for t in tasks:
        for d in deps[t]:
            succs[d].append(t)
    tail: dict[str, float] = {}  # the task's duration + the longest chain after it
    for t in reversed(_topological(deps)):
        tail[t] = durations[t] + max((tail[s] for s in succs[t]), default=0.0)

    best = greedy(durations, deps, pools, limits)
    if best.makespan <= lower_bound(durations, deps, pools, limits) + 1e-9:
        return best  # the greedy schedule meets a lower bound: it is optimal
    best_makespan, best_start = best.makespan, dict(best.start)
    # Tasks that are interchangeable (same pool, duration, dependencies and dependents): only the first
    # unscheduled one of each class is branched on, which removes the n! orders of identical fan-outs.
    kind = {t: (pools[t], durations[t], tuple(sorted(deps[t])), tuple(sorted(succs[t]))) for t in tasks}
    start: dict[str, float] = {}
    finish: dict[str, float] = {}
    jobs: dict[str, list[tuple[float, float]]] = {p: [] for p in limits}

    def search(makespan: float) -> None:
        nonlocal best_makespan, best_start
        if len(start) == len(tasks):
            if makespan < best_makespan - 1e-9:
                best_makespan, best_start = makespan, dict(start)
            return
        eligible, seen = [], set()
        for t in tasks:
            if t not in start and all(d in start for d in deps[t]) and kind[t] not in seen:
                seen.add(kind[t])
                eligible.append(t)
        bound = makespan
        for t in tasks:
            if t not in start:
                head = max((finish[d] for d in deps[t] if d in finish), default=0.0)
                bound = max(bound, head + tail[t])
        if bound >= best_makespan - 1e-9:
            return
        for t in eligible:
            p = pools[t]
            ready = max((finish[d] for d in deps[t]), default=0.0)
            s = _earliest(jobs[p], limits[p], ready, durations[t])
            start[t], finish[t] = s, s + durations[t]
            jobs[p].append((s, s + durations[t]))
            search(max(makespan, finish[t]))
            jobs[p].pop()
            del start[t], finish[t]

    search(0.0)
    return Schedule(best_makespan, best_start)


def speedup_bound(durations: Mapping[str, float], deps: Deps, pools: Mapping[str, str],
                  limits: Mapping[str, int]) -> float:
    """Serial work / optimal makespan: the most any scheduler could gain on this plan."""
    opt = optimum(durations, deps, pools, limits).makespan
    return math.inf if opt == 0 else sum(durations.values()) / opt
