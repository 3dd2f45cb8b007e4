"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import statistics
import time


def interleaved(impls: dict, runs: int) -> dict[str, tuple[float, object, float]]:
    """{name: (median seconds, last output, warm-up seconds)} of `fn()` for each name, fn in impls.

    Each fn is first called once as fn(warmup=True) (a short run: allocator, thread pool, lazy
    inits, compilation), then run r of every impl happens before run r+1 of any, so load from other
    processes on a shared machine hits them all alike.
    """
    warm = {}
    for name, fn in impls.items():
        t0 = time.perf_counter()
        fn(warmup=True)
        warm[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in impls}
    outs = {}
    for _ in range(runs):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), outs[name], warm[name]) for name, t in times.items()}
