"""Reproduce the results table of docs/taskformer.md: the TASK-former recipe on the embedded constructed scenes,
for several seeds, as TASK-former (text+sketch), the single-modality baselines and with each auxiliary loss
removed. Runs ``python -m recipes.taskformer`` in subprocesses (``--jobs`` at a time, one thread each), reads
their metrics.json and prints a markdown table of mean ± std Recall@K over seeds.

    python -m benchmarks.taskformer_results [--seeds 0 1 2 --jobs 2 --extra train.epochs=10]

Writes benchmarks/results/taskformer_results.{json,md}; run directories under runs/taskformer_results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks._common import RESULTS, write_results
from lit_cascades.runner import summarize_runs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: recipe overrides
    "text only (baseline)": ["query=text"],
    "sketch only (baseline)": ["query=sketch"],
    "TASK-former": [],
    "TASK-former − L_c": ["model.w_classification=0.0"],
    "TASK-former − L_d": ["model.w_caption=0.0"],
    "TASK-former − L_c − L_d": ["model.w_classification=0.0", "model.w_caption=0.0"],
}


def _run(name: str, seed: int, extra: list[str], out_root: Path) -> dict:
    slug = name.split(" (")[0].replace(" ", "_").replace("−", "no").replace("+", "")
    out = out_root / f"{slug}-seed{seed}"
    metrics = out / "metrics.json"
    if not metrics.exists():
        t = time.time()
        proc = subprocess.run([sys.executable, "-m", "recipes.taskformer", *CONFIGS[name], f"seed={seed}",
                               f"output_dir={out}", "logger.wandb=false", "trainer.enable_progress_bar=false", *extra],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-2000:]}")
        (out / "wall_seconds.txt").write_text(f"{time.time() - t:.0f}\n")
    return json.loads(metrics.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--extra", nargs="*", default=[], help="more recipe overrides for every run")
    args = ap.parse_args()
    out_root = ROOT / "runs" / "taskformer_results"
    jobs = [(name, seed) for name in args.configs for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: _run(*j, args.extra, out_root), jobs))
    ks = ("recall@1", "recall@5", "recall@10")
    rows = [{"model": name, "query": qt, **{k: 100 * vals[k] for k in ks}}
            for (name, _seed), m in zip(jobs, results) for qt, vals in m["test"].items()]
    lines = ["| model | query | R@1 | R@5 | R@10 |", "|---|---|---:|---:|---:|"]
    table = {}
    for name in args.configs:
        per_query = summarize_runs([r for r in rows if r["model"] == name], "query", ks)
        table[name] = per_query
        for qt in ("text+sketch", "text", "sketch"):
            if qt in per_query:
                cells = " | ".join(f"{mean:.1f} ± {sd:.1f}" for mean, sd in (per_query[qt][k] for k in ks))
                lines.append(f"| {name} | {qt} | {cells} |")
    md = "\n".join(lines)
    write_results("taskformer_results", {"seeds": args.seeds, "extra": args.extra, "table": table})
    (RESULTS / "taskformer_results.md").write_text(md + "\n")
    print(f"seeds {args.seeds}, mean ± std over seeds, test gallery of {results[0]['data']['n_test']} images\n")
    print(md)


if __name__ == "__main__":
    main()
