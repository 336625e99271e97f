"""Served cascade vs serving the large model alone: throughput and latency over HTTP, same requests.

    python -m benchmarks.serve                          # digits Gatekeeper run (trained on first use)
    python -m benchmarks.serve --datasets digits fashion_mnist lm_pair
    python -m benchmarks.serve --tables-only            # docs/results/benchmarks/serve.table.md from serve.json

For each dataset: a ``gatekeeper`` recipe run (``runs/bench_serve/<dataset>``, trained once), its cascade
calibrated by ``recipes.serve`` on the run's val split (Clopper–Pearson, 95%, target deferral rate 0.2), and two
servers started side by side with the same LitServe settings: ``recipes.serve cascade=<dir>`` and the large model
alone (:class:`LargeOnlyAdapter`, the same request and response schema). One request list (test rows, 1-4 per
request) is sent through each server by concurrent HTTP clients, the two sides alternating (ABBA) after a warm-up
round each; throughput is requests per second of a round, latency is the client-side time of one request.
Raw output: ``docs/results/benchmarks/serve.json`` (with the load average: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS, ROOT, Run, spread
from lit_cascades.serving import BatchResult, ClassificationAdapter

NAME = "serve"
RUNS = {  # dataset -> gatekeeper recipe arguments
    "digits": ["preset=digits", "trainer.enable_progress_bar=false"],
    "fashion_mnist": ["preset=fashion_mnist", "trainer.enable_progress_bar=false"],
}
SERVER = ["max_batch_size=16", "batch_timeout=0.005", "workers=1", "accelerator=cpu"]


class LargeOnlyAdapter(ClassificationAdapter):
    """The baseline: every row answered by the cascade's large model (one call per dynamic batch)."""

    def run(self, requests: list[np.ndarray]) -> BatchResult:
        import torch

        sizes = [r.shape[0] for r in requests]
        start = time.perf_counter()
        with torch.inference_mode():
            pred = self.cascade.large(torch.from_numpy(np.concatenate(requests))).argmax(-1).tolist()
        sec = (time.perf_counter() - start) / len(pred)
        rows = [{"prediction": p, "deferred": True, "score": None, "calls": 1, "seconds": sec} for p in pred]
        out, i = [], 0
        for n in sizes:
            out.append({"outputs": rows[i: i + n]})
            i += n
        return BatchResult(out, [True] * len(pred), 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", *argv, f"port={port}"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server {url} did not start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _round(url: str, bodies: list[bytes], clients: int) -> dict[str, Any]:
    """Send every body once from ``clients`` threads; wall time and per-request latency (seconds)."""
    import httpx

    lat: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"content-type": "application/json"}) as c:
            for body in bodies[k::clients]:
                t = time.perf_counter()
                r = c.post("/predict", content=body)
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")
                with lock:
                    lat.append(dt)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - start
    if len(lat) != len(bodies):
        raise RuntimeError(f"{url}: {len(bodies) - len(lat)} requests failed or hung")
    return {"wall_s": wall, "latencies": lat}


def ensure_run(dataset: str) -> Path:
    out = ROOT / "runs" / "bench_serve" / dataset
    if not (out / "metrics.json").is_file():
        subprocess.run([sys.executable, "-m", "recipes.gatekeeper", f"output_dir={out}", "logger.wandb=false",
                        "baseline.enabled=false", *RUNS[dataset]], cwd=ROOT, check=True, timeout=3600)
    return out


def measure(sides: dict[str, list[str]], bodies: list[bytes], rounds: int, clients: int, tmp: Path
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start one server per side (``python -m <argv>``), a warm-up round each, then ``rounds`` alternating
    rounds (ABBA); returns (per-side summary, ratios of the first side to the second)."""
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    names = list(sides)
    try:
        for name, argv in sides.items():
            procs[name] = _start(argv, tmp / f"{name}.log")
        for name, (proc, url) in procs.items():
            _wait_healthy(proc, url, tmp / f"{name}.log")
        for name in names:  # warm-up
            _round(procs[name][1], bodies, clients)
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for i in range(rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                per[name].append(_round(procs[name][1], bodies, clients))
        import httpx

        stats = {n: httpx.get(f"{procs[n][1]}/stats", timeout=30).json() for n in names}
    finally:
        for proc, _ in procs.values():
            _stop(proc)
    summary: dict[str, Any] = {}
    for name in names:
        thr = [len(bodies) / r["wall_s"] for r in per[name]]
        pooled = np.array([t for r in per[name] for t in r["latencies"]]) * 1e3
        summary[name] = {
            "requests_per_s": spread(thr, "per_round"),
            "latency_ms": {q: float(np.percentile(pooled, int(q[1:]))) for q in ("p50", "p90", "p99")},
            "latency_ms_per_round": {q: [float(np.percentile(np.array(r["latencies"]) * 1e3, int(q[1:])))
                                         for r in per[name]] for q in ("p50", "p99")},
            "server_stats": {k: stats[name][k] for k in ("requests", "rows", "deferred_rows", "deferral_rate",
                                                         "large_model_calls", "batches", "mean_batch_requests",
                                                         "latency_ms")},
        }
    a, b = names

    def ratio(get: Any) -> dict[str, float]:
        per_round = [x / y for x, y in zip(get(summary[a]), get(summary[b]))]
        return spread(per_round, raw=None)

    ratios = {"throughput_ratio": ratio(lambda s: s["requests_per_s"]["per_round"]),
              "p50_latency_ratio": ratio(lambda s: s["latency_ms_per_round"]["p50"]),
              "p99_latency_ratio": ratio(lambda s: s["latency_ms_per_round"]["p99"])}
    return summary, ratios


def _calibration(rep: Any) -> dict[str, Any]:
    return {k: getattr(rep, k) for k in ("method", "n", "target_rate", "confidence", "threshold", "rate", "bound",
                                         "small_quality", "cascade_quality", "large_quality")}


def bench_dataset(dataset: str, n_requests: int, rounds: int, clients: int, seed: int) -> dict[str, Any]:
    """A Gatekeeper image-classification cascade vs its large model alone."""
    from omegaconf import OmegaConf

    from lit_cascades.cascade import Cascade
    from lit_cascades.runner import build

    run_dir = ensure_run(dataset)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    cascade_dir = tmp / "cascade"
    subprocess.run([sys.executable, "-m", "recipes.serve", f"run={run_dir}", "target_rate=0.2",
                    f"save={cascade_dir}", "serve=false"], cwd=ROOT, check=True, timeout=1800)
    cascade = Cascade.load(cascade_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    dm = build(cfg.data, "data", seed=cfg.seed)
    dm.setup()
    x = dm.splits["test"].x
    rng = np.random.default_rng(seed)
    jobs = [rng.integers(0, len(x), size=int(rng.integers(1, 5))).tolist() for _ in range(n_requests)]
    bodies = [json.dumps({"inputs": x[j].tolist()}).encode() for j in jobs]
    offline = cascade.predict(x[[i for j in jobs for i in j]])
    sides = {"cascade": ["recipes.serve", f"cascade={cascade_dir}", *SERVER],
             "large_only": ["benchmarks.serve", "--serve-large", str(cascade_dir), *SERVER]}
    summary, ratios = measure(sides, bodies, rounds, clients, tmp)
    return {"run_dir": str(run_dir.relative_to(ROOT)), "requests": n_requests, "rows": sum(map(len, jobs)),
            "clients": clients, "rounds": rounds, "server": SERVER, "calibration": _calibration(cascade.calibration),
            "offline_deferral_rate_of_the_requests": offline.deferral_rate, "sides": summary, **ratios}


def bench_lm_pair(n_requests: int, rounds: int, clients: int, seed: int) -> dict[str, Any]:
    """The embedded LM pair (``lm_pair`` recipe, ``smoke`` preset, built once into the cache) as a sequence-level
    generation cascade (Chow average log-probability, 8 new tokens), calibrated on 300 standard-library code lines
    and served on others from the same pool; the baseline is the large model alone through the same code path
    (a cascade whose "small" model is the large one and never defers)."""
    import math

    from lit_cascades.cascade_lm import GenerationCascade
    from lit_cascades.data.lm import stdlib_files
    from lit_cascades.lm_tasks import build_pair_cached
    from lit_cascades.models.lm_pair import load_pair

    pair_dir = build_pair_cached("smoke", ROOT / "recipes" / "configs")
    pair = load_pair(pair_dir)
    lines = sorted({ln.strip() for f in stdlib_files()[200:260] for ln in f.read_text(errors="replace").splitlines()
                    if 12 <= len(ln.strip()) <= 60})
    rng = np.random.default_rng(seed)
    rng.shuffle(lines)
    cal, pool = lines[:300], lines[300:600]
    kw = {"rule": "chow_average", "max_new_tokens": 8}
    cascade = GenerationCascade(pair.small, pair.large, pair.tokenizer, **kw)
    cascade.calibrate(cal, 0.2, confidence=0.95, method="clopper_pearson")
    large_only = GenerationCascade(pair.large, pair.large, pair.tokenizer, threshold=-math.inf, **kw)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_lm_"))
    cascade.save(tmp / "cascade")
    large_only.save(tmp / "large_only")
    jobs = [rng.integers(0, len(pool), size=int(rng.integers(1, 3))).tolist() for _ in range(n_requests)]
    bodies = [json.dumps({"inputs": [pool[i] for i in j]}).encode() for j in jobs]
    offline = cascade.generate([pool[i] for j in jobs for i in j])
    sides = {"cascade": ["recipes.serve", f"cascade={tmp / 'cascade'}", *SERVER],
             "large_only": ["recipes.serve", f"cascade={tmp / 'large_only'}", *SERVER]}
    summary, ratios = measure(sides, bodies, rounds, clients, tmp)
    return {"pair": "lm_pair smoke preset (cache)", "requests": n_requests, "rows": sum(map(len, jobs)),
            "clients": clients, "rounds": rounds, "server": SERVER, "calibration": _calibration(cascade.calibration),
            "offline_deferral_rate_of_the_requests": offline.deferral_rate, "sides": summary, **ratios}


def table(payload: dict[str, Any]) -> str:
    """The markdown table of ``serve.json``."""
    lines = [f"Served over HTTP on {payload['machine']['cpu_count']} shared CPU cores, {payload['clients']} "
             f"concurrent clients, LitServe `{' '.join(SERVER)}`; medians over {payload['rounds']} alternating "
             "rounds, latency percentiles over all rounds' requests; load = 1-minute load average at the start and "
             "end of that data set's benchmark.",
             "",
             "| data | served | deferral rate (live / bound) | accuracy (val) | requests/s | p50 ms | p99 ms "
             "| throughput ratio cascade / large (min–max) | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for data, r in payload["results"].items():
        cal = r["calibration"]
        lo = r.get("loadavg_start", payload["load"]["loadavg_start"])[0]
        hi = r.get("loadavg_end", payload["load"]["loadavg_end"])[0]
        for side in ("cascade", "large_only"):
            s = r["sides"][side]
            if side == "cascade":
                rate = f"{s['server_stats']['deferral_rate']:.3f} / {cal['bound']:.3f}"
                acc = "–" if cal["cascade_quality"] is None else f"{cal['cascade_quality']:.3f}"
                t = r["throughput_ratio"]
                ratio, load = f"{t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f})", f"{lo:.1f}–{hi:.1f}"
            else:
                rate = "– (large model only)"
                acc = "–" if cal["large_quality"] is None else f"{cal['large_quality']:.3f}"
                ratio = load = ""
            lines.append(f"| {data} | {side.replace('_', ' ')} | {rate} | {acc} | "
                         f"{s['requests_per_s']['median']:.0f} | {s['latency_ms']['p50']:.1f} | "
                         f"{s['latency_ms']['p99']:.1f} | {ratio} | {load} |")
    return "\n".join(lines) + "\n"


def write_table() -> Path:
    payload = json.loads((RESULTS / f"{NAME}.json").read_text())
    path = RESULTS / f"{NAME}.table.md"
    path.write_text(table(payload))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits"], choices=[*sorted(RUNS), "lm_pair"])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--serve-large", help=argparse.SUPPRESS)  # internal: the large-only server
    args, rest = parser.parse_known_args()
    if args.serve_large:
        from lit_cascades.serving import serve

        kv = dict(a.split("=", 1) for a in rest)
        serve(LargeOnlyAdapter(args.serve_large), port=int(kv["port"]),
              max_batch_size=int(kv["max_batch_size"]), batch_timeout=float(kv["batch_timeout"]),
              workers_per_device=int(kv["workers"]), accelerator=kv["accelerator"])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not args.tables_only:
        run = Run(NAME, note="shared 2-core machine: other engineers' tests and training ran at the same time; "
                             "clients, API servers and inference workers of both sides share the same cores")
        old = RESULTS / f"{NAME}.json"
        previous = json.loads(old.read_text()) if old.is_file() else {}
        results = previous.get("results", {})
        for r in results.values():  # entries written before per-entry load: the load of the run that wrote them
            r.setdefault("loadavg_start", previous["load"]["loadavg_start"])
            r.setdefault("loadavg_end", previous["load"]["loadavg_end"])
        for d in args.datasets:  # a dataset not re-run keeps its earlier entry (each entry has its own load)
            load0, t0 = os.getloadavg(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            res = (bench_lm_pair(args.requests // 2, args.rounds, args.clients, args.seed) if d == "lm_pair"
                   else bench_dataset(d, args.requests, args.rounds, args.clients, args.seed))
            results[d] = {**res, "started_utc": t0, "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg())}
        run.write({"clients": args.clients, "rounds": args.rounds, "results": results})
    print(write_table().read_text())


if __name__ == "__main__":
    main()
