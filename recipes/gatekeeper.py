"""Gatekeeper: confidence tuning of a cascade's small model (Rabanser et al., arXiv:2502.19335).

    python -m recipes.gatekeeper          # Fashion-MNIST subset, α = 0.1, 3 seeds: ~2 min (Debian dataset-fashion-mnist)
    python -m recipes.gatekeeper preset=digits                     # one seed on sklearn digits, no Debian package
    python -m recipes.gatekeeper preset=fashion_mnist gatekeeper.module.alpha=0.3 output_dir=runs/x
    python -m recipes.gatekeeper preset=sweep_fashion_mnist        # α sweep × seeds (benchmarks.results_gatekeeper)
    python -m recipes.gatekeeper gatekeeper.module._target_=my_pkg.MyGatekeeper   # a subclass, unchanged recipe
    python -m recipes.gatekeeper resume=runs/x                     # continue an interrupted run
    python -m recipes.gatekeeper --help                            # presets and every config key

Every model, module, datamodule and callback is built from its config section (``_target_``); all of them, for
every seed and α, are built and the data set up before the first stage trains. Stages (``<run>/<stage>/``):

1. ``large``, ``small``: train M_L and M_S with cross-entropy (M_L's correctness on val/test is cached as the
   ``large`` stage's predictions: the cascade never re-runs M_L);
2. ``small_ce``: evaluate the cascade with the CE-trained M_S (confidence = the module's ``confidence()``);
3. ``gatekeeper``: fine-tune M_S with the Gatekeeper loss; ``ce_finetune``: the fair baseline, cross-entropy for
   the same steps; each is tested;
4. the run writes metrics.json and deferral_curves.{csv,png}.

With ``sweep.seeds`` / ``sweep.alphas`` set, stages are ``seed<s>/<stage>`` (Gatekeeper stages
``seed<s>/gatekeeper_a<α>``), M_L and M_S trained once per seed, and the run writes sweep.csv, a mean ± std
table and one W&B run per (seed, α) so W&B can aggregate across seeds.

Every run ends by printing (and saving as ``comparison.txt``) the comparison the paper predicts: Gatekeeper's s_d
above the equally long cross-entropy fine-tune's, at some cost in small-model accuracy for small α (paper
§5); with several seeds it says, paired by seed, whether the s_d difference exceeds the seed spread or is noise
(:mod:`lit_cascades.effects`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from lit_cascades.callbacks import DeferralCurveLogger, deferral_table
from lit_cascades.effects import BEYOND, mean_std, paired_differences, paired_interval, seed_verdict
from lit_cascades.functional.deferral import IDEAL_VARIANTS, DeferralReport, deferral_metrics
from lit_cascades.io import safe_torch_load
from lit_cascades.models import count_parameters
from lit_cascades.modules import Classifier
from lit_cascades.plotting import plot_deferral_curves, plot_sweep
from lit_cascades.runner import (
    ConfigError,
    Run,
    Stage,
    build,
    build_list,
    config_errors,
    main,
    summarize_runs,
)

COLUMNS = ("test_acc", "s_d", "s_o", "auroc", "auc_df", "quality_at_rate")
BASELINE = "cross-entropy fine-tune"
#: what the paper leads one to expect (Rabanser et al., arXiv:2502.19335, §5)
EXPECTATION = ("paper: the Gatekeeper fine-tune separates correct from incorrect predictions better than "
               "cross-entropy (higher s_d, lower s_o), at some cost in small-model accuracy for small α")
#: the setting that shows the effect beyond the seed spread when a run's own data does not
SHOWS_IT = "the default (Fashion-MNIST subset, α = 0.1) or preset=sweep_fashion_mnist"


@dataclass
class SeedComponents:
    """Everything one seed trains, built before any stage runs."""

    seed: int
    large: Classifier
    small: Classifier
    finetunes: dict[str, tuple[str, float | None, Classifier]] = field(default_factory=dict)  # method -> (stage, α, module)


def build_classifier_module(spec: DictConfig, key: str, dm: Any) -> Classifier:
    """``spec.module`` around ``spec.model`` (both from config; shapes from the data)."""
    net = build(spec.model, f"{key}.model", in_shape=dm.input_shape, num_classes=dm.num_classes)
    return build(spec.module, f"{key}.module", model=net, num_classes=dm.num_classes)


def build_seed(cfg: DictConfig, dm: Any, seed: int, alphas: list[float]) -> SeedComponents:
    """Build M_L, M_S and the fine-tuning modules of one seed (fine-tuning copies start from M_S's weights
    once M_S is trained)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    large = build_classifier_module(cfg.large, "large", dm)
    small = build_classifier_module(cfg.small, "small", dm)
    comps = SeedComponents(seed, large, small)
    gk = OmegaConf.to_container(cfg.gatekeeper.module, resolve=True)
    for a in alphas:
        module = build({**gk, "alpha": a}, "gatekeeper.module", model=copy.deepcopy(small.model),  # type: ignore[dict-item]
                       num_classes=dm.num_classes)
        stage = "gatekeeper" if not cfg.sweep.alphas else f"gatekeeper_a{a}"
        comps.finetunes[f"gatekeeper α={a}" if cfg.sweep.alphas else f"gatekeeper (α={a})"] = (stage, a, module)
    if cfg.baseline.enabled:
        module = build(cfg.baseline.module, "baseline.module", model=copy.deepcopy(small.model),
                       num_classes=dm.num_classes)
        comps.finetunes["cross-entropy fine-tune"] = ("ce_finetune", None, module)
    return comps


def check_plain_keys(cfg: DictConfig) -> None:
    """Values that are not constructor arguments, checked before any work."""
    for key in ("small.epochs", "large.epochs", "gatekeeper.epochs"):
        if int(OmegaConf.select(cfg, key)) < 1:
            raise ConfigError(f"expected an integer >= 1; got {OmegaConf.select(cfg, key)}", key=key)
    if not 0.0 <= cfg.eval.rate <= 1.0:
        raise ConfigError(f"expected a deferral rate in [0, 1]; got {cfg.eval.rate}", key="eval.rate")
    if cfg.eval.ideal not in IDEAL_VARIANTS:
        raise ConfigError(f"expected one of {list(IDEAL_VARIANTS)}; got {cfg.eval.ideal!r}", key="eval.ideal")
    for key in ("small.checkpoint", "large.checkpoint"):
        path = OmegaConf.select(cfg, key)
        if path:
            with config_errors(key):
                safe_torch_load(path)


def train_or_load(st: Stage, module: Classifier, spec: DictConfig, dm: Any, cfg: DictConfig) -> Classifier:
    """Fit ``module`` as stage ``st`` or load ``spec.checkpoint`` (a ``model.pt`` or Lightning ``.ckpt``)."""
    if spec.checkpoint:
        state = safe_torch_load(spec.checkpoint)
        module.load_state_dict(state.get("state_dict", state))
        return module
    return st.fit(module, dm, callbacks=build_list(cfg.callbacks, "callbacks"), max_epochs=spec.epochs)


def evaluate(st: Stage, module: Classifier, dm: Any, cfg: DictConfig) -> tuple[dict[str, Any], DeferralReport]:
    """Test ``module`` as the cascade's small model: the test loop logs ``test/acc`` and ``test/defer/*`` (curves
    in the stage directory); the report comes from the test predictions gathered across processes."""
    cb = DeferralCurveLogger(rate=cfg.eval.rate, ideal=cfg.eval.ideal, output_dir=st.dir)
    st.test(module, dm, callbacks=[cb])
    pred = st.predict(module, dm.predict_dataloader("test"), name="predict_test")
    large_quality = dm.splits["test"].extras["large_quality"][pred["index"]]
    report = deferral_metrics(pred["confidence"], pred["correct"], large_quality, ideal=cfg.eval.ideal,
                              rate=cfg.eval.rate)
    # accuracy from the gathered predictions: exact under DDP, where the test sampler pads with duplicates
    return {"test_acc": float(pred["correct"].mean()), **report.scalars}, report


def run_seed(r: Run, cfg: DictConfig, dm: Any, comps: SeedComponents, prefix: str) -> tuple[dict, dict]:
    """All stages of one seed; returns ``(results per method, test reports per method)``."""
    s = comps.seed
    large = train_or_load(r.stage(f"{prefix}large", "large", {"seed": s, **_section(cfg.large)}, seed=s),
                          comps.large, cfg.large, dm, cfg)
    st_large = r.stage(f"{prefix}large", seed=s)
    for split in ("val", "test"):
        pred = st_large.predict(large, dm.predict_dataloader(split), name=f"predict_{split}")
        dm.attach(split, "large_quality", pred["correct"])  # ordered by example id = dataset order
    st_large.finish({"test_acc": float(dm.splits["test"].extras["large_quality"].mean())})
    small = train_or_load(r.stage(f"{prefix}small", "small", {"seed": s, **_section(cfg.small)}, seed=s),
                          comps.small, cfg.small, dm, cfg)
    r.stage(f"{prefix}small", seed=s).finish({"params": count_parameters(small.model)})

    results, reports = {}, {}
    st = r.stage(f"{prefix}small_ce", "evaluate", {"seed": s, "method": "cross-entropy"}, seed=s)
    results["cross-entropy"], reports["cross-entropy"] = evaluate(st, small, dm, cfg)
    st.finish(results["cross-entropy"])
    for method, (name, alpha, module) in comps.finetunes.items():
        kind = "gatekeeper" if alpha is not None else "ce_finetune"
        section = cfg.gatekeeper.module if alpha is not None else cfg.baseline.module
        st = r.stage(f"{prefix}{name}", kind, {"seed": s, "method": method, "alpha": alpha,
                                               "epochs": cfg.gatekeeper.epochs, "module": _section(section)}, seed=s)
        if not st.fitted:
            module.model.load_state_dict(small.model.state_dict())
        val_cb = DeferralCurveLogger(rate=cfg.eval.rate, ideal=cfg.eval.ideal, output_dir=st.dir)
        st.fit(module, dm, callbacks=[val_cb, *build_list(cfg.callbacks, "callbacks")],
               max_epochs=cfg.gatekeeper.epochs)
        results[method], reports[method] = evaluate(st, module, dm, cfg)
        st.finish(results[method])
    return results, reports


def _section(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def setup_data(cfg: DictConfig, seed: int) -> Any:
    """Build the datamodule and load its splits (data-dependent checks become ``error: data.<arg>: ...``)."""
    dm = build(cfg.data, "data", seed=seed)
    with config_errors("data", names=[k for k in cfg.data if k != "_target_"]):
        dm.setup()
    return dm


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    check_plain_keys(cfg)
    build_list(cfg.callbacks, "callbacks")  # validate the extra callbacks once (fresh ones per fit)
    sweep = bool(cfg.sweep.seeds or cfg.sweep.alphas)
    seeds = [int(s) for s in cfg.sweep.seeds] or [int(cfg.seed)]
    alphas = [float(a) for a in cfg.sweep.alphas] or [float(cfg.gatekeeper.module.alpha)]
    # everything is built (and the data loaded) before the first stage trains
    data = {s: setup_data(cfg, s) for s in seeds}
    comps = {s: build_seed(cfg, data[s], s, alphas) for s in seeds}
    if not sweep:
        return run_single(cfg, r, data[seeds[0]], comps[seeds[0]])
    return run_sweep(cfg, r, data, comps, seeds, alphas)


def run_single(cfg: DictConfig, r: Run, dm: Any, comps: SeedComponents) -> dict[str, Any]:
    results, reports = run_seed(r, cfg, dm, comps, prefix="")
    out: dict[str, Any] = {
        "data": {"source": cfg.data.source, **{f"n_{k}": len(v) for k, v in dm.splits.items()}},
        "params": {"small": count_parameters(comps.small.model), "large": count_parameters(comps.large.model)},
        "large": {"test_acc": float(dm.splits["test"].extras["large_quality"].mean())},
        "small_ce": results["cross-entropy"],
    }
    for method, (name, _alpha, _module) in comps.finetunes.items():
        out[name] = results[method]
    out["comparison"] = report_comparison(r, {m: {k: (v[k], 0.0) for k in COLUMNS} for m, v in results.items()},
                                          {m: [{"seed": int(cfg.seed), **v}] for m, v in results.items()},
                                          [int(cfg.seed)])
    fig, _ = plot_deferral_curves(reports, title=f"{cfg.data.source}: deferral curves of the small model's "
                                  f"confidence (test, seed {cfg.seed})")
    r.save_figure("deferral_curves", fig)
    r.save_table("deferral_curves", *deferral_table(reports))
    return out


def run_sweep(cfg: DictConfig, r: Run, data: dict, comps: dict, seeds: list[int], alphas: list[float]
              ) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        results, _ = run_seed(r, cfg, data[seed], comps[seed], prefix=f"seed{seed}/")
        rows += [{"method": m, "seed": seed, **{k: v[k] for k in COLUMNS}} for m, v in results.items()]
    r.save_table("sweep", ["method", "seed", *COLUMNS], [[row[c] for c in ("method", "seed", *COLUMNS)]
                                                          for row in rows])
    summary = summarize_runs(rows, "method", COLUMNS)
    r.save_text("sweep_table.md", summary_markdown(summary, cfg, seeds))
    comparison = report_comparison(r, summary, {m: [row for row in rows if row["method"] == m] for m in summary},
                                   seeds)
    x_of = {f"gatekeeper α={a}": float(a) for a in alphas}
    fig = plot_sweep(summary, x_of, x_label="Gatekeeper α", y_keys=("s_d", "test_acc", "auroc"),
                     swept_label="gatekeeper")
    r.save_figure("sweep", fig)
    return {"seeds": seeds, "alphas": alphas, "summary": summary, "comparison": comparison}


def compare(summary: dict[str, dict[str, tuple[float, float]]], per_seed: dict[str, list[dict[str, Any]]],
            seeds: list[int]) -> list[str]:
    """Text lines comparing each Gatekeeper α with the cross-entropy fine-tune of equal length.

    Args:
        summary: ``{method: {metric: (mean, std over seeds)}}``.
        per_seed: ``{method: [row per seed with "seed" and the COLUMNS]}`` (paired by the rows' seeds).
        seeds: the seeds.

    The s_d differences are paired by seed (both fine-tunes of a seed start from that seed's M_S) and judged
    by :func:`lit_cascades.effects.seed_verdict`: beyond the seed spread when every seed's difference has the
    same sign and their mean exceeds twice their standard deviation, noise otherwise; each line also gives the
    per-seed differences and the 95% Student-t interval of their mean.
    """
    width = max(len(m) for m in summary)
    lines = [f"{'method':<{width}}  s_d (higher = better deferral)   small-model accuracy",
             *(f"{m:<{width}}  {v['s_d'][0]:.3f} ± {v['s_d'][1]:.3f}"
               f"{'':<17}{v['test_acc'][0]:.3f} ± {v['test_acc'][1]:.3f}" for m, v in summary.items())]
    n = len(seeds)
    lines.append(f"(mean ± std over {n} seed{'s' * (n > 1)} {seeds}, test split; {EXPECTATION})")
    if BASELINE not in summary:
        return lines
    base = summary[BASELINE]
    for method, v in summary.items():
        if not method.startswith("gatekeeper"):
            continue
        diff = v["s_d"][0] - base["s_d"][0]
        paired = paired_differences({row["seed"]: row["s_d"] for row in per_seed[method]},
                                    {row["seed"]: row["s_d"] for row in per_seed[BASELINE]})
        acc = v["test_acc"][0] - base["test_acc"][0]
        head = f"{method}: s_d {diff:+.3f} vs the cross-entropy fine-tune (accuracy {acc:+.3f})"
        if n < 2:
            lines.append(f"{head}; one seed: no spread to compare with (sweep.seeds=[0,1,2] gives one)")
            continue
        evidence = (f"per seed {' / '.join(f'{d:+.3f}' for d in paired)}, paired {mean_std(paired)}, "
                    f"95% interval {paired_interval(paired)}")
        if seed_verdict(paired) == BEYOND:
            direction = "as the paper expects" if diff > 0 else "contrary to the paper"
            lines.append(f"{head}; {evidence}: beyond the seed spread, {direction}")
        else:
            lines.append(f"{head}; {evidence}: within the seed spread, i.e. noise on this data; {SHOWS_IT} shows "
                         "the effect")
    return lines


_LAST_COMPARISON: list[str] = []  # printed last by the command line, after the runner's metrics dump


def report_comparison(r: Run, summary: dict[str, dict[str, tuple[float, float]]],
                      per_seed: dict[str, list[dict[str, Any]]], seeds: list[int]) -> list[str]:
    """Save the comparison as ``<run>/comparison.txt`` and return its lines (the command line prints them)."""
    lines = compare(summary, per_seed, seeds)
    r.save_text("comparison.txt", "\n".join(lines) + "\n")
    _LAST_COMPARISON[:] = lines
    return lines


def summary_markdown(summary: dict[str, dict[str, tuple[float, float]]], cfg: DictConfig, seeds: list) -> str:
    head = ("| method | small acc | s_d | s_o | AUROC | AUC-DF | cascade acc @ "
            f"{int(cfg.eval.rate * 100)}% deferral |\n|---|---|---|---|---|---|---|\n")
    lines = [f"| {m} | " + " | ".join(f"{v[k][0]:.3f} ± {v[k][1]:.3f}" for k in COLUMNS) + " |"
             for m, v in summary.items()]
    return (f"{cfg.data.source}, seeds {seeds}, mean ± std over seeds (test split)\n\n" + head
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main("gatekeeper", run)
    if _LAST_COMPARISON:
        print("\n".join(["", "Gatekeeper vs the cross-entropy fine-tune of equal length:", *_LAST_COMPARISON]))
