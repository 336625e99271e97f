import csv

import lightning.pytorch as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lit_cascades.callbacks.ranking import RankingAUCLogger, pareto_mask
from lit_cascades.data.multilabel import SyntheticRankingDataModule
from lit_cascades.modules.ranking import MultiLabelRanker


def _trainer(tmp_path, cb, **kw):
    return pl.Trainer(accelerator="cpu", max_epochs=kw.pop("max_epochs", 2), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), callbacks=[cb], **kw)


def test_logs_per_label_auc_equal_to_sklearn_and_writes_files(tmp_path):
    dm = SyntheticRankingDataModule(n=800, priors=(0.5, 0.2), label_names=["helpful", "correct"], batch_size=64,
                                    eval_batch_size=50)  # several eval batches: the metric is epoch-level
    cb = RankingAUCLogger()
    m = MultiLabelRanker(num_features=8, label_names=["helpful", "correct"], aggregation="loss")
    trainer = _trainer(tmp_path, cb)
    trainer.fit(m, dm)
    after_fit = set(trainer.callback_metrics)
    trainer.test(m, dm, verbose=False)
    test = dm.splits["test"]
    with torch.no_grad():
        scores = m(test.features).numpy()
    ref = {n: roc_auc_score(test.labels[:, k].numpy(), scores) for k, n in enumerate(["helpful", "correct"])}
    logged = trainer.callback_metrics
    for n, v in ref.items():
        assert logged[f"test/rank/auc_{n}"].item() == pytest.approx(v, abs=1e-6)
    assert logged["test/rank/auc_min"].item() == pytest.approx(min(ref.values()), abs=1e-6)
    assert logged["test/rank/auc_mean"].item() == pytest.approx(sum(ref.values()) / 2, abs=1e-6)
    assert {"val/rank/auc_min", "val/rank/auc_helpful"} <= after_fit
    assert not [k for k in after_fit | set(logged) if k.startswith("rank/")]
    assert set(cb.reports) == {"val", "test"}
    rows = list(csv.DictReader(open(tmp_path / "ranking_test.csv")))
    assert [r["label"] for r in rows] == ["helpful", "correct"]
    assert float(rows[0]["auroc"]) == pytest.approx(ref["helpful"], abs=1e-9)
    assert len(cb.sweep) == 1 and not (tmp_path / "pareto_helpful_vs_correct.png").exists()


def test_sweep_points_make_a_pareto_plot(tmp_path):
    dm = SyntheticRankingDataModule(n=400, priors=(0.5, 0.2), batch_size=64)
    cb = RankingAUCLogger(output_dir=tmp_path)
    for agg in ("loss", "label"):
        for w in (0.2, 0.8):
            m = MultiLabelRanker(num_features=8, aggregation=agg, weights=[w, 1 - w])
            cb.tag = f"{agg}_{w}"
            trainer = _trainer(tmp_path, cb, max_epochs=1, limit_val_batches=0)
            trainer.fit(m, dm)
            trainer.test(m, dm, verbose=False)
    assert [p["group"] for p in cb.sweep] == ["loss", "loss", "label", "label"]
    assert cb.sweep[0]["weight"] == pytest.approx(0.2)
    rows = list(csv.DictReader(open(tmp_path / "pareto_label0_vs_label1.csv")))
    assert len(rows) == 4 and rows[3]["tag"] == "label_0.8"
    assert (tmp_path / "pareto_label0_vs_label1.png").stat().st_size > 0


def test_pareto_media_keys_differ(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    class Recorder(WandbLogger):
        def __init__(self):
            self.keys = []

        def log_image(self, key, images, **kw):
            self.keys.append(("image", key))

        def log_table(self, key, columns=None, data=None, **kw):
            self.keys.append(("table", key))

    cb = RankingAUCLogger()
    cb.sweep = [{"tag": t, "group": "loss", "weight": w, "labels": ["a", "b"], "auc_a": a, "auc_b": b,
                 "auc_min": min(a, b), "auc_mean": (a + b) / 2}
                for t, w, a, b in (("x", 0.2, 0.6, 0.8), ("y", 0.8, 0.8, 0.6))]
    rec = Recorder()
    cb.save_pareto(tmp_path, [rec])
    assert rec.keys == [("image", "test/rank/pareto_plot"), ("table", "test/rank/pareto_table")]


def test_pareto_mask():
    assert pareto_mask([0.9, 0.8, 0.7, 0.85], [0.5, 0.6, 0.55, 0.6]) == [True, False, False, True]
