"""Shared helpers for benchmark scripts: interleaved timing, peak memory in a fresh process, JSON output.

Timing (:func:`interleaved_ratios`): the functions being compared run in alternation after a warm-up, the
order reversed every other alternation (``A B``, ``B A``, ...) so neither side always runs first; each
alternation gives one time per side and one ratio per side against the baseline, and the median ratio is
reported with its min–max. A change of machine load during the run hits both sides of an alternation alike,
so the per-alternation ratio is far more stable than the ratio of two separately taken best times.

Memory (:func:`peak_memory_mib`): the peak resident set size (RSS) added by one call, measured in a fresh
child process started with a fixed glibc allocator setting. Why RSS in a child and not allocator statistics:
the comparisons include numpy/scikit-learn, whose buffers no torch or tracemalloc counter sees, and RSS counts
every byte whatever allocated it. Why the fixed setting: glibc's default *dynamic* mmap threshold rises after
large blocks are freed, so a second call may take its buffers from an already-resident heap (RSS does not
move) or give freed memory back below the baseline (a negative "peak"); runs then differ by 100+ MiB.
``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB (it also turns the dynamic adjustment off) puts every large block
in its own mapping that is returned to the OS on free, ``MALLOC_ARENA_MAX=1`` keeps one arena, and
``MALLOC_TRIM_THRESHOLD_`` trims the heap top eagerly. The child prepares its inputs, runs the function once
(warm-up: lazy imports, thread pools), resets the kernel's peak counter (``/proc/self/clear_refs``), reads the
baseline RSS, runs the function again and reports ``VmHWM − baseline``. The kernel's peak is at least every
RSS seen since the reset, so the value cannot go negative except by the kernel's per-thread counter lag
(a few pages); it is clamped at 0 and the raw value kept. Linux only.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
#: where benchmarks write their raw JSON (and tables); ``LIT_CASCADES_BENCHMARK_DIR`` redirects it, e.g. for a
#: rerun that must not replace the published files (``python -m benchmarks.reproduce``)
RESULTS = Path(os.environ.get("LIT_CASCADES_BENCHMARK_DIR") or ROOT / "docs" / "results" / "benchmarks")
PUBLISHED = ROOT / "docs" / "results" / "benchmarks"

#: the allocator setting every memory measurement's child process starts with (see module docstring)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "131072",
              "MALLOC_TOP_PAD_": "0"}


# ---------------------------------------------------------------------------------------------- timing


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    alternations: int = 10,
    warmup: int = 2,
    inner: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Per-alternation wall time (seconds per call) of each function, the functions run in alternation.

    Args:
        fns: name -> zero-argument callable. Every callable runs ``warmup`` times first (in the same order).
        alternations: number of alternations measured (``>= 1``; use ``>= 10`` for published numbers).
        warmup: untimed calls of each function before the first alternation.
        inner: calls per timed block (the block time is divided by ``inner``), for functions too fast to
            time one call at a time.
        clock: the time source (injected by tests).

    Returns:
        name -> ``[alternations]`` seconds per call; in alternation ``i`` the functions run in the given order
        for even ``i`` and reversed for odd ``i``.
    """
    if not fns:
        raise ValueError("`fns` must hold at least one function to time; got an empty dict")
    if alternations < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"need alternations >= 1, inner >= 1, warmup >= 0; got {alternations}, {inner}, {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(alternations):
        for name in names if i % 2 == 0 else names[::-1]:
            fn = fns[name]
            start = clock()
            for _ in range(inner):
                fn()
            times[name].append((clock() - start) / inner)
    return times


def spread(values: Sequence[float], raw: str | None = "values") -> dict[str, Any]:
    """``{"median", "min", "max"}`` of ``values``, with the values themselves under ``raw`` (None: left out)."""
    out: dict[str, Any] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    if raw is not None:
        out[raw] = list(values)
    return out


def summarize_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, Any]:
    """Median / min / max over alternations of ``time[name] / time[baseline]`` for every other name.

    Returns ``{"baseline": ..., "seconds": times, "median_s": {...}, "ratios": {name: {"median", "min", "max",
    "per_alternation"}}}``.
    """
    if baseline not in times:
        raise ValueError(f"`baseline` must be one of {sorted(times)}; got {baseline!r}")
    base = times[baseline]
    ratios = {}
    for name, ts in times.items():
        if name == baseline:
            continue
        per = [t / b for t, b in zip(ts, base, strict=True)]
        ratios[name] = spread(per, "per_alternation")
    return {"baseline": baseline, "alternations": len(base), "seconds": times,
            "median_s": {name: statistics.median(ts) for name, ts in times.items()}, "ratios": ratios}


def interleaved_ratios(
    fns: dict[str, Callable[[], Any]],
    baseline: str,
    alternations: int = 10,
    warmup: int = 2,
    inner: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """:func:`interleaved_times` followed by :func:`summarize_ratios` against ``baseline``."""
    return summarize_ratios(interleaved_times(fns, alternations, warmup, inner, clock), baseline)


def flop_ratios(fns: dict[str, Callable[[], Any]], baseline: str) -> dict[str, Any]:
    """Floating-point operations of one call of each function and their ratios to ``baseline``'s.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and their
    backward passes; element-wise operations count 0, and so does CPU scaled-dot-product attention, which the
    counter does not register). The count is exact and repeatable, so it separates what a time ratio owes to
    the arithmetic from what it owes to the implementation: a time ratio equal to the FLOP ratio means the
    extra work costs what its matrix products cost. Each function runs once (an optimiser step included).

    Returns ``{"gflop": {name: float}, "ratios": {name: float}}`` (ratios for every name but ``baseline``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if baseline not in fns:
        raise ValueError(f"`baseline` must be one of {sorted(fns)}; got {baseline!r}")
    flops = {}
    for name, fn in fns.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    if flops[baseline] <= 0:
        raise ValueError(f"the baseline {baseline!r} ran no counted operations")
    return {"gflop": {name: f / 1e9 for name, f in flops.items()},
            "ratios": {name: f / flops[baseline] for name, f in flops.items() if name != baseline}}


# ---------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_worker(target: Callable[[], Callable[[], Any]], threads: int, out: Any) -> None:
    try:
        torch.set_num_threads(threads)
        fn = target()  # setup (data creation) happens before the baseline reading
        fn()  # warm-up: lazy imports, thread pools and one-off caches are not the measured cost
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak counter (VmHWM) to the current RSS
            f.write("5")
        base = _status_kb("VmRSS")
        fn()
        out.put(("ok", (_status_kb("VmHWM") - base) / 1024.0, base / 1024.0))
    except BaseException:  # reported to the parent, which raises
        out.put(("error", traceback.format_exc(), 0.0))


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def peak_extra_memory_mb(target: Callable[[], Callable[[], Any]], threads: int = 1, timeout: float = 600.0,
                         malloc_env: dict[str, str] | None = None) -> float:
    """Peak resident memory added by one call of ``target()()`` in a fresh process, in MiB (Linux).

    ``target`` is an importable (picklable) zero-argument function that prepares the inputs and returns the
    callable to measure, so input creation is not counted. See the module docstring for the method.

    Raises:
        TimeoutError: the child did not report within ``timeout`` seconds (it is killed first).
        RuntimeError: the child raised (its traceback is in the message) or died without reporting.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with _env(MALLOC_ENV if malloc_env is None else malloc_env):  # the child reads these at start-up
        proc = ctx.Process(target=_peak_worker, args=(target, threads, out), daemon=True)
        proc.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, value, _base = out.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                break
            except queue_mod.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"memory-measurement child for {target!r} exited with code "
                                       f"{proc.exitcode} without reporting") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"memory-measurement child for {target!r} did not finish within "
                                       f"{timeout:.0f} s; it was killed") from None
        if status != "ok":
            raise RuntimeError(f"memory-measurement child for {target!r} failed:\n{value}")
        return max(float(value), 0.0)
    finally:
        if proc.is_alive():
            proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)
        out.close()


def peak_memory_mib(target: Callable[[], Callable[[], Any]], repeats: int = 5, threads: int = 1,
                    timeout: float = 600.0) -> dict[str, Any]:
    """:func:`peak_extra_memory_mb` repeated in ``repeats`` fresh processes: median, min, max and the raw values."""
    values = [peak_extra_memory_mb(target, threads, timeout) for _ in range(repeats)]
    return {**spread(values), "method": "peak RSS over a post-warm-up baseline in a fresh process",
            "malloc_env": MALLOC_ENV}


# ---------------------------------------------------------------------------------------------- output


def git_output(*args: str) -> str:
    """Stripped stdout of ``git <args>`` in the repository, or ``"unknown"`` when git cannot run."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _git_commit() -> str | None:
    commit = git_output("rev-parse", "HEAD")
    return None if commit in ("", "unknown") else commit


def load_text(payload: dict[str, Any]) -> str:
    """A benchmark file's 1-minute load average as ``"start → end"`` (``"end"`` or ``"n/a"`` when not recorded)."""
    load = payload.get("load", {})
    start, end = load.get("loadavg_start"), load.get("loadavg_end")
    if start and end:
        return f"{start[0]:.1f} → {end[0]:.1f}"
    return f"{end[0]:.1f}" if end else "n/a"


def results_machine() -> dict[str, Any]:
    """What a results script's runs were measured on (one torch thread per run), with the machine's load."""
    return {"platform": platform.platform(), "cpu": machine_info()["cpu"], "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads_per_run": 1,
            "loadavg_1_5_15": list(os.getloadavg())}


def machine_info() -> dict[str, Any]:
    """Platform, CPU, torch version and threads, and the load average (the machine may be shared)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


class Run:
    """Records the start time and load of a benchmark run; :meth:`write` stores the results with them."""

    def __init__(self, name: str, note: str = "") -> None:
        self.name, self.note = name, note
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.load_start = os.getloadavg()
        self.t0 = time.perf_counter()

    def write(self, results: dict[str, Any], targets: Sequence[dict[str, Any]] = ()) -> Path:
        """Write ``results`` (and ``targets``: rows for the summary table) to ``RESULTS/<name>.json``."""
        payload = {
            "benchmark": self.name, "command": "python -m benchmarks." + self.name + " " + " ".join(sys.argv[1:]),
            "git_commit": _git_commit(), "started_utc": self.started, "wall_s": time.perf_counter() - self.t0,
            "machine": machine_info(),
            "load": {"loadavg_start": self.load_start, "loadavg_end": os.getloadavg(),
                     "note": self.note or "shared machine: other processes may have been running; see loadavg"},
            "targets": list(targets), **results,
        }
        return _dump(self.name, payload)


def target_row(what: str, target: float, ratio: dict[str, Any], unit: str = "time") -> dict[str, Any]:
    """One row of the summary table: ``ratio`` holds ``median``/``min``/``max``; pass iff median <= target."""
    return {"what": what, "unit": unit, "target": target, "median": ratio["median"], "min": ratio["min"],
            "max": ratio["max"], "pass": bool(ratio["median"] <= target)}


def _dump(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    text = json.dumps(payload, indent=2, default=float)
    path.write_text(text + "\n")
    print(text)
    return path


# ---------------------------------------------------------------------------------------------------------------
# results scripts: recipe runs and seed statistics
# ---------------------------------------------------------------------------------------------------------------
def run_recipe_dir(recipe: str, overrides: list[str], out: Path, rerun: bool = False,
                   timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run ``python -m <recipe> <overrides> output_dir=<out>`` (one thread) unless ``out`` holds a finished run
    (``rerun``: replace it; an unfinished one is never removed); return the command, its wall time and the load
    average before and after it."""
    argv = [*overrides, f"output_dir={out.relative_to(ROOT)}"]
    info: dict[str, Any] = {"command": " ".join(["python", "-m", recipe, *argv])}
    if rerun or not (out / "metrics.json").exists():
        if out.exists() and not (out / "metrics.json").exists():
            raise SystemExit(f"{out} exists without metrics.json (an interrupted run?): remove it or resume it with "
                             f"python -m {recipe} resume={out.relative_to(ROOT)}")
        if out.exists():  # rerun: a finished run is replaced
            shutil.rmtree(out)
        load_before, t = os.getloadavg(), time.time()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-m", recipe, *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        if proc.returncode:
            raise RuntimeError(f"{info['command']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        (out / "wall_seconds.txt").write_text(f"{time.time() - t:.1f}\n")
        (out / "load.json").write_text(json.dumps({"before": load_before, "after": os.getloadavg()}))
    wall_file, load_file = out / "wall_seconds.txt", out / "load.json"
    if wall_file.exists():
        info["wall_seconds"] = float(wall_file.read_text())
    else:  # a run started by hand with the same command: its start (run.json) to its metrics.json's mtime
        from datetime import datetime

        created = datetime.fromisoformat(json.loads((out / "run.json").read_text())["created"]).timestamp()
        info["wall_seconds"] = round((out / "metrics.json").stat().st_mtime - created, 1)
        info["wall_seconds_source"] = "run.json 'created' to the mtime of metrics.json"
    info["loadavg"] = json.loads(load_file.read_text()) if load_file.exists() else None
    info["run_git_commit"] = json.loads((out / "run.json").read_text()).get("git_commit")  # what the run ran
    return info


def run_seeds(recipe: str, overrides: Callable[[int], list[str]], runs_dir: Path, seeds: Sequence[int],
              rerun: bool = False, timeout_s: float = 7200.0) -> dict[int, dict[str, Any]]:
    """One :func:`run_recipe_dir` per seed (``<runs_dir>/seed<seed>``, overrides ``overrides(seed)``), in order;
    returns ``{seed: its run record}``."""
    runs = {}
    for seed in seeds:
        runs[seed] = run_recipe_dir(recipe, overrides(seed), runs_dir / f"seed{seed}", rerun, timeout_s=timeout_s)
        print(f"seed {seed}: {runs[seed]['wall_seconds']:.0f} s", flush=True)
    return runs


# ---------------------------------------------------------------------------------------------------------------
# results figures
# ---------------------------------------------------------------------------------------------------------------
IMG = ROOT / "docs" / "img"


def shared_legend(fig: Any, axes: Sequence[Any], ncol: int = 3) -> None:
    """One legend below the panels of ``fig`` with every label of ``axes`` once (first handle wins)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)


def write_tables(out: Path, tables: Mapping[str, str]) -> list[Path]:
    """Write a results script's ``{file name: text}`` tables into ``out`` (created); print and return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in tables.items():
        path = out / name
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        paths.append(path)
    return paths


def save_figure(fig: Any, name: str, dpi: int = 110) -> Path:
    """Write ``fig`` to ``docs/img/<name>`` and close it; returns the path."""
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / name
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
