"""Results of docs/taskformer.md (Sangkloy et al., *A Sketch Is Worth a Thousand Words: Image Retrieval with Text
and Sketch*, ECCV 2022, arXiv:2208.03354) on the embedded constructed scenes, over several seeds.

    python -m benchmarks.results_taskformer                    # train every run, write raw.json, tables, figure
    python -m benchmarks.results_taskformer --tables-only      # regenerate the table and figure from raw.json
    python -m benchmarks.results_taskformer --seeds 0 1 2 3 --configs TASK-former

Each configuration is ``python -m recipes.taskformer <overrides> seed=<s>`` (one thread) in
``runs/results_taskformer/<config>-seed<s>/``; finished run directories are reused unless ``--rerun``. The reported
setting (``SETTING``) is the default preset with half the training scenes (1,800) and 5 epochs instead of 10
(about a quarter of the optimiser steps), so that the 4 default configurations × 3 seeds fit a CPU budget; the test gallery
(600 scenes, 200 families of three) is the default's. Writes ``docs/results/taskformer/raw.json`` (per-run test
metrics, commands, commit, machine and load) and, from that file alone, ``docs/results/taskformer/table.md`` and
``docs/img/taskformer_recall.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks._common import git_output, run_recipe_dir, save_figure, write_tables
from benchmarks._common import results_machine as machine
from lit_cascades.effects import mean_std, paired_differences, paired_interval
from lit_cascades.effects import seed_verdict as verdict

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "taskformer"
RUNS = ROOT / "runs" / "results_taskformer"
RECIPE = "recipes.taskformer"
SEEDS = [0, 1, 2]
SETTING = ["data.num_train=1800", "train.epochs=5", "+trainer.check_val_every_n_epoch=5", "eval.examples=0",
           "logger.wandb=false", "trainer.enable_progress_bar=false"]
CONFIGS = {  # name: recipe overrides
    "text only (baseline)": ["preset=text_only"],
    "sketch only (baseline)": ["preset=sketch_only"],
    "TASK-former": [],
    "TASK-former − L_c − L_d": ["model.w_classification=0.0", "model.w_caption=0.0"],
    "TASK-former − L_c": ["model.w_classification=0.0"],
    "TASK-former − L_d": ["model.w_caption=0.0"],
}
DEFAULT_CONFIGS = list(CONFIGS)[:4]  # the single-loss ablations: --configs (not in the published table: CPU budget)
QUERIES = ("text+sketch", "text", "sketch")
KS = ("recall@1", "recall@5", "recall@10")


def slug(name: str) -> str:
    return name.split(" (")[0].replace(" − ", "_no_").replace(" ", "_").replace("-", "").lower()


def _values(raw: dict[str, Any], config: str, query: str, key: str) -> dict[int, float]:
    return {r["seed"]: 100 * r["test"][query][key] for r in raw["runs"]
            if r["config"] == config and query in r["test"]}


def table(raw: dict[str, Any]) -> str:
    """Recall@K (%) per configuration and query type, mean ± sample std over seeds, and the paired effects."""
    seeds = sorted({r["seed"] for r in raw["runs"]})
    data = raw["data"]
    configs = [c for c in CONFIGS if any(r["config"] == c for r in raw["runs"])]
    lines = [f"Test gallery: {data['n_test']} constructed scenes (families of three); {data['n_train']:,} training "
             f"scenes, {raw['epochs']} epochs. Recall@K in %, mean ± sample std over seeds {seeds} (model "
             "initialisation, shuffling, query dropout, evaluation sketches; the scenes are fixed).", "",
             "| model | query | n | R@1 | R@5 | R@10 |", "|---|---|---:|---:|---:|---:|"]
    for c in configs:
        for q in QUERIES:
            cols = [_values(raw, c, q, k) for k in KS]
            if cols[0]:
                lines.append(f"| {c} | {q} | {len(cols[0])} | " + " | ".join(mean_std(list(v.values()), 1)
                                                                            for v in cols) + " |")
    effects = [("text+sketch query: TASK-former − text-only model", "TASK-former", "text+sketch",
                "text only (baseline)", "text"),
               ("text+sketch query: TASK-former − sketch-only model", "TASK-former", "text+sketch",
                "sketch only (baseline)", "sketch"),
               ("text query: TASK-former − text-only model", "TASK-former", "text", "text only (baseline)", "text"),
               ("sketch query: TASK-former − sketch-only model", "TASK-former", "sketch", "sketch only (baseline)",
                "sketch"),
               *((f"{q} query: ({abl}) minus (TASK-former)", abl, q, "TASK-former", q)
                 for abl in configs if abl.startswith("TASK-former −") for q in QUERIES)]
    lines += ["", "Effects on R@1 (points), paired by seed; verdict: *beyond seed spread* when all seeds agree in sign "
              "and |mean Δ| > 2 × std of Δ, else *noise*; 95% interval of the mean Δ: Student t over the seeds.", "",
              "| comparison | Δ R@1 mean ± std | per seed | verdict | 95% interval |", "|---|---:|---|---|---:|"]
    for label, a, qa, b, qb in effects:
        va, vb = _values(raw, a, qa, "recall@1"), _values(raw, b, qb, "recall@1")
        if va or vb:
            d = paired_differences(va, vb)
            lines.append(f"| {label} | {mean_std(d, 1)} | {' / '.join(f'{x:+.1f}' for x in d)} | {verdict(d)} | "
                         f"{paired_interval(d, digits=1)} |")
    return "\n".join(lines) + "\n"


def tables(raw: dict[str, Any]) -> dict[str, str]:
    """``{file name: markdown}`` computed from the raw results alone."""
    return {"table.md": table(raw)}


def figure(raw: dict[str, Any]) -> Any:
    from lit_cascades.plotting import new_axes

    configs = [c for c in CONFIGS if any(r["config"] == c for r in raw["runs"])]
    bars = [(c, q) for c in configs for q in QUERIES if _values(raw, c, q, "recall@1")]
    colors = {"text+sketch": "tab:purple", "text": "tab:blue", "sketch": "tab:green"}
    n = len({r["seed"] for r in raw["runs"]})
    fig, ax = new_axes(figsize=(9.0, 4.6))
    for i, (c, q) in enumerate(bars):
        v = list(_values(raw, c, q, "recall@1").values())
        ax.bar(i, statistics.fmean(v), 0.7, yerr=statistics.stdev(v) if len(v) > 1 else 0.0, capsize=3,
               color=colors[q], label=f"{q} query" if q not in [b[1] for b in bars[:i]] else None)
        ax.scatter([i] * len(v), v, color="k", s=8, zorder=3)
    ax.axhline(100 * 2 / 3, color="0.3", ls="--", lw=1, label="single-modality ceiling ≈ 2/3 (twins)")
    ax.axhline(100 / raw["data"]["n_test"], color="0.6", ls=":", lw=1, label="random ranking")
    ax.set_xticks(range(len(bars)), [f"{c.replace(' (baseline)', '')}\n{q}" for c, q in bars], fontsize=6.5,
                  rotation=30, ha="right")
    ax.set_ylabel(f"test Recall@1 (%), gallery of {raw['data']['n_test']}")
    ax.set_ylim(0, 105)
    ax.set_title(f"TASK-former on constructed scenes: Recall@1 by model and query type (mean ± std over {n} seeds; "
                 "dots: seeds)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def write_outputs(raw: dict[str, Any]) -> None:
    write_tables(OUT, tables(raw))
    print(f"wrote {save_figure(figure(raw), 'taskformer_recall.png', dpi=130).relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables-only", action="store_true", help="regenerate the table and figure from raw.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    ap.add_argument("--rerun", action="store_true", help="train again even when a finished run directory exists")
    args = ap.parse_args(argv)
    raw_path = OUT / "raw.json"
    if args.tables_only:
        write_outputs(json.loads(raw_path.read_text()))
        return
    runs, data = [], None
    for seed in args.seeds:  # seed-major: an interrupted call still has every configuration for the first seeds
        for name in args.configs:
            out = RUNS / f"{slug(name)}-seed{seed}"
            print(f"[results_taskformer] {name} seed {seed}", flush=True)
            info = run_recipe_dir(RECIPE, [*CONFIGS[name], f"seed={seed}", *SETTING], out, args.rerun)
            metrics = json.loads((out / "metrics.json").read_text())
            data = metrics["data"]
            runs.append({"config": name, "seed": seed, **info, "test": metrics["test"], "params": metrics["params"]})
    epochs = next(int(s.split("=")[1]) for s in SETTING if s.startswith("train.epochs="))
    raw = {"command": " ".join(["python -m benchmarks.results_taskformer",
                                *(["--seeds", *map(str, args.seeds)] if args.seeds != SEEDS else []),
                                *(["--configs", *(repr(c) for c in args.configs)] if args.configs != DEFAULT_CONFIGS
                                  else [])]),
           "commit": git_output("rev-parse", "HEAD"),
           "dirty": bool(git_output("status", "--porcelain", "--", "lit_cascades", "recipes")),
           "seeds": args.seeds, "setting": SETTING, "epochs": epochs, "machine": machine(), "data": data,
           "note": "one thread per run on a 2-core machine shared with other work (see loadavg per run)", "runs": runs}
    OUT.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    write_outputs(raw)


if __name__ == "__main__":
    main()
