"""Shared helpers for benchmark scripts: timing, peak memory in a fresh process, JSON output."""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best_times(fns: dict[str, Callable[[], Any]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Best time of each function, timed in alternation so a change of machine load hits all of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_worker(target: Callable[[], Callable[[], Any]], threads: int, queue: Any) -> None:
    torch.set_num_threads(threads)
    fn = target()  # setup (data creation) happens before the baseline reading
    fn()  # warm-up: allocator pools and lazy imports are not the measured cost
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter (VmHWM) to the current RSS
        f.write("5")
    base = _rss_kb("VmRSS")
    fn()
    queue.put((_rss_kb("VmHWM") - base) / 1024.0)


def peak_extra_memory_mb(target: Callable[[], Callable[[], Any]], threads: int = 1) -> float:
    """Peak resident memory added by running ``target()()`` in a fresh process, in MiB (Linux).

    ``target`` is an importable zero-argument function that prepares the inputs and returns the callable to
    measure, so input creation is not counted; the peak counter is reset after one warm-up call.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_worker, args=(target, threads, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Print ``results`` and write them to ``benchmarks/results/<name>.json`` with machine info."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                              "threads": torch.get_num_threads()}, **results}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    return path
