"""Results of the Gatekeeper section of the README (Rabanser et al., *Gatekeeper: Improving Model Cascades
Through Confidence Tuning*, arXiv:2502.19335): the α sweeps over 3 seeds.

    python -m benchmarks.results_gatekeeper                        # the default run and both sweeps
    python -m benchmarks.results_gatekeeper --data fashion_mnist   # one of them (default | digits | fashion_mnist)
    python -m benchmarks.results_gatekeeper --tables-only          # table.md and figures from raw.json alone

``default`` is the command a newcomer runs first (``python -m recipes.gatekeeper``, no preset: its time is the
one the README states). Each sweep is one run of the recipe (``preset=sweep_<data>``, one thread, in
``runs/results_gatekeeper/<data>/``; a finished run directory is reused, an unfinished one resumed): per seed
M_L and M_S are trained with cross-entropy, then M_S is fine-tuned with the Gatekeeper loss for every α and,
as the fair baseline, with cross-entropy for the same number of steps. Writes
``docs/results/gatekeeper_<data>/raw.json`` (every (method, seed) row of the recipe's sweep.csv, the setting,
the command, wall and CPU seconds, load average, git commit, machine) and, from that file alone,
``docs/results/gatekeeper_<data>/table.md`` and ``docs/img/gatekeeper_sweep_<data>.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks._common import git_output, save_figure, shared_legend
from benchmarks._common import results_machine as machine
from lit_cascades.effects import mean_std, paired_differences, paired_interval, seed_verdict

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "results_gatekeeper"
DATA = ("default", "digits", "fashion_mnist")
COLUMNS = ("test_acc", "s_d", "s_o", "auroc", "auc_df", "quality_at_rate")
HEADERS = ("small acc", "s_d", "s_o", "AUROC", "AUC-DF", "cascade acc @ 20% deferral")
BASELINE = "cross-entropy fine-tune"
TIMEOUT_S = 3 * 3600


def out_dir(data: str) -> Path:
    return ROOT / "docs" / "results" / f"gatekeeper_{data}"


# ---------------------------------------------------------------------------------------------- running
def run_sweep(data: str) -> dict[str, Any]:
    """Run (or reuse / resume) the sweep of ``data``; return its timing record."""
    run_dir = RUNS / data
    finished = (run_dir / "sweep.csv").exists() and (run_dir / "metrics.json").exists()
    rel = run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir
    preset = [] if data == "default" else [f"preset=sweep_{data}"]
    args = [*preset, f"resume={run_dir}" if run_dir.exists() else f"output_dir={run_dir}"]
    cmd = [sys.executable, "-m", "recipes.gatekeeper", *args]
    timing: dict[str, Any] = {"command": " ".join(["python -m recipes.gatekeeper", *preset, f"output_dir={rel}"])}
    if finished:
        info = json.loads((run_dir / "run.json").read_text())
        start = datetime.fromisoformat(info["created"]).timestamp()
        timing.update(reused=True, wall_s=round((run_dir / "sweep.csv").stat().st_mtime - start, 1),
                      note="finished run directory reused: wall time from run.json 'created' to sweep.csv")
        return timing
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=TIMEOUT_S)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing.update(reused=False, wall_s=round(time.perf_counter() - t0, 1),
                  cpu_s=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
                  loadavg_after=list(os.getloadavg()))
    return timing


def collect(data: str, timing: dict[str, Any]) -> dict[str, Any]:
    """raw.json of ``data`` from its finished run directory."""
    from omegaconf import OmegaConf

    run_dir = RUNS / data
    cfg = OmegaConf.load(run_dir / "config.yaml")
    with open(run_dir / "sweep.csv") as f:
        rows = [{"method": r["method"], "seed": int(r["seed"]), **{k: float(r[k]) for k in COLUMNS}}
                for r in csv.DictReader(f)]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    setting = {
        "data": OmegaConf.to_container(cfg.data), "small": OmegaConf.to_container(cfg.small),
        "large": OmegaConf.to_container(cfg.large), "gatekeeper": OmegaConf.to_container(cfg.gatekeeper),
        "eval": OmegaConf.to_container(cfg.eval), "seeds": list(cfg.sweep.seeds),
        "alphas": list(cfg.sweep.alphas) or [cfg.gatekeeper.module.alpha],
    }
    large_acc = {}
    for seed in setting["seeds"]:
        m = json.loads((run_dir / f"seed{seed}" / "large" / "metrics.json").read_text())
        large_acc[seed] = m["test_acc"]
    params = {}
    small_metrics = run_dir / f"seed{setting['seeds'][0]}" / "small" / "metrics.json"
    if small_metrics.exists():
        params["small"] = json.loads(small_metrics.read_text()).get("params")
    return {
        "what": f"Gatekeeper α sweep on {data} (arXiv:2502.19335): small model fine-tuned with the Gatekeeper loss "
                "per α vs with cross-entropy for the same steps; test split",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_output("rev-parse", "HEAD"),
        "run_git_commit": json.loads((run_dir / "run.json").read_text()).get("git_commit"),
        "machine": machine(), "timing": timing, "setting": setting, "params": params,
        "large_test_acc": large_acc, "rows": rows, "recipe_summary": metrics.get("summary"),
    }


# ---------------------------------------------------------------------------------------------- tables
def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r)
    return {m: {k: (statistics.fmean(r[k] for r in g), statistics.stdev(r[k] for r in g) if len(g) > 1 else 0.0)
                for k in COLUMNS} for m, g in groups.items()}


def alpha_of(method: str) -> float:
    """``"gatekeeper α=0.3"`` (sweep) or ``"gatekeeper (α=0.3)"`` (one α) -> 0.3."""
    return float(method.split("=")[1].rstrip(")"))


def order(summary: dict[str, Any]) -> list[str]:
    """cross-entropy, its fine-tune, then the Gatekeeper α in increasing order."""
    gk = sorted((m for m in summary if m.startswith("gatekeeper")), key=alpha_of)
    return [m for m in ("cross-entropy", BASELINE) if m in summary] + gk


def table_md(raw: dict[str, Any], data: str) -> str:
    rows, s = raw["rows"], raw["setting"]
    summary = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    large = list(raw["large_test_acc"].values())
    d, sm, lg, gk = s["data"], s["small"], s["large"], s["gatekeeper"]
    n_train = f"first {d['limit_train']:,} training images" if d.get("limit_train") else "all training images"
    lines = [
        f"`{raw['timing']['command']}` ({n_train}; M_S = `{sm['model']['_target_'].rsplit('.', 1)[1]}` "
        f"{ {k: v for k, v in sm['model'].items() if k != '_target_'} }, {sm['epochs']} epochs; M_L = "
        f"`{lg['model']['_target_'].rsplit('.', 1)[1]}` { {k: v for k, v in lg['model'].items() if k != '_target_'} }, "
        f"{lg['epochs']} epochs, test accuracy {statistics.fmean(large):.3f} ± {statistics.stdev(large):.3f}; "
        f"fine-tuning {gk['epochs']} epochs at lr {gk['module']['lr']}). Test split, mean ± std over seeds "
        f"{seeds}; confidence = max softmax; s_d against the `{s['eval']['ideal']}` ideal curve "
        f"(0 = random deferral, 1 = ideal).",
        "",
        "| method | " + " | ".join(HEADERS) + " |",
        "|---" * (len(HEADERS) + 1) + "|",
    ]
    for m in order(summary):
        lines.append(f"| {m} | " + " | ".join(f"{summary[m][k][0]:.3f} ± {summary[m][k][1]:.3f}" for k in COLUMNS)
                     + " |")
    per_seed = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"]) for m in summary}
    lines += ["", "Each Gatekeeper fine-tune minus the cross-entropy fine-tune of equal length, paired by seed (the two "
              "start from the seed's M_S): 'beyond seed spread' = the same sign on every seed and |mean| > 2 std, "
              "else noise; the interval is the 95% Student-t interval of the mean difference.", "",
              "| method | Δ s_d per seed | Δ s_d (mean ± std) | 95% interval | verdict | Δ small acc (mean ± std) |",
              "|---|---|---|---|---|---|"]
    for m in order(summary):
        if not m.startswith("gatekeeper"):
            continue
        d, acc = (paired_differences({r["seed"]: r[k] for r in per_seed[m]}, {r["seed"]: r[k] for r in per_seed[BASELINE]})
                  for k in ("s_d", "test_acc"))
        lines.append(f"| {m} | {' / '.join(f'{x:+.3f}' for x in d)} | {mean_std(d)} | {paired_interval(d)} | "
                     f"{seed_verdict(d)} | {mean_std(acc)} |")
    t = raw["timing"]
    cpu = f", {t['cpu_s'] / 60:.1f} CPU minutes" if "cpu_s" in t else ""
    model = f" {raw['machine']['cpu']}" if raw["machine"].get("cpu") else ""
    lines += ["", f"Run time: {t['wall_s'] / 60:.1f} min wall{cpu}, one torch thread per run, on a 2-core{model} machine "
              f"shared with other jobs (load average {raw['machine']['loadavg_1_5_15'][1]:.1f} when written). "
              f"Raw rows: `docs/results/gatekeeper_{data}/raw.json`"
              + ("." if data == "default" else f"; figure: `docs/img/gatekeeper_sweep_{data}.png`.")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- figure
PANELS = (("s_d", "s_d (deferral performance)"), ("test_acc", "small-model accuracy"),
          ("auroc", "AUROC (correct vs incorrect)"), ("quality_at_rate", "cascade accuracy @ 20% deferral"))


def figure(raw: dict[str, Any], data: str) -> Path:
    """One panel per metric against α: Gatekeeper with ±1 std error bars (α labelled on every point); the
    CE-trained small model and the equally long CE fine-tune as horizontal lines with ±1 std bands; the s_d
    panel adds the random-deferral reference (s_d = 0), the last panel the small-only and large-only accuracies."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = raw["rows"]
    summary = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    gk = [m for m in order(summary) if m.startswith("gatekeeper")]
    alphas = [alpha_of(m) for m in gk]
    fig, grid = plt.subplots(2, 2, figsize=(10.5, 7.6))
    axes = grid.ravel()
    refs = {"cross-entropy": ("tab:gray", "CE-trained M_S (before fine-tuning)"),
            BASELINE: ("tab:orange", "CE fine-tune, same steps (fair baseline)")}
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for method, (color, name) in refs.items():
            mean, std = summary[method][key]
            ax.axhline(mean, color=color, ls="--", lw=1.2, label=name)
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.15)
        means = [summary[m][key][0] for m in gk]
        ax.errorbar(alphas, means, yerr=[summary[m][key][1] for m in gk], marker="o", capsize=3, color="tab:blue",
                    label="Gatekeeper fine-tune (α swept)")
        for a, y in zip(alphas, means, strict=True):
            ax.annotate(f"α={a:g}", (a, y), textcoords="offset points", xytext=(4, 5), fontsize=7)
        if key == "s_d":
            ax.axhline(0.0, color="black", ls=":", lw=1, label="random deferral (s_d = 0; ideal = 1)")
        if key == "quality_at_rate":
            large = statistics.fmean(raw["large_test_acc"].values())
            ax.axhline(large, color="tab:green", ls=":", lw=1.2, label=f"large model only ({large:.3f})")
        ax.set_xlabel("Gatekeeper α (log scale)")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=10)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    shared_legend(fig, axes)
    fig.suptitle(f"Gatekeeper α sweep on {data.replace('_', '-')} (test split). Error bars and bands: ±1 std over "
                 f"{len(seeds)} seeds {seeds}\nwhether a gap is beyond the seed spread is judged on per-seed paired "
                 "differences (the table beside this figure), not on these bands", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    return save_figure(fig, f"gatekeeper_sweep_{data}.png")


def write_outputs(data: str) -> None:
    raw = json.loads((out_dir(data) / "raw.json").read_text())
    (out_dir(data) / "table.md").write_text(table_md(raw, data))
    if data != "default":  # one α: the table says it all
        figure(raw, data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", choices=DATA, default=list(DATA))
    p.add_argument("--tables-only", action="store_true", help="regenerate table.md and figures from raw.json")
    args = p.parse_args(argv)
    for data in args.data:
        if not args.tables_only:
            timing = run_sweep(data)
            out_dir(data).mkdir(parents=True, exist_ok=True)
            raw = collect(data, timing)
            (out_dir(data) / "raw.json").write_text(json.dumps(raw, indent=1) + "\n")
        write_outputs(data)
        print(f"wrote {out_dir(data) / 'table.md'}" + ("" if data == "default" else
                                                        f" and docs/img/gatekeeper_sweep_{data}.png"))


if __name__ == "__main__":
    main()
