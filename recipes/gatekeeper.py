"""Gatekeeper: confidence tuning of a cascade's small model (Rabanser et al., arXiv:2502.19335).

    python -m recipes.gatekeeper                                   # digits, offline, ~2 min on 2 CPU cores
    python -m recipes.gatekeeper preset=fashion_mnist gatekeeper.alpha=0.3 output_dir=runs/x
    python -m recipes.gatekeeper --help                            # presets and every config key

1. train the large model M_L and the small model M_S with cross-entropy;
2. cache M_L's correctness on the validation and test splits (the cascade never re-runs M_L);
3. evaluate the cascade with the CE-trained M_S (confidence = max softmax by default);
4. fine-tune M_S with the Gatekeeper loss, and (the fair baseline) with cross-entropy for the same steps;
5. write metrics.json, deferral_curves.{csv,png} and per-stage curves to the run directory and W&B.
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import DictConfig

from lit_cascades.callbacks import DeferralCurveLogger, deferral_table
from lit_cascades.data import ImageClassificationDataModule
from lit_cascades.models import build_classifier, count_parameters
from lit_cascades.modules import Classifier, GatekeeperClassifier
from lit_cascades.plotting import plot_deferral_curves
from lit_cascades.runner import Run, main


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


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    dm = ImageClassificationDataModule(**cfg.data, seed=cfg.seed)
    dm.setup()

    large = train_classifier(r, "large", cfg.large, dm)
    small = train_classifier(r, "small", cfg.small, dm)
    for split in ("val", "test"):  # cache M_L's per-example correctness once
        dm.attach(split, "large_quality", r.predict(large, dm.predict_dataloader(split))["correct"])

    results: dict[str, Any] = {
        "data": {"source": cfg.data.source, **{f"n_{k}": len(v) for k, v in dm.splits.items()}},
        "params": {"small": count_parameters(small.model), "large": count_parameters(large.model)},
        "large": {"test_acc": float(dm.splits["test"].extras["large_quality"].mean())},
    }
    reports = {}
    results["small_ce"], reports["cross-entropy"] = evaluate(r, "small_ce", small, dm)

    gk = cfg.gatekeeper
    finetunes = {"gatekeeper": GatekeeperClassifier(copy.deepcopy(small.model), dm.num_classes, alpha=gk.alpha,
                                                    normalize=gk.normalize, lr=gk.lr, confidence=gk.confidence)}
    if cfg.baseline_finetune:
        finetunes["ce_finetune"] = Classifier(copy.deepcopy(small.model), dm.num_classes, lr=gk.lr,
                                              confidence=gk.confidence)
    for stage, module in finetunes.items():
        val_cb = DeferralCurveLogger(rate=cfg.eval.rate, ideal=cfg.eval.ideal, output_dir=r.dir, tag=stage)
        r.fit(stage, module, dm, max_epochs=gk.epochs, callbacks=[val_cb])
        label = f"gatekeeper (α={gk.alpha})" if stage == "gatekeeper" else "cross-entropy fine-tune"
        results[stage], reports[label] = evaluate(r, stage, module, dm)

    fig, _ = plot_deferral_curves(reports, title=f"{cfg.data.source}: deferral curves (test)")
    r.save_figure("deferral_curves", fig)
    r.save_table("deferral_curves", *deferral_table(reports))
    return results


if __name__ == "__main__":
    main("gatekeeper", run)
