"""Gatekeeper: confidence tuning of a cascade's small model (Rabanser et al., arXiv:2502.19335).

    python -m recipes.gatekeeper                                   # digits, offline, ~1 min on 2 CPU cores
    python -m recipes.gatekeeper preset=fashion_mnist gatekeeper.alpha=0.3 output_dir=runs/x
    python -m recipes.gatekeeper preset=sweep_digits               # α sweep × seeds: the README table
    python -m recipes.gatekeeper --help                            # presets and every config key

1. train the large model M_L and the small model M_S with cross-entropy;
2. cache M_L's correctness on the validation and test splits (the cascade never re-runs M_L);
3. evaluate the cascade with the CE-trained M_S (confidence = max softmax by default);
4. fine-tune M_S with the Gatekeeper loss and, the fair baseline, with cross-entropy for the same steps;
5. write metrics.json, deferral_curves.{csv,png} and per-stage curves to the run directory and W&B.

With ``sweep.seeds`` / ``sweep.alphas`` set, steps 1–4 repeat per seed and the Gatekeeper fine-tuning per α
(M_L and M_S are trained once per seed), and the run writes sweep.csv and a mean ± std table.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig

from lit_cascades.callbacks import DeferralCurveLogger, deferral_table
from lit_cascades.data import ImageClassificationDataModule
from lit_cascades.models import build_classifier, count_parameters
from lit_cascades.modules import Classifier, GatekeeperClassifier
from lit_cascades.plotting import plot_deferral_curves, plot_sweep
from lit_cascades.runner import Run, main, summarize_runs

COLUMNS = ("test_acc", "s_d", "s_o", "auroc", "auc_df", "quality_at_rate")


def train_classifier(r: Run, stage: str, spec: DictConfig, dm: ImageClassificationDataModule) -> Classifier:
    """Train (or load from ``spec.checkpoint``) a cross-entropy classifier described by ``spec``."""
    net = build_classifier(spec.arch, dm.input_shape, dm.num_classes, **spec.kwargs)
    if spec.checkpoint:
        return Classifier.load_from_checkpoint(spec.checkpoint, model=net, map_location="cpu")
    return r.fit(stage, Classifier(net, dm.num_classes, lr=spec.lr), dm, max_epochs=spec.epochs)


def evaluate(r: Run, stage: str, module: Classifier, dm: ImageClassificationDataModule) -> tuple[dict, Any]:
    """Test ``module`` as the cascade's small model; returns ``(scalars, test DeferralReport)``."""
    cb = DeferralCurveLogger(rate=r.cfg.eval.rate, ideal=r.cfg.eval.ideal, output_dir=r.dir, tag=stage)
    logged = r.test(stage, module, dm, callbacks=[cb])
    report = cb.reports["test"]["score"]
    return {"test_acc": logged["test/acc"], **report.scalars}, report


def finetune(r: Run, stage: str, module: Classifier, dm: ImageClassificationDataModule) -> tuple[dict, Any]:
    """Fine-tune the small model for ``gatekeeper.epochs`` (validation curves logged), then test it."""
    val_cb = DeferralCurveLogger(rate=r.cfg.eval.rate, ideal=r.cfg.eval.ideal, output_dir=r.dir, tag=stage)
    r.fit(stage, module, dm, max_epochs=r.cfg.gatekeeper.epochs, callbacks=[val_cb])
    return evaluate(r, stage, module, dm)


def gatekeeper_module(cfg: DictConfig, small: Classifier, num_classes: int, alpha: float) -> GatekeeperClassifier:
    gk = cfg.gatekeeper
    return GatekeeperClassifier(copy.deepcopy(small.model), num_classes, alpha=alpha, normalize=gk.normalize,
                                lr=gk.lr, confidence=gk.confidence)


def ce_module(cfg: DictConfig, small: Classifier, num_classes: int) -> Classifier:
    """The fair baseline: the same fine-tuning schedule with plain cross-entropy."""
    return Classifier(copy.deepcopy(small.model), num_classes, lr=cfg.gatekeeper.lr,
                      confidence=cfg.gatekeeper.confidence)


def prepare(r: Run, prefix: str = "") -> tuple[ImageClassificationDataModule, Classifier, Classifier]:
    """Data, the trained M_L and M_S, and M_L's cached correctness on the evaluation splits."""
    cfg = r.cfg
    dm = ImageClassificationDataModule(**cfg.data, seed=cfg.seed)
    dm.setup()
    large = train_classifier(r, f"{prefix}large", cfg.large, dm)
    small = train_classifier(r, f"{prefix}small", cfg.small, dm)
    for split in ("val", "test"):
        dm.attach(split, "large_quality", r.predict(large, dm.predict_dataloader(split))["correct"])
    return dm, large, small


def run_single(cfg: DictConfig, r: Run) -> dict[str, Any]:
    dm, large, small = prepare(r)
    results: dict[str, Any] = {
        "data": {"source": cfg.data.source, **{f"n_{k}": len(v) for k, v in dm.splits.items()}},
        "params": {"small": count_parameters(small.model), "large": count_parameters(large.model)},
        "large": {"test_acc": float(dm.splits["test"].extras["large_quality"].mean())},
    }
    reports = {}
    results["small_ce"], reports["cross-entropy"] = evaluate(r, "small_ce", small, dm)
    alpha = cfg.gatekeeper.alpha
    results["gatekeeper"], reports[f"gatekeeper (α={alpha})"] = finetune(
        r, "gatekeeper", gatekeeper_module(cfg, small, dm.num_classes, alpha), dm)
    if cfg.baseline_finetune:
        results["ce_finetune"], reports["cross-entropy fine-tune"] = finetune(
            r, "ce_finetune", ce_module(cfg, small, dm.num_classes), dm)

    fig, _ = plot_deferral_curves(reports, title=f"{cfg.data.source}: deferral curves (test)")
    r.save_figure("deferral_curves", fig)
    r.save_table("deferral_curves", *deferral_table(reports))
    return results


def run_sweep(cfg: DictConfig, r: Run) -> dict[str, Any]:
    seeds = list(cfg.sweep.seeds) or [cfg.seed]
    alphas = list(cfg.sweep.alphas) or [cfg.gatekeeper.alpha]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        pl.seed_everything(seed, workers=True, verbose=False)
        dm, _, small = prepare(r, prefix=f"seed{seed}/")
        results = {"cross-entropy": evaluate(r, f"seed{seed}/small_ce", small, dm)[0]}
        finetunes = {f"gatekeeper α={a}": (f"gatekeeper_a{a}", gatekeeper_module(cfg, small, dm.num_classes, a))
                     for a in alphas}
        if cfg.baseline_finetune:
            finetunes["cross-entropy fine-tune"] = ("ce_finetune", ce_module(cfg, small, dm.num_classes))
        for method, (stage, module) in finetunes.items():
            results[method] = finetune(r, f"seed{seed}/{stage}", module, dm)[0]
        rows += [{"method": m, "seed": seed, **{k: v[k] for k in COLUMNS}} for m, v in results.items()]
    r.save_table("sweep", ["method", "seed", *COLUMNS], [[row[c] for c in ("method", "seed", *COLUMNS)]
                                                          for row in rows])
    summary = summarize_runs(rows, "method", COLUMNS)
    r.save_text("sweep_table.md", summary_markdown(summary, cfg, seeds))
    x_of = {f"gatekeeper α={a}": float(a) for a in alphas}
    fig = plot_sweep(summary, x_of, x_label="Gatekeeper α", y_keys=("s_d", "test_acc", "auroc"),
                     swept_label="gatekeeper")
    r.save_figure("sweep", fig)
    return {"seeds": seeds, "alphas": alphas, "summary": summary}


def summary_markdown(summary: dict[str, dict[str, tuple[float, float]]], cfg: DictConfig, seeds: list) -> str:
    head = ("| method | small acc | s_d | s_o | AUROC | AUC-DF | cascade acc @ "
            f"{int(cfg.eval.rate * 100)}% deferral |\n|---|---|---|---|---|---|---|\n")
    lines = [f"| {m} | " + " | ".join(f"{v[k][0]:.3f} ± {v[k][1]:.3f}" for k in COLUMNS) + " |"
             for m, v in summary.items()]
    return (f"{cfg.data.source}, seeds {seeds}, mean ± std over seeds (test split)\n\n" + head
            + "\n".join(lines) + "\n")


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    if cfg.sweep.seeds or cfg.sweep.alphas:
        return run_sweep(cfg, r)
    return run_single(cfg, r)


if __name__ == "__main__":
    main("gatekeeper", run)
