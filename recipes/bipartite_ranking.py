"""Bipartite ranking from multiple labels: loss vs label aggregation (Lukasik et al., ICML 2025).

    python -m recipes.bipartite_ranking                                   # digits, offline, ~2 min on CPU
    python -m recipes.bipartite_ranking aggregation=loss weights=[0.7,0.3]
    python -m recipes.bipartite_ranking aggregation=label module.cost=uniform
    python -m recipes.bipartite_ranking data=csv data.path=my.csv data.labels=[helpful,correct]
    python -m recipes.bipartite_ranking sweep=weights                     # Pareto front of per-label AUCs
    python -m recipes.bipartite_ranking preset=dictatorship               # deterministic labels (Prop. 6.1)
    python -m recipes.bipartite_ranking preset=skew                       # the paper's synthetic skew sweep
    python -m recipes.bipartite_ranking trainer.devices=2 trainer.strategy=ddp_spawn trainer.accelerator=cpu
    python -m recipes.bipartite_ranking --help                            # presets and every config key

Configuration (``configs/bipartite_ranking/``): ``data`` is a config group (``data=digits | synthetic |
synthetic_deterministic | csv | uci_bank``), each option a ``_target_`` datamodule section; ``module`` is the
:class:`~lit_cascades.modules.MultiLabelRanker` section (the recipe supplies ``num_features``, ``label_names``,
``aggregation`` and ``weights``); ``ranking`` is the :class:`~lit_cascades.callbacks.RankingAUCLogger` section
and ``callbacks`` extra callbacks for every fit. ``data.batch_size`` is the global batch of a step: under DDP
each process loads ``batch_size / world_size`` rows of the same epoch-seeded order and the module forms pairs over
the gathered batch, so training matches one process. Every component of every stage is built, and the data set up, before the first
stage trains: a bad value stops the run with ``error: <key>: ...`` (exit status 2) and no run directory.

1. build the data (train/val/test; features standardised on train);
2. one stage per objective and seed (``seed<s>/<objective>``): loss aggregation, label aggregation and
   (optionally) each label alone (``<label>_only``);
3. test each: per-label AUROC, worst-label (``auc_min``) and mean AUROC, |AUC1 − AUC2|; on synthetic data also
   the AUROCs of the Bayes-optimal scorers and the Spearman correlation of each scorer with them;
4. ``sweep=weights``: one stage per (seed, aggregation, weight of the first label), ``seed<s>/<agg>_w<w>``, and
   the Pareto front (``pareto_<l1>_vs_<l2>.{csv,png}``); ``sweep=priors``: one stage per (seed, prior of the
   last label, aggregation), ``seed<s>/prior<p>/<agg>`` (data with ``priors``: synthetic);
5. metrics.json, results.csv, auc_by_objective.png (or the sweep's tables and plots) in the run directory;
   each stage has its config.yaml, metrics.json, model.pt, logs/{fit,test}/metrics.csv and
   ranking_{val,test}.csv.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import spearmanr

from lit_cascades.callbacks.ranking import plot_auc_pareto
from lit_cascades.data.multilabel import MultiLabelDataModule
from lit_cascades.functional import (
    bayes_optimal_label_aggregation,
    bayes_optimal_loss_aggregation,
    binary_auroc,
)
from lit_cascades.functional.ranking import (
    check_weights,
    cross_cell_order,
    effective_loss_weights,
    lexicographic_loa_auc,
    tied_laa_auc,
)
from lit_cascades.runner import (
    ConfigError,
    Run,
    build,
    build_list,
    config_errors,
    locate,
    main,
    summarize_runs,
)

AGGREGATIONS = ("loss", "label", "both")
SWEEPS = ("none", "weights", "priors")


# --------------------------------------------------------------------------------------------------------
# building and validating everything before the first stage trains
# --------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One stage: a scorer to train and test on a datamodule."""

    name: str
    kind: str
    seed: int
    config: dict[str, Any]
    module: pl.LightningModule
    dm: MultiLabelDataModule
    aggregation: str
    weights: list[float] | None
    extra: dict[str, Any] = field(default_factory=dict)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_choices(cfg: DictConfig) -> None:
    """The recipe's own choices (not constructor arguments)."""
    if cfg.sweep not in SWEEPS:
        raise ConfigError(f"expected one of {', '.join(SWEEPS)}; got {cfg.sweep!r}", key="sweep")
    if cfg.aggregation not in AGGREGATIONS:
        raise ConfigError(f"expected one of {', '.join(AGGREGATIONS)}; got {cfg.aggregation!r}", key="aggregation")
    if not cfg.seeds:
        raise ConfigError("expected at least one seed", key="seeds")
    if int(cfg.epochs) < 1:
        raise ConfigError(f"expected an integer >= 1; got {cfg.epochs}", key="epochs")
    if cfg.sweep == "weights":
        bad = [w for w in cfg.sweep_weights if not 0.0 <= float(w) <= 1.0]
        if not cfg.sweep_weights or bad:
            raise ConfigError(f"expected weights in [0, 1]; got {list(cfg.sweep_weights)}", key="sweep_weights")
    if cfg.sweep == "priors":
        if "priors" not in cfg.data:
            raise ConfigError("sweep=priors needs data with label priors (data=synthetic): the priors are a "
                              "generator knob", key="sweep")
        bad = [p for p in cfg.sweep_priors if not 0.0 < float(p) < 1.0]
        if not cfg.sweep_priors or bad:
            raise ConfigError(f"expected priors in (0, 1); got {list(cfg.sweep_priors)}", key="sweep_priors")


def _check_required(node: DictConfig, key: str) -> None:
    """A required constructor argument left ``null`` in the config (``data.path`` of ``data=csv``)."""
    target = locate(node._target_, key=f"{key}._target_")
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name in node and node[name] is None:
            raise ConfigError(f"required by {getattr(target, '__qualname__', target)}; set {key}.{name}=...",
                              key=f"{key}.{name}")


def world_size(cfg: DictConfig) -> int:
    """The number of training processes ``cfg.trainer`` asks for (a Trainer is built, nothing is launched)."""
    kwargs = _container(cfg.trainer)
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no second "GPU available: ..." banner
    try:
        with config_errors("trainer", names=list(kwargs)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(**kwargs, logger=False, enable_checkpointing=False, default_root_dir=os.devnull)
    finally:
        quiet.setLevel(level)
    return int(trainer.world_size)


def build_data(cfg: DictConfig, node: DictConfig, world: int) -> MultiLabelDataModule:
    """Build and set up the datamodule of ``node``. ``data.batch_size`` is the global batch of a step: under DDP
    each of the ``world`` processes loads an equal share (checked here, before any work)."""
    _check_required(node, "data")
    dm = build(node, "data")
    with config_errors("data", names=list(node)):
        dm.setup()
    if world > 1 and dm.batch_size % world:
        raise ConfigError(f"{dm.batch_size} is the global batch of a step and must be divisible by the {world} "
                          f"processes; choose a multiple of {world}", key="data.batch_size")
    return dm


def build_module(cfg: DictConfig, dm: MultiLabelDataModule, aggregation: str, weights: list[float] | None,
                 seed: int) -> pl.LightningModule:
    """The scorer of one stage, initialised from ``seed``."""
    pl.seed_everything(seed, verbose=False)
    return build(cfg.module, "module", num_features=dm.num_features, label_names=dm.label_names,
                 aggregation=aggregation, weights=weights)


def objectives(cfg: DictConfig, names: list[str]) -> dict[str, tuple[str, list[float] | None]]:
    """``{name: (aggregation, weights)}`` of the objectives to compare (``<label>_only``: that label alone)."""
    aggs = ["loss", "label"] if cfg.aggregation == "both" else [cfg.aggregation]
    weights = [float(w) for w in cfg.weights] if cfg.weights is not None else None
    out = {f"{a}_aggregation": (a, weights) for a in aggs}
    if cfg.single_label_baselines:
        for j, name in enumerate(names):
            out[f"{name}_only"] = ("loss", [1.0 if i == j else 0.0 for i in range(len(names))])
    return out


def pareto_labels(cfg: DictConfig, names: list[str]) -> tuple[str, str]:
    """The two labels of the Pareto plot: ``ranking.pareto_labels`` or the first two."""
    chosen = cfg.ranking.get("pareto_labels")
    labels = tuple(str(n) for n in chosen) if chosen else tuple(names[:2])
    if len(labels) != 2 or any(n not in names for n in labels):
        raise ConfigError(f"expected two of the data's labels {names}; got {list(labels)}",
                          key="ranking.pareto_labels")
    return labels  # type: ignore[return-value]


def plan(cfg: DictConfig) -> tuple[dict[str, MultiLabelDataModule], list[Job]]:
    """Build every datamodule (set up) and every stage's module; check the callbacks. No training yet."""
    check_choices(cfg)
    world = world_size(cfg)
    build(cfg.ranking, "ranking", output_dir=os.devnull)
    build_list(cfg.callbacks, "callbacks")
    module_cfg = _container(cfg.module)
    data_cfg = _container(cfg.data)
    jobs: list[Job] = []
    if cfg.sweep == "priors":
        dms = {}
        for p in cfg.sweep_priors:
            priors = [*list(cfg.data.priors)[:-1], float(p)]
            node = OmegaConf.merge(cfg.data, {"priors": priors})
            dms[f"prior_{p}"] = dm = build_data(cfg, node, world)
            for s in cfg.seeds:
                for agg in ("loss", "label"):
                    config = {"seed": s, "aggregation": agg, "prior": float(p), "priors": priors,
                              "module": module_cfg, "data": _container(node)}
                    jobs.append(Job(f"seed{s}/prior{p}/{agg}", f"{agg}_aggregation", int(s), config,
                                    build_module(cfg, dm, agg, None, int(s)), dm, agg, None, {"prior": float(p)}))
        return dms, jobs
    dm = build_data(cfg, cfg.data, world)
    if cfg.weights is not None:
        with config_errors("weights"):
            check_weights(list(cfg.weights), dm.num_labels)
    if cfg.sweep == "weights":
        k = dm.num_labels
        if k < 2:
            raise ConfigError(f"sweep=weights needs at least two labels; the data has {dm.label_names}", key="sweep")
        pareto_labels(cfg, dm.label_names)
        for s in cfg.seeds:
            for w in cfg.sweep_weights:
                weights = [float(w), *[(1.0 - float(w)) / (k - 1)] * (k - 1)]
                for agg in ("loss", "label"):
                    config = {"seed": s, "aggregation": agg, "weight": float(w), "weights": weights,
                              "module": module_cfg, "data": data_cfg}
                    jobs.append(Job(f"seed{s}/{agg}_w{w}", f"{agg}_aggregation", int(s), config,
                                    build_module(cfg, dm, agg, weights, int(s)), dm, agg, weights, {"weight": float(w)}))
        return {"data": dm}, jobs
    for s in cfg.seeds:
        for name, (agg, weights) in objectives(cfg, dm.label_names).items():
            config = {"seed": s, "objective": name, "aggregation": agg, "weights": weights,
                      "module": module_cfg, "data": data_cfg}
            jobs.append(Job(f"seed{s}/{name}", name, int(s), config, build_module(cfg, dm, agg, weights, int(s)),
                            dm, agg, weights, {"objective": name}))
    return {"data": dm}, jobs


# --------------------------------------------------------------------------------------------------------
# one stage
# --------------------------------------------------------------------------------------------------------
def bayes_scorers(module: pl.LightningModule, dm: MultiLabelDataModule, weights: list[float] | None
                  ) -> dict[str, torch.Tensor]:
    """The Bayes-optimal scores of both aggregations on the test split (data with known η only)."""
    test = dm.splits["test"]
    if test.eta is None:
        return {}
    h = module.hparams
    out = {"loss": bayes_optimal_loss_aggregation(test.eta, dm.priors(), weights)}
    if h.get("cost", "difference") == "difference":
        label_agg = h.get("label_agg", "sum")
        out["label"] = bayes_optimal_label_aggregation(test.eta, weights if label_agg == "sum" else None, label_agg)
    return out


def run_stage(r: Run, cfg: DictConfig, job: Job) -> dict[str, Any]:
    """Train one scorer (memoised), test it and return its test scalars (also the stage's metrics.json)."""
    st = r.stage(job.name, kind=job.kind, config=job.config, seed=job.seed)
    dm, module = job.dm, job.module
    fit_cbs = [build(cfg.ranking, "ranking", output_dir=st.dir), *build_list(cfg.callbacks, "callbacks")]
    st.fit(module, dm, callbacks=fit_cbs, max_epochs=int(cfg.epochs))
    test_cb = build(cfg.ranking, "ranking", output_dir=st.dir)
    logged = st.test(module, dm, callbacks=[test_cb])
    prefix = f"test/{test_cb.prefix}/"
    result: dict[str, Any] = {k[len(prefix):]: v for k, v in logged.items() if k.startswith(prefix)}
    if "auc_min" not in result:
        raise RuntimeError(f"stage '{job.name}': the test logged no {prefix}auc_min (logged: {sorted(logged)})")
    result["test_loss"] = logged.get("test/loss")
    if hasattr(module, "effective_label_weights"):
        result["effective_weights"] = module.effective_label_weights(dm.priors())
    test = dm.splits["test"]
    with torch.no_grad():
        scores = module.eval()(test.features)
    if test.labels.shape[1] == 2:
        result["order_10_over_01"] = float(cross_cell_order(scores, test.labels))
    for name, bayes in bayes_scorers(module, dm, job.weights).items():
        result[f"spearman_bayes_{name}"] = float(spearmanr(scores.numpy(), bayes.numpy()).statistic)
    return st.finish(result)


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every scalar: ``{key: mean, key_std: std, "seeds": n}``."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    stats = summarize_runs([{**p, "_all": 0} for p in per_seed], "_all", keys)["0"]
    out: dict[str, Any] = {"seeds": len(per_seed)}
    for key, (mean, std) in stats.items():
        out[key], out[f"{key}_std"] = mean, std
    return out


def bayes_reference(cfg: DictConfig, data_cfg: Any, module: pl.LightningModule, dm: MultiLabelDataModule,
                    weights: list[float] | None) -> dict[str, dict[str, Any]]:
    """Test-split AUROCs of the Bayes-optimal scorers, with the closed forms for deterministic two-label data."""
    test = dm.splits["test"]
    if test.eta is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, scores in bayes_scorers(module, dm, weights).items():
        auc = binary_auroc(scores, test.labels)
        row = {f"auc_{n}": float(a) for n, a in zip(dm.label_names, auc)}
        row.update(auc_min=float(auc.min()), auc_mean=float(auc.mean()), auc_diff=float(auc.max() - auc.min()))
        if test.labels.shape[1] == 2:
            row["order_10_over_01"] = float(cross_cell_order(scores, test.labels))
        out[f"bayes_{name}_aggregation"] = row
    if data_cfg.get("deterministic") and test.labels.shape[1] == 2 and data_cfg.get("correlation", 0.0) == 0:
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
def compare(cfg: DictConfig, r: Run, dm: MultiLabelDataModule, jobs: list[Job]) -> dict[str, Any]:
    per_objective: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        per_objective.setdefault(job.extra["objective"], []).append(run_stage(r, cfg, job))
    summary: dict[str, Any] = {name: {**summarize(rows), "per_seed": rows} for name, rows in per_objective.items()}
    reference_job = next(j for j in jobs if j.extra["objective"].endswith("_aggregation"))
    summary.update(bayes_reference(cfg, cfg.data, reference_job.module, dm, reference_job.weights))
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


def sweep_weights(cfg: DictConfig, r: Run, dm: MultiLabelDataModule, jobs: list[Job]) -> dict[str, Any]:
    points = []
    for job in jobs:
        res = run_stage(r, cfg, job)
        points.append({"aggregation": job.aggregation, "weight": job.extra["weight"], "seed": job.seed, **res})
    names = dm.label_names
    x_label, y_label = pareto_labels(cfg, names)
    reference = None
    test = dm.splits["test"]
    if test.eta is not None:  # Bayes-optimal front: rank by t·η_x + (1 − t)·η_y over a fine grid of t
        ix, iy = names.index(x_label), names.index(y_label)
        eta, labels = test.eta[:, [ix, iy]].double(), test.labels[:, [ix, iy]]
        curve = []
        for t in torch.linspace(0, 1, 101, dtype=torch.float64):
            auc = binary_auroc(eta @ torch.stack([t, 1 - t]), labels)
            curve.append((float(auc[0]), float(auc[1])))
        reference = {"Bayes-optimal front (test split)": curve}
    front = [{"tag": j.name, "group": p["aggregation"], **p} for j, p in zip(jobs, points)]
    fig, _ = plot_auc_pareto(front, x_label, y_label, reference=reference,
                             title="Pareto front of per-label AUROC (test)")
    stem = f"pareto_{x_label}_vs_{y_label}"
    r.save_figure(stem, fig)
    pcols = ["tag", "group", "weight", f"auc_{x_label}", f"auc_{y_label}", "auc_min", "auc_mean"]
    r.save_table(stem, pcols, [[p.get(c) for c in pcols] for p in front])
    cols = ["aggregation", "weight", "seed", *[f"auc_{n}" for n in names], "auc_min", "auc_mean"]
    r.save_table("sweep_weights", cols, [[p[c] for c in cols] for p in points])
    best = {agg: max((p for p in points if p["aggregation"] == agg), key=lambda p: p["auc_min"])
            for agg in ("loss", "label")}
    return {"points": points,
            "best_auc_min": {a: {"weight": p["weight"], "auc_min": p["auc_min"]} for a, p in best.items()}}


def sweep_priors(cfg: DictConfig, r: Run, dms: dict[str, MultiLabelDataModule], jobs: list[Job]) -> dict[str, Any]:
    per_point: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for job in jobs:
        per_point.setdefault((job.extra["prior"], job.aggregation), []).append(run_stage(r, cfg, job))
    rows, results = [], {}
    for p in cfg.sweep_priors:
        dm = dms[f"prior_{p}"]
        first = next(j for j in jobs if j.dm is dm)
        entry: dict[str, Any] = {"priors": first.config["priors"]}
        for agg in ("loss", "label"):
            entry[agg] = summarize(per_point[(float(p), agg)])
        entry.update(bayes_reference(cfg, first.config["data"], first.module, dm, None))
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
def data_info(dm: MultiLabelDataModule) -> dict[str, Any]:
    return {"description": dm.splits["train"].description, "labels": dm.label_names,
            "priors": [round(float(p), 4) for p in dm.priors()], **{f"n_{k}": len(v) for k, v in dm.splits.items()}}


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    dms, jobs = plan(cfg)  # everything is built and checked before the first stage trains
    if cfg.sweep == "priors":
        return {"sweep_priors": sweep_priors(cfg, r, dms, jobs)}
    dm = dms["data"]
    info = data_info(dm)
    if r.writer:
        print(f"[bipartite_ranking] {info['description']}; priors {info['priors']}; {len(jobs)} stages")
    if cfg.sweep == "weights":
        return {"data": info, "sweep_weights": sweep_weights(cfg, r, dm, jobs)}
    return {"data": info, **compare(cfg, r, dm, jobs)}


if __name__ == "__main__":
    main("bipartite_ranking", run)
