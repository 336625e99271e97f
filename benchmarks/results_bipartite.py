"""Results of docs/bipartite_ranking.md (Lukasik et al., *Bipartite Ranking From Multiple Labels: On Loss Versus
Label Aggregation*, ICML 2025, arXiv:2504.11284), regenerated from the recipe presets over several seeds.

    python -m benchmarks.results_bipartite                 # run the default experiments, write everything
    python -m benchmarks.results_bipartite --tables-only   # regenerate the tables and figures from raw.json
    python -m benchmarks.results_bipartite --only pareto_synthetic   # add (or redo) one experiment, keep the others

Each experiment is one ``python -m recipes.bipartite_ranking <overrides>`` run (one thread) in
``runs/results_bipartite/<experiment>/``; a finished run directory is reused unless ``--rerun``. The per-seed test
metrics of every stage, the Bayes-optimal references, the commands, the git commit and the machine are written to
``docs/results/bipartite/raw.json``; the tables (``docs/results/bipartite/*.md``) and the figures
(``docs/img/bipartite_ranking_*.png``) are generated from that file alone (:func:`tables`, :func:`figures`).
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
OUT = ROOT / "docs" / "results" / "bipartite"
RUNS = ROOT / "runs" / "results_bipartite"
RECIPE = "recipes.bipartite_ranking"
SEEDS = [0, 1, 2]
SWEEP_WEIGHTS = [0.1, 0.3, 0.5, 0.7, 0.9]
#: experiment name -> recipe overrides (every run also gets logger/progress-bar/output_dir overrides)
EXPERIMENTS: dict[str, list[str]] = {
    "digits": [],  # the default preset: digits, `even` and `high`, seeds 0, 1, 2
    "synthetic": ["preset=synthetic"],
    "dictatorship": ["preset=dictatorship"],
    "skew": ["preset=skew", "seeds=[0,1,2]"],
    "pareto_synthetic": ["preset=synthetic", "sweep=weights", "seeds=[0,1,2]",
                         "sweep_weights=[" + ",".join(f"{w:g}" for w in SWEEP_WEIGHTS) + "]"],
}
#: run by default; pareto_synthetic (30 fits) only with --only pareto_synthetic: it did not fit the CPU budget
DEFAULT_EXPERIMENTS = ["digits", "synthetic", "dictatorship", "skew"]
COMMON = ["logger.wandb=false", "trainer.enable_progress_bar=false"]


# --------------------------------------------------------------------------------------------------------
# provenance and running
# --------------------------------------------------------------------------------------------------------
def run_experiment(name: str, rerun: bool) -> dict[str, Any]:
    """Run (or reuse) one experiment's recipe run."""
    info = run_recipe_dir(RECIPE, [*EXPERIMENTS[name], *COMMON], RUNS / name, rerun)
    return {**info, "overrides": EXPERIMENTS[name]}


def _stage_rows(out: Path) -> list[dict[str, Any]]:
    """Every stage's test metrics with its plan keys (seed, objective / aggregation / weight / prior)."""
    from omegaconf import OmegaConf

    rows = []
    for cfg_path in sorted(out.glob("seed*/**/config.yaml")):
        metrics = cfg_path.parent / "metrics.json"
        if not metrics.exists():
            continue
        cfg = OmegaConf.to_container(OmegaConf.load(cfg_path))
        row = {k: cfg[k] for k in ("stage", "seed", "objective", "aggregation", "weight", "prior") if k in cfg}
        row.update({k: v for k, v in json.loads(metrics.read_text()).items() if isinstance(v, int | float)})
        rows.append(row)
    return rows


def bayes_front(out: Path) -> list[list[float]]:
    """The Bayes-optimal Pareto front of the first two labels on the run's test split (known η)."""
    import torch
    from omegaconf import OmegaConf

    from lit_cascades.functional import binary_auroc
    from lit_cascades.runner import build

    cfg = OmegaConf.load(out / "config.yaml")
    dm = build(cfg.data, "data")
    dm.setup()
    test = dm.splits["test"]
    eta, labels = test.eta[:, :2].double(), test.labels[:, :2]
    curve = []
    for t in torch.linspace(0, 1, 101, dtype=torch.float64):
        auc = binary_auroc(eta @ torch.stack([t, 1 - t]), labels)
        curve.append([round(float(auc[0]), 6), round(float(auc[1]), 6)])
    return curve


def collect(name: str, info: dict[str, Any]) -> dict[str, Any]:
    out = RUNS / name
    metrics = json.loads((out / "metrics.json").read_text())
    exp: dict[str, Any] = {**info, "stages": _stage_rows(out)}
    if "data" in metrics:
        exp["data"] = metrics["data"]
    if name == "skew":
        exp["reference"] = {k: {r: v[r] for r in ("priors", "bayes_loss_aggregation", "bayes_label_aggregation")
                                if r in v} for k, v in metrics["sweep_priors"].items()}
    elif name == "pareto_synthetic":
        exp["reference"] = {"bayes_front": bayes_front(out)}
    else:
        exp["reference"] = {k: metrics[k] for k in ("bayes_loss_aggregation", "bayes_label_aggregation", "theory")
                            if k in metrics}
    return exp


# --------------------------------------------------------------------------------------------------------
# tables (from raw.json only)
# --------------------------------------------------------------------------------------------------------
def _by(stages: list[dict[str, Any]], **keys: Any) -> list[dict[str, Any]]:
    rows = [s for s in stages if all(s.get(k) == v for k, v in keys.items())]
    return sorted(rows, key=lambda s: s["seed"])


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
    """Per-seed differences ``a[key] - b[key]`` (rows matched by seed; a seed missing on one side raises)."""
    return paired_differences({r["seed"]: r[key] for r in a}, {r["seed"]: r[key] for r in b})


def _labels(exp: dict[str, Any]) -> list[str]:
    return exp["data"]["labels"] if "data" in exp else ["label0", "label1"]


DATA_NAMES = {
    "digits": "digits, `even` (π {0:.2f}) & `high` = {{8, 9}} (π {1:.2f}), default preset",
    "synthetic": "synthetic noisy, π = (0.5, 0.1), `preset=synthetic`",
    "dictatorship": "deterministic, π = (0.5, 0.1), `preset=dictatorship`",
}
OBJ_NAMES = {"loss_aggregation": "LoA", "label_aggregation": "LaA (sum, difference)"}


def table_worst_label(raw: dict[str, Any]) -> str:
    lines = [f"Test AUROC, mean ± sample std over seeds {raw['seeds']} (n = {len(raw['seeds'])} per row; `worst` is "
             "the mean over seeds of each run's worst label). Δ worst = LoA − LaA worst-label AUROC, paired by seed; "
             "verdict: *beyond seed spread* when all seeds agree in sign and |mean Δ| > 2 × std of Δ, else *noise*; 95% "
             "interval of the mean Δ: Student t over the seeds.",
             "", "| data | objective | AUC label 1 | AUC label 2 | worst label | n |", "|---|---|---:|---:|---:|---:|"]
    diffs_lines = ["", "| data | Δ worst (LoA − LaA) | per seed | verdict | 95% interval | Bayes-optimal LoA / LaA "
                   "worst |", "|---|---:|---|---|---:|---:|"]
    for name in ("digits", "synthetic", "dictatorship"):
        exp = raw["experiments"].get(name)
        if not exp:
            continue
        l1, l2 = _labels(exp)
        data_name = DATA_NAMES[name].format(*exp["data"]["priors"])
        objs = ["loss_aggregation", "label_aggregation", *(f"{n}_only" for n in (l1, l2))]
        for obj in objs:
            rows = _by(exp["stages"], objective=obj)
            if not rows:
                continue
            label = OBJ_NAMES.get(obj, f"`{obj.removesuffix('_only')}` alone")
            lines.append(f"| {data_name} | {label} | {mean_std([r[f'auc_{l1}'] for r in rows])} | "
                         f"{mean_std([r[f'auc_{l2}'] for r in rows])} | {mean_std([r['auc_min'] for r in rows])} | {len(rows)} |")
        ref = exp["reference"]
        for agg in ("loss", "label"):
            b = ref.get(f"bayes_{agg}_aggregation")
            if b:
                lines.append(f"| {data_name} | {'LoA' if agg == 'loss' else 'LaA'}, Bayes-optimal scorer "
                             f"(known η, test split) | {b[f'auc_{l1}']:.3f} | {b[f'auc_{l2}']:.3f} | "
                             f"{b['auc_min']:.3f} | – |")
        d = paired(_by(exp["stages"], objective="loss_aggregation"), _by(exp["stages"], objective="label_aggregation"),
                   "auc_min")
        bayes = (f"{ref['bayes_loss_aggregation']['auc_min']:.3f} / {ref['bayes_label_aggregation']['auc_min']:.3f}"
                 if "bayes_label_aggregation" in ref else "–")
        diffs_lines.append(f"| {data_name} | {mean_std(d)} | {' / '.join(f'{x:+.3f}' for x in d)} | {verdict(d)} | "
                           f"{paired_interval(d)} | {bayes} |")
    return "\n".join(lines + diffs_lines) + "\n"


def table_dictatorship(raw: dict[str, Any]) -> str:
    exp = raw["experiments"]["dictatorship"]
    l1, l2 = _labels(exp)
    ref = exp["reference"]
    theory = ref["theory"]
    lines = [f"`preset=dictatorship`, test split of {exp['data']['n_test']:,} examples; trained rows: mean ± sample "
             f"std over seeds {sorted({s['seed'] for s in exp['stages']})}. P((1,0) ≻ (0,1)) is the fraction of "
             "(label-1-only, label-2-only) test pairs ranked label-1-only first (1: label 1 dictates, 0: label 2).",
             "", "| objective | AUC label 1 (π = 0.5) | AUC label 2 (π = 0.1) | worst label | P((1,0) ≻ (0,1)) | n |",
             "|---|---:|---:|---:|---:|---:|"]
    dictator = theory["loa_dictator"]
    other = l2 if dictator == l1 else l1
    loa_pop = {dictator: 1.0, other: theory[f"loa_auc_{other}"]}
    laa_pop = {l1: theory[f"laa_auc_{l1}"], l2: theory[f"laa_auc_{l2}"]}
    order_pop = "1" if dictator == l1 else "0"
    for agg, pop, order, short in (("loss", loa_pop, order_pop, "LoA"), ("label", laa_pop, "½ (tie)", "LaA")):
        lines.append(f"| {short}, exact optimum (population, closed form) | {pop[l1]:.3f} | {pop[l2]:.3f} | "
                     f"{min(pop.values()):.3f} | {order} | – |")
        b = ref[f"bayes_{agg}_aggregation"]
        lines.append(f"| {short}, exact optimum on the test split | {b[f'auc_{l1}']:.3f} | {b[f'auc_{l2}']:.3f} | "
                     f"{b['auc_min']:.3f} | {b['order_10_over_01']:.3f} | – |")
        rows = _by(exp["stages"], objective=f"{agg}_aggregation")
        lines.append(f"| {short}, trained | {mean_std([r[f'auc_{l1}'] for r in rows])} | {mean_std([r[f'auc_{l2}'] for r in rows])}"
                     f" | {mean_std([r['auc_min'] for r in rows])} | {mean_std([r['order_10_over_01'] for r in rows])} | "
                     f"{len(rows)} |")
    return "\n".join(lines) + "\n"


def _skew_points(exp: dict[str, Any]) -> list[float]:
    return sorted({s["prior"] for s in exp["stages"]}, reverse=True)


def table_skew(raw: dict[str, Any]) -> str:
    exp = raw["experiments"]["skew"]
    seeds = sorted({s["seed"] for s in exp["stages"]})
    lines = [f"`preset=skew seeds=[{','.join(map(str, seeds))}]`: noisy independent labels, π₁ = 0.5, π₂ swept, equal "
             f"weights; mean ± sample std over seeds {seeds} (n = {len(seeds)}). Bayes: the exact optimal scorers on "
             "the same test split. Δ worst = LoA − LaA worst-label AUROC, paired by seed (verdict as above).",
             "", "| π₂ | LoA \\|AUC₁ − AUC₂\\| | LaA \\|AUC₁ − AUC₂\\| | LoA worst | LaA worst | Bayes LoA / LaA worst | "
             "Δ worst | verdict | 95% interval |", "|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for p in _skew_points(exp):
        loa, laa = _by(exp["stages"], prior=p, aggregation="loss"), _by(exp["stages"], prior=p, aggregation="label")
        ref = exp["reference"][f"prior_{p:g}"] if f"prior_{p:g}" in exp["reference"] else exp["reference"][f"prior_{p}"]
        d = paired(loa, laa, "auc_min")
        lines.append(f"| {p:g} | {mean_std([r['auc_diff'] for r in loa])} | {mean_std([r['auc_diff'] for r in laa])} | "
                     f"{mean_std([r['auc_min'] for r in loa])} | {mean_std([r['auc_min'] for r in laa])} | "
                     f"{ref['bayes_loss_aggregation']['auc_min']:.3f} / {ref['bayes_label_aggregation']['auc_min']:.3f}"
                     f" | {mean_std(d)} | {verdict(d)} | {paired_interval(d)} |")
    return "\n".join(lines) + "\n"


def _pareto_means(exp: dict[str, Any], agg: str, key: str) -> list[tuple[float, float, float]]:
    out = []
    for w in sorted({s["weight"] for s in exp["stages"]}):
        vals = [r[key] for r in _by(exp["stages"], aggregation=agg, weight=w)]
        out.append((w, statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0))
    return out


def table_pareto(raw: dict[str, Any]) -> str:
    exp = raw["experiments"]["pareto_synthetic"]
    l1, l2 = _labels(exp)
    seeds = sorted({s["seed"] for s in exp["stages"]})
    lines = [f"`preset=synthetic sweep=weights seeds=[{','.join(map(str, seeds))}]`: weight w₁ of label 1 (label 2: "
             f"1 − w₁); LaA uses the weighted sum Ȳ = Σ w_k Y_k. Test AUROC, mean ± sample std over seeds {seeds}.",
             "", "| w₁ | LoA AUC label 1 | LoA AUC label 2 | LoA worst | LaA AUC label 1 | LaA AUC label 2 | LaA worst |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for w in sorted({s["weight"] for s in exp["stages"]}):
        cells = []
        for agg in ("loss", "label"):
            rows = _by(exp["stages"], aggregation=agg, weight=w)
            cells += [mean_std([r[f"auc_{l1}"] for r in rows]), mean_std([r[f"auc_{l2}"] for r in rows]),
                      mean_std([r["auc_min"] for r in rows])]
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
    best = []
    for agg, short in (("loss", "LoA"), ("label", "LaA")):
        w, m, s = max(_pareto_means(exp, agg, "auc_min"), key=lambda t: t[1])
        best.append(f"{short} {m:.3f} ± {s:.3f} at w₁ = {w:g}")
    lines += ["", "Best mean worst-label AUROC along the sweep: " + "; ".join(best) + "."]
    return "\n".join(lines) + "\n"


TABLES = {"table.md": table_worst_label, "table_dictatorship.md": table_dictatorship, "table_skew.md": table_skew,
          "table_pareto.md": table_pareto}


def tables(raw: dict[str, Any]) -> dict[str, str]:
    """``{file name: markdown}`` of every table, computed from the raw results alone."""
    need = {"table_dictatorship.md": "dictatorship", "table_skew.md": "skew", "table_pareto.md": "pareto_synthetic"}
    return {f: fn(raw) for f, fn in TABLES.items() if need.get(f, "digits") in raw["experiments"]}


# --------------------------------------------------------------------------------------------------------
# figures (from raw.json only)
# --------------------------------------------------------------------------------------------------------
def figure_skew(raw: dict[str, Any]) -> Any:
    from lit_cascades.plotting import new_axes

    exp = raw["experiments"]["skew"]
    ps = _skew_points(exp)
    n = len({s["seed"] for s in exp["stages"]})
    fig, _ = new_axes(figsize=(10.0, 4.2))
    fig.clf()
    axes = fig.subplots(1, 2)
    for agg, color, name in (("loss", "tab:red", "LoA"), ("label", "tab:blue", "LaA")):
        for ax, key in zip(axes, ("auc_diff", "auc_min")):
            stats = [(statistics.fmean(v), statistics.stdev(v)) for v in
                     ([r[key] for r in _by(exp["stages"], prior=p, aggregation=agg)] for p in ps)]
            ax.errorbar(ps, [m for m, _ in stats], yerr=[s for _, s in stats], color=color, marker="o", ms=4,
                        capsize=3, label=f"{name}, trained (mean ± std, {n} seeds)")
            bayes = [exp["reference"][f"prior_{p:g}"][f"bayes_{agg}_aggregation"][key] for p in ps]
            ax.plot(ps, bayes, color=color, ls=":", marker="x", ms=4, label=f"{name}, Bayes-optimal scorer")
    axes[1].axhline(0.5, color="0.4", lw=0.8, ls="--", label="random ranking (AUROC 0.5)")
    axes[0].axhline(0.0, color="0.4", lw=0.8, ls="--", label="ideal: equal AUROCs")
    for ax, ylabel in zip(axes, ("|AUROC label 1 − AUROC label 2| (test, lower = more balanced)",
                                 "worst-label test AUROC (higher is better)")):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ps, [f"{p:g}" for p in ps])
        ax.set_xlabel("prior π₂ of label 2 (π₁ = 0.5)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[1].set_ylim(0.45, 1.0)
    fig.suptitle("Increasing the skew of label 2: loss vs label aggregation (synthetic, noisy labels)", fontsize=10)
    fig.tight_layout()
    return fig


def figure_pareto(raw: dict[str, Any]) -> Any:
    from lit_cascades.plotting import new_axes

    exp = raw["experiments"]["pareto_synthetic"]
    l1, l2 = _labels(exp)
    n = len({s["seed"] for s in exp["stages"]})
    fig, ax = new_axes(figsize=(6.4, 5.6))
    front = exp["reference"]["bayes_front"]
    ax.plot([p[0] for p in front], [p[1] for p in front], color="0.3", ls="--", lw=1,
            label="Bayes-optimal front (known η, test split)")
    for agg, color, name, dx in (("loss", "tab:red", "LoA", 4), ("label", "tab:blue", "LaA", -4)):
        xs, ys = _pareto_means(exp, agg, f"auc_{l1}"), _pareto_means(exp, agg, f"auc_{l2}")
        ax.errorbar([m for _, m, _ in xs], [m for _, m, _ in ys], xerr=[s for *_, s in xs], yerr=[s for *_, s in ys],
                    color=color, marker="o", ms=4, capsize=2, lw=1, label=f"{name}, trained (mean ± std, {n} seeds)")
        for (w, x, _), (_, y, _) in zip(xs, ys):
            ax.annotate(f"{w:g}", (x, y), textcoords="offset points", xytext=(dx, dx), fontsize=7, color=color,
                        ha="left" if dx > 0 else "right")
    ax.set_xlabel(f"test AUROC of label 1 ({l1}, π = 0.5)")
    ax.set_ylabel(f"test AUROC of label 2 ({l2}, π = 0.1)")
    ax.set_title("Pareto front of per-label AUROC, weight w₁ of label 1 swept\n(point labels: w₁; ideal = (1, 1); "
                 "a random ranking scores 0.5 on both axes)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


FIGURES = {"bipartite_ranking_skew.png": ("skew", figure_skew),
           "bipartite_ranking_pareto_synthetic.png": ("pareto_synthetic", figure_pareto)}


def write_outputs(raw: dict[str, Any], figures: bool = True) -> None:
    write_tables(OUT, tables(raw))
    if figures:
        for fname, (exp, fn) in FIGURES.items():
            if exp in raw["experiments"]:
                path = save_figure(fn(raw), fname, dpi=130)
                print(f"wrote {path.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables-only", action="store_true", help="regenerate tables and figures from raw.json")
    ap.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="run these experiments, keep the others")
    ap.add_argument("--rerun", action="store_true", help="train again even when a finished run directory exists")
    args = ap.parse_args(argv)
    raw_path = OUT / "raw.json"
    if args.tables_only:
        write_outputs(json.loads(raw_path.read_text()))
        return
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {"experiments": {}}  # others are kept
    for name in args.only or DEFAULT_EXPERIMENTS:
        print(f"[results_bipartite] {name}: python -m {RECIPE} {' '.join(EXPERIMENTS[name])}", flush=True)
        raw["experiments"][name] = collect(name, run_experiment(name, args.rerun))
    raw.update(command="python -m benchmarks.results_bipartite" + (f" --only {' '.join(args.only)}" if args.only
                                                                    else ""),
               commit=git_output("rev-parse", "HEAD"), dirty=bool(git_output("status", "--porcelain", "--", "lit_cascades",
                                                                 "recipes")),
               seeds=SEEDS, machine=machine(),
               note="one thread per run on a 2-core machine shared with other work (see loadavg per experiment)")
    OUT.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    write_outputs(raw)


if __name__ == "__main__":
    main()
