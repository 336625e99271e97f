import lightning.pytorch as pl
import pytest
import torch
from scipy.stats import spearmanr

from lit_cascades.data.multilabel import SyntheticRankingDataModule
from lit_cascades.functional import (
    bayes_optimal_label_aggregation,
    bayes_optimal_loss_aggregation,
    label_aggregation_loss,
    loss_aggregation_loss,
)
from lit_cascades.modules.ranking import MultiLabelRanker


def _batch(b=32, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, 5, generator=g), "labels": (torch.rand(b, k, generator=g) < 0.4).float(),
            "index": torch.arange(b)}


@pytest.mark.parametrize("aggregation", ["loss", "label"])
def test_training_step_is_the_functional_loss(aggregation):
    batch = _batch()
    m = MultiLabelRanker(num_features=5, aggregation=aggregation, weights=[0.7, 0.3], cost="uniform")
    loss = m.training_step(batch, 0)
    scores = m(batch["x"])
    if aggregation == "loss":
        ref = loss_aggregation_loss(scores, batch["labels"], [0.7, 0.3]).loss
    else:
        ref = label_aggregation_loss(scores, batch["labels"], "uniform", weights=[0.7, 0.3]).loss
    torch.testing.assert_close(loss, ref)
    out = m.validation_step(batch, 0)["ranking"]
    assert out["scores"].shape == (32,) and torch.equal(out["ids"], batch["index"])


def test_custom_scorer_and_label_hook():
    class MaxLabelRanker(MultiLabelRanker):
        """LaA with Ȳ = max_k Y_k ("any label positive")."""

        def aggregate_labels(self, labels):
            return labels.max(1).values.double()

    m = MaxLabelRanker(scorer=torch.nn.Linear(5, 1), label_names=["a", "b"])
    batch = _batch()
    scores = m(batch["x"])
    any_pos = batch["labels"].max(1).values[:, None]
    ref = label_aggregation_loss(scores, any_pos, "difference").loss
    torch.testing.assert_close(m.training_step(batch, 0), ref)
    assert m.effective_label_weights([0.5, 0.2]) == {"a": 0.5, "b": 0.5}


def test_effective_label_weights():
    loa = MultiLabelRanker(num_features=3, aggregation="loss", label_names=["a", "b"])
    w = loa.effective_label_weights([0.5, 0.1])
    assert w["b"] > w["a"] and w["a"] + w["b"] == pytest.approx(1.0)
    laa = MultiLabelRanker(num_features=3, aggregation="label", label_names=["a", "b"], weights=[3, 1])
    assert laa.effective_label_weights([0.5, 0.1]) == {"a": 0.75, "b": 0.25}


def test_bad_arguments():
    with pytest.raises(ValueError, match="aggregation"):
        MultiLabelRanker(num_features=3, aggregation="mean")
    with pytest.raises(ValueError, match="one entry per label"):
        MultiLabelRanker(num_features=3, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive number"):
        MultiLabelRanker(num_features=3, weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="num_features"):
        MultiLabelRanker()
    m = MultiLabelRanker(num_features=5)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        m.training_step({"x": torch.randn(4, 5), "labels": torch.ones(4, 3)}, 0)
    with pytest.raises(KeyError, match="labels"):
        m.training_step({"x": torch.randn(4, 5)}, 0)


@pytest.mark.slow
def test_trained_ranking_matches_the_bayes_optimal_scorer():
    """Synthetic data with known η, skewed priors (0.5, 0.05) and anti-correlated labels: each aggregation's trained scorer orders the
    test set like its own Bayes-optimal scorer (Spearman > 0.95), and closer to it than to the other's (by > 0.05)."""
    dm = SyntheticRankingDataModule(n=6000, priors=(0.5, 0.05), correlation=-0.5, sharpness=3.0, num_features=4, batch_size=256,
                                    val_fraction=0.1, test_fraction=0.3, seed=0)
    dm.setup()
    test = dm.splits["test"]
    bayes = {"loss": bayes_optimal_loss_aggregation(test.eta, dm.priors()),
             "label": bayes_optimal_label_aggregation(test.eta)}
    assert spearmanr(bayes["loss"], bayes["label"]).statistic < 0.9  # the two targets really differ
    for agg in ("loss", "label"):
        pl.seed_everything(0)
        m = MultiLabelRanker(num_features=4, aggregation=agg, hidden=[32], lr=3e-3)
        pl.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(m, dm)
        with torch.no_grad():
            scores = m(test.features)
        own = spearmanr(scores, bayes[agg]).statistic
        other = spearmanr(scores, bayes["label" if agg == "loss" else "loss"]).statistic
        assert own > 0.95, (agg, own)
        assert own > other + 0.05, (agg, own, other)


class _SGDRanker(MultiLabelRanker):
    """Plain SGD, so that a wrong gradient scale under DDP would show (Adam would normalise it away)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit_one_step(devices: int, tmp_path) -> tuple[dict, dict]:
    from lit_cascades.callbacks import RankingAUCLogger

    # 102 examples: 19 val (odd: DistributedSampler pads one), 19 test, 64 train = one global batch
    dm = SyntheticRankingDataModule(n=102, priors=(0.5, 0.2), val_fraction=0.19, test_fraction=0.19,
                                    batch_size=64, eval_batch_size=4, seed=3)  # global: 32 per process on 2
    torch.manual_seed(0)
    m = _SGDRanker(num_features=8, aggregation="loss", weights=[0.6, 0.4], hidden=[16])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                         callbacks=[RankingAUCLogger()])
    trainer.fit(m, dm)
    if devices == 1:
        assert trainer.global_step == 1  # (under ddp_spawn the steps ran in the workers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/rank/")}
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())
    return m.state_dict(), metrics


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    """2 × 32 examples with scores gathered across processes = one batch of 64: same SGD step (weights),
    and the validation AUROCs (19 examples, one padded duplicate) are equal on 1 and 2 processes."""
    w1, m1 = _fit_one_step(1, tmp_path / "one")
    w2, m2 = _fit_one_step(2, tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-5)
    assert {"val/rank/auc_label0", "val/rank/auc_label1", "val/rank/auc_min", "val/rank/auc_mean"} <= set(m1)
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], abs=1e-6), k
