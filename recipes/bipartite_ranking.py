"""Bipartite ranking from multiple labels: loss vs label aggregation (Lukasik et al., ICML 2025).

    python -m recipes.bipartite_ranking                                   # digits, offline, ~2 min on CPU
    python -m recipes.bipartite_ranking aggregation=loss weights=[0.7,0.3]
    python -m recipes.bipartite_ranking aggregation=label cost=difference
    python -m recipes.bipartite_ranking data=csv data.path=my.csv data.labels=[helpful,correct]
    python -m recipes.bipartite_ranking sweep=weights                     # Pareto front of per-label AUCs
    python -m recipes.bipartite_ranking preset=dictatorship               # deterministic labels (Prop. 6.1)
    python -m recipes.bipartite_ranking preset=skew                       # the paper's synthetic skew sweep
    python -m recipes.bipartite_ranking --help                            # presets and every config key

``data=<source>`` is shorthand for ``data.source=<source>`` (digits | synthetic | csv).

1. build the data (train/val/test; features standardised on train);
2. train a scorer per objective and seed: loss aggregation, label aggregation and (optionally) each label alone;
3. test: per-label AUROC, worst-label (``auc_min``) and mean AUROC, |AUC1 − AUC2|; on synthetic data also
   the AUROCs of the Bayes-optimal scorers and the Spearman correlation of each scorer with them;
4. ``sweep=weights``: sweep the weight of the first label for both aggregations and plot the Pareto front
   (``pareto_<l1>_vs_<l2>.png``); ``sweep=priors``: sweep the prior of the last label (synthetic data);
5. write metrics.json, results.csv, auc_by_objective.png (or the sweep's plots) to the run directory and W&B.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import spearmanr

from lit_cascades.callbacks.ranking import RankingAUCLogger
from lit_cascades.data.multilabel import (
    DigitsRankingDataModule,
    MultiLabelDataModule,
    SyntheticRankingDataModule,
    TabularRankingDataModule,
)
from lit_cascades.functional import (
    bayes_optimal_label_aggregation,
    bayes_optimal_loss_aggregation,
    binary_auroc,
)
from lit_cascades.functional.ranking import (
    cross_cell_order,
    effective_loss_weights,
    lexicographic_loa_auc,
    tied_laa_auc,
)
from lit_cascades.modules.ranking import MultiLabelRanker
from lit_cascades.runner import ConfigError, Run, main, summarize_runs

SOURCES = ("digits", "synthetic", "csv")


# --------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------
def build_datamodule(d: DictConfig, priors: list[float] | None = None) -> MultiLabelDataModule:
    """The datamodule of ``data.source`` (``priors`` overrides the synthetic priors, for sweeps)."""
    if d.source not in SOURCES:
        raise ConfigError(f"data.source={d.source!r}; expected one of {list(SOURCES)}")
    common = {k: d[k] for k in ("batch_size", "eval_batch_size", "val_fraction", "test_fraction", "split_seed")}
    if d.source == "digits":
        return DigitsRankingDataModule(label_sets=OmegaConf.to_container(d.label_sets),
                                       label_noise=OmegaConf.to_container(d.label_noise), seed=d.split_seed, **common)
    if d.source == "synthetic":
        return SyntheticRankingDataModule(
            n=d.n, priors=priors or list(d.priors), correlation=d.correlation, deterministic=d.deterministic,
            sharpness=d.sharpness, num_features=d.num_features, label_names=d.label_names, seed=d.split_seed,
            **common,
        )
    if not d.path or not d.labels:
        raise ConfigError("data=csv needs data.path=<file> and data.labels=[<label column>, ...]")
    return TabularRankingDataModule(
        path=d.path, labels=list(d.labels), features=list(d.features) if d.features else None, group=d.group,
        label_thresholds=OmegaConf.to_container(d.label_thresholds), sep=d.sep, drop=list(d.drop), **common,
    )


# --------------------------------------------------------------------------------------------------------
# one objective
# --------------------------------------------------------------------------------------------------------
def bayes_scorers(cfg: DictConfig, dm: MultiLabelDataModule, weights: list[float] | None) -> dict[str, torch.Tensor]:
    """The Bayes-optimal scores of both aggregations on the test split (synthetic data only)."""
    test = dm.splits["test"]
    if test.eta is None:
        return {}
    out = {"loss": bayes_optimal_loss_aggregation(test.eta, dm.priors(), weights)}
    if cfg.cost == "difference":
        out["label"] = bayes_optimal_label_aggregation(test.eta, weights if cfg.label_agg == "sum" else None,
                                                       cfg.label_agg)
    return out


def train_and_test(r: Run, cfg: DictConfig, dm: MultiLabelDataModule, aggregation: str,
                   weights: list[float] | None, seed: int, tag: str, sweep_cb: RankingAUCLogger) -> dict[str, Any]:
    """Train one scorer, test it (through ``sweep_cb``), and return its test scalars."""
    pl.seed_everything(seed, verbose=False)
    module = MultiLabelRanker(
        num_features=dm.num_features, label_names=dm.label_names, aggregation=aggregation, weights=weights,
        cost=cfg.cost, label_agg=cfg.label_agg, surrogate=cfg.surrogate, num_pairs=cfg.num_pairs,
        pair_fraction=cfg.pair_fraction, hidden=list(cfg.model.hidden), lr=cfg.model.lr,
        weight_decay=cfg.model.weight_decay,
    )
    r.fit(tag, module, dm, callbacks=[RankingAUCLogger(tag=tag, output_dir=r.dir)], max_epochs=cfg.model.epochs)
    sweep_cb.tag = tag
    r.test(tag, module, dm, callbacks=[sweep_cb])
    result: dict[str, Any] = dict(sweep_cb.reports["test"].scalars)
    result["effective_weights"] = module.effective_label_weights(dm.priors())
    test = dm.splits["test"]
    with torch.no_grad():
        scores = module.eval()(test.features)
    if test.labels.shape[1] == 2:
        result["order_10_over_01"] = float(cross_cell_order(scores, test.labels))
    for name, bayes in bayes_scorers(cfg, dm, weights).items():
        result[f"spearman_bayes_{name}"] = float(spearmanr(scores.numpy(), bayes.numpy()).statistic)
    return result


def objectives(cfg: DictConfig, names: list[str]) -> dict[str, tuple[str, list[float] | None]]:
    """``{name: (aggregation, weights)}`` of the objectives to compare (``<label>_only``: that label alone)."""
    aggs = ["loss", "label"] if cfg.aggregation == "both" else [cfg.aggregation]
    weights = list(cfg.weights) if cfg.weights is not None else None
    out = {f"{a}_aggregation": (a, weights) for a in aggs}
    if cfg.single_label_baselines:
        for j, name in enumerate(names):
            out[f"{name}_only"] = ("loss", [1.0 if i == j else 0.0 for i in range(len(names))])
    return out


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every scalar: ``{key: mean, key_std: std, "seeds": n}``."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, int | float)]
    stats = summarize_runs([{**p, "_all": 0} for p in per_seed], "_all", keys)["0"]
    out: dict[str, Any] = {"seeds": len(per_seed)}
    for key, (mean, std) in stats.items():
        out[key], out[f"{key}_std"] = mean, std
    return out


def bayes_reference(dm: MultiLabelDataModule, cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Test-split AUROCs of the Bayes-optimal scorers (equal weights), with the closed forms for
    deterministic two-label data."""
    test = dm.splits["test"]
    if test.eta is None:
        return {}
    weights = list(cfg.weights) if cfg.weights is not None else None
    out = {}
    for name, scores in bayes_scorers(cfg, dm, weights).items():
        auc = binary_auroc(scores, test.labels)
        row = {f"auc_{n}": float(a) for n, a in zip(dm.label_names, auc)}
        row.update(auc_min=float(auc.min()), auc_mean=float(auc.mean()), auc_diff=float(auc.max() - auc.min()))
        if test.labels.shape[1] == 2:
            row["order_10_over_01"] = float(cross_cell_order(scores, test.labels))
        out[f"bayes_{name}_aggregation"] = row
    if cfg.data.source == "synthetic" and cfg.data.deterministic and test.labels.shape[1] == 2 and cfg.data.correlation == 0:
        p = dm.priors()
        alpha = effective_loss_weights(weights, p)
        d = 0 if alpha[0] > alpha[1] else 1
        out["theory"] = {
            "loa_dictator": dm.label_names[d],
            f"loa_auc_{dm.label_names[1 - d]}": lexicographic_loa_auc(float(p[d])),
            f"laa_auc_{dm.label_names[0]}": tied_laa_auc(float(p[1])),
            f"laa_auc_{dm.label_names[1]}": tied_laa_auc(float(p[0])),
        }
    return out


# --------------------------------------------------------------------------------------------------------
# the three modes
# --------------------------------------------------------------------------------------------------------
def compare(cfg: DictConfig, r: Run, dm: MultiLabelDataModule) -> dict[str, Any]:
    cb = RankingAUCLogger(output_dir=r.dir)
    summary: dict[str, Any] = {}
    for name, (agg, weights) in objectives(cfg, dm.label_names).items():
        per_seed = [train_and_test(r, cfg, dm, agg, weights, s, f"{name}_seed{s}", cb) for s in cfg.seeds]
        summary[name] = {**summarize(per_seed), "per_seed": per_seed}
    summary.update(bayes_reference(dm, cfg))
    names = dm.label_names
    cols = ["objective", *[f"auc_{n}" for n in names], "auc_min", "auc_mean", "auc_diff"]
    rows = [[obj, *[round(float(v.get(c, float("nan"))), 4) for c in cols[1:]]] for obj, v in summary.items()
            if isinstance(v, dict) and "auc_min" in v]
    r.save_table("results", cols, rows)
    r.save_figure("auc_by_objective", plot_objectives(summary, names))
    return summary


def plot_objectives(summary: dict[str, Any], names: list[str]) -> Any:
    """Grouped bars: test AUROC of every label (mean ± std over seeds) for each objective."""
    from lit_cascades.plotting import new_axes

    fig, ax = new_axes(figsize=(7.0, 4.0))
    objs = [o for o, v in summary.items() if isinstance(v, dict) and "auc_min" in v]
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        means = [summary[o][f"auc_{n}"] for o in objs]
        stds = [summary[o].get(f"auc_{n}_std", 0.0) for o in objs]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(objs))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=n)
    lo = min(summary[o]["auc_min"] for o in objs)
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_xticks(range(len(objs)), [o.replace("_", "\n") for o in objs], fontsize=7)
    ax.set_ylabel("test AUROC")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def sweep_weights(cfg: DictConfig, r: Run, dm: MultiLabelDataModule) -> dict[str, Any]:
    k = dm.num_labels
    if k < 2:
        raise ConfigError("sweep=weights needs at least two labels")
    cb = RankingAUCLogger(output_dir=r.dir)
    points = []
    for w in cfg.sweep_weights:
        weights = [float(w), *[(1.0 - float(w)) / (k - 1)] * (k - 1)]
        for agg in ("loss", "label"):
            for s in cfg.seeds:
                res = train_and_test(r, cfg, dm, agg, weights, s, f"{agg}_w{w}_seed{s}", cb)
                points.append({"aggregation": agg, "weight": float(w), "seed": s, **res})
    reference = None
    test = dm.splits["test"]
    if test.eta is not None:  # Bayes-optimal front: rank by t·η1 + (1 − t)·η2 over a fine grid of t
        grid = torch.linspace(0, 1, 101, dtype=torch.float64)
        curve = []
        for t in grid:
            auc = binary_auroc(test.eta[:, :2].double() @ torch.stack([t, 1 - t]), test.labels[:, :2])
            curve.append((float(auc[0]), float(auc[1])))
        reference = {"Bayes-optimal front (test split)": curve}
    cb.save_pareto(r.dir, reference=reference)
    cols = ["aggregation", "weight", "seed", *[f"auc_{n}" for n in dm.label_names], "auc_min", "auc_mean"]
    r.save_table("sweep_weights", cols, [[p[c] for c in cols] for p in points])
    best = {agg: max((p for p in points if p["aggregation"] == agg), key=lambda p: p["auc_min"]) for agg in ("loss", "label")}
    return {"points": points, "best_auc_min": {a: {"weight": p["weight"], "auc_min": p["auc_min"]} for a, p in best.items()}}


def sweep_priors(cfg: DictConfig, r: Run) -> dict[str, Any]:
    if cfg.data.source != "synthetic":
        raise ConfigError("sweep=priors needs data.source=synthetic (the priors are a generator knob)")
    rows, results = [], {}
    for p in cfg.sweep_priors:
        priors = [*list(cfg.data.priors)[:-1], float(p)]
        dm = build_datamodule(cfg.data, priors=priors)
        dm.setup()
        cb = RankingAUCLogger(output_dir=r.dir)
        entry: dict[str, Any] = {"priors": priors}
        for agg in ("loss", "label"):
            per_seed = [train_and_test(r, cfg, dm, agg, None, s, f"prior{p}_{agg}_seed{s}", cb) for s in cfg.seeds]
            entry[agg] = summarize(per_seed)
        entry.update(bayes_reference(dm, cfg))
        results[f"prior_{p}"] = entry
        for name in ("loss", "label", "bayes_loss_aggregation", "bayes_label_aggregation"):
            v = entry.get(name)
            if v:
                rows.append([float(p), name, v["auc_diff"], v["auc_min"], v["auc_mean"]])
    r.save_table("sweep_priors", ["prior_last_label", "objective", "auc_diff", "auc_min", "auc_mean"], rows)
    r.save_figure("sweep_priors", plot_prior_sweep(rows))
    return results


def plot_prior_sweep(rows: list[list[Any]]) -> Any:
    """|AUC1 − AUC2| and worst-label AUROC against the prior of the last label, per objective."""

    from lit_cascades.plotting import new_axes

    fig, _ = new_axes(figsize=(9.0, 3.8))
    fig.clf()
    axes = fig.subplots(1, 2)
    style = {"loss": ("tab:red", "-"), "label": ("tab:blue", "-"),
             "bayes_loss_aggregation": ("tab:red", ":"), "bayes_label_aggregation": ("tab:blue", ":")}
    for name, (color, ls) in style.items():
        pts = sorted((r[0], r[2], r[3]) for r in rows if r[1] == name)
        if not pts:
            continue
        xs, diff, mins = zip(*pts)
        label = name.replace("bayes_", "Bayes-optimal ").replace("_aggregation", "") if name.startswith("bayes") \
            else f"trained, {name} aggregation"
        axes[0].plot(xs, diff, color=color, ls=ls, marker="o", ms=3, label=label)
        axes[1].plot(xs, mins, color=color, ls=ls, marker="o", ms=3, label=label)
    ticks = sorted({r[0] for r in rows})
    for ax, title in zip(axes, ("|AUC1 − AUC2| (lower is better)", "worst-label AUROC (higher is better)")):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("prior of the last label")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------
def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    if cfg.sweep not in ("none", "weights", "priors"):
        raise ConfigError(f"sweep={cfg.sweep!r}; expected none, weights or priors")
    if cfg.sweep == "priors":
        return {"sweep_priors": sweep_priors(cfg, r)}
    dm = build_datamodule(cfg.data)
    dm.setup()
    info = {"description": dm.splits["train"].description, "labels": dm.label_names,
            "priors": [round(float(p), 4) for p in dm.priors()],
            **{f"n_{k}": len(v) for k, v in dm.splits.items()}}
    print(f"[bipartite_ranking] {info['description']}; priors {info['priors']}")
    if cfg.sweep == "weights":
        return {"data": info, "sweep_weights": sweep_weights(cfg, r, dm)}
    return {"data": info, **compare(cfg, r, dm)}


def _source_shorthand(argv: list[str]) -> list[str]:
    """``data=<source>`` → ``data.source=<source>``."""
    return [f"data.source={a.split('=', 1)[1]}" if a.startswith("data=") else a for a in argv]


if __name__ == "__main__":
    main("bipartite_ranking", run, argv=_source_shorthand(sys.argv[1:]))
