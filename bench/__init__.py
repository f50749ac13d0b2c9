"""Benchmarks of the real stack (issue 7): speedup vs serial and vs the best possible schedule,
orchestration overhead, throughput, routing time, cost overhead, load and soak.

``openclaw bench`` / ``make bench`` run it and write ``bench/results.md`` and the charts beside it.
"""
