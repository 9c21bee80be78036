"""Interleaved timing and op profiles.

:func:`interleaved` runs every variant once per round, in an order that rotates by one every
round, after warm-up rounds that are dropped: load from other jobs on a shared machine then hits
every variant alike. Per call it records the wall time and the CPU time of this process (all
threads); per round, the 1-minute load average. The garbage collector is frozen for the timing
(``gc.freeze``: the objects that exist before it are never scanned again, so the collection
before every call costs microseconds, not the ~0.3 s a full scan of torch.export's leftovers
takes) and disabled during each call.

:func:`summarise` gives, per variant, the *paired* speedup against a baseline variant (the median
over rounds of ``time(base) / time(variant)`` in the same round: the primary figure), and, for
comparison, the ratio of medians, the ratio of minima and the ratio of median CPU times.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                loads: list | None = None) -> dict[str, dict[str, list[float]]]:
    """``{name: {"wall": [s, ...], "cpu": [s, ...]}}`` over ``rounds`` timed rounds; the load
    average of every timed round is appended to ``loads``."""
    names = list(fns)
    times = {k: {"wall": [], "cpu": []} for k in names}
    gc.collect()
    gc.freeze()
    try:
        for r in range(warmup + rounds):
            s = r % len(names)
            for k in names[s:] + names[:s]:
                gc.collect()
                gc.disable()
                try:
                    c0, t0 = time.process_time(), time.perf_counter()
                    fns[k]()
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                finally:
                    gc.enable()
                if r >= warmup:
                    times[k]["wall"].append(dt)
                    times[k]["cpu"].append(dc)
            if r >= warmup and loads is not None:
                loads.append(round(os.getloadavg()[0], 2))
    finally:
        gc.unfreeze()
    return times


def paired(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of ``slow[r] / fast[r]`` (how many times faster ``fast`` ran)."""
    return statistics.median(s / f for s, f in zip(slow, fast))


STATS = {"median": lambda t: statistics.median(t["wall"]), "min": lambda t: min(t["wall"]),
         "cpu": lambda t: statistics.median(t["cpu"])}


def summarise(times: dict, base: str = "dense", ideal: dict[str, float] | None = None) -> dict:
    """Per variant: raw times, median/min/CPU seconds, speedups vs ``base`` (``speedup``: paired,
    per round; ``speedup_median|min|cpu``: ratios of those statistics) and, with ``ideal``,
    speedup / ideal (``efficiency``, ``efficiency_median``, ...)."""
    out = {}
    for k, t in times.items():
        row: dict = dict(wall_runs_s=t["wall"], cpu_runs_s=t["cpu"])
        row["speedup"] = paired(times[base]["wall"], t["wall"])
        for s, f in STATS.items():
            row[f"{s}_s"] = f(t)
            row[f"speedup_{s}"] = f(times[base]) / f(t)
        if ideal is not None:
            row["ideal"] = ideal[k]
            for s in ("", "_median", "_min", "_cpu"):
                row[f"efficiency{s}"] = row[f"speedup{s}"] / ideal[k]
        out[k] = row
    return out


def ratio(summary: dict, fast: str, slow: str) -> dict[str, float]:
    """How many times faster ``fast`` runs than ``slow``: paired per round (``round``), and the
    ratios of median, min and CPU time."""
    out = {"round": paired(summary[slow]["wall_runs_s"], summary[fast]["wall_runs_s"])}
    out.update({s: summary[slow][f"{s}_s"] / summary[fast][f"{s}_s"] for s in STATS})
    return out


def profile_ops(fn: Callable[[], object], rows: int = 12, runs: int = 1) -> dict:
    """Self CPU time per op over ``runs`` calls of ``fn`` (after one untimed call)."""
    fn()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    avg = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in avg)
    top = [dict(op=e.key, self_ms=e.self_cpu_time_total / 1e3 / runs, calls=e.count // runs,
                share=e.self_cpu_time_total / total if total else 0.0) for e in avg[:rows]]
    return dict(total_ms=total / 1e3 / runs, top=top)
