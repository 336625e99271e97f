import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import MultilabelAUROC

from lit_cascades.metrics.ranking import MultiLabelAUROC, ranking_auc_report


def _data(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 50, (n,), generator=g).float()  # ties
    labels = (torch.rand(n, 3, generator=g) < torch.tensor([0.5, 0.1, 0.3])).long()
    return scores, labels


def test_metric_equals_sklearn_and_torchmetrics_over_batches():
    scores, labels = _data()
    m = MultiLabelAUROC(["a", "b", "c"])
    for chunk in range(0, 500, 64):
        m.update(scores[chunk : chunk + 64], labels[chunk : chunk + 64])
    rep = m.compute()
    ref = [roc_auc_score(labels[:, k].numpy(), scores.numpy()) for k in range(3)]
    # torchmetrics applies a sigmoid to scores outside [0, 1]; scale them into [0, 1] (AUROC is rank-based)
    tm = MultilabelAUROC(num_labels=3, average=None)((scores / 100)[:, None].expand(-1, 3), labels)
    for k, name in enumerate("abc"):
        assert rep.per_label[name] == pytest.approx(ref[k], abs=1e-12)
        assert rep.per_label[name] == pytest.approx(tm[k].item(), abs=1e-5)
    assert rep.scalars["auc_min"] == pytest.approx(min(ref), abs=1e-12)
    assert rep.scalars["auc_mean"] == pytest.approx(sum(ref) / 3, abs=1e-12)
    assert rep.scalars["auc_diff"] == pytest.approx(max(ref) - min(ref), abs=1e-12)
    assert rep.scalars["prior_b"] == pytest.approx(labels[:, 1].float().mean().item())


def test_duplicated_examples_are_counted_once_with_ids():
    """DistributedSampler padding repeats examples; with `ids` the metric ignores the repeats."""
    scores, labels = _data(n=101)
    index = torch.arange(101)
    ref = MultiLabelAUROC(["a", "b", "c"])
    ref.update(scores, labels, index)
    padded = MultiLabelAUROC(["a", "b", "c"])
    order = torch.cat([index[0::2], index[1::2], index[:3]])  # two "ranks" plus 3 padded repeats
    padded.update(scores[order], labels[order], index[order])
    assert padded.compute().scalars == ref.compute().scalars
    no_index = MultiLabelAUROC(["a", "b", "c"])
    no_index.update(scores[order], labels[order])
    assert no_index.compute().scalars["num_examples"] == 104


def test_single_class_label_is_nan_with_warning():
    scores = torch.rand(20)
    labels = torch.stack([torch.ones(20), (torch.arange(20) % 2).float()], 1)
    with pytest.warns(RuntimeWarning, match=r"undefined \(NaN\) for labels \['all'\]"):
        rep = ranking_auc_report(scores, labels, ["all", "half"])
    assert rep.per_label["all"] != rep.per_label["all"]
    assert rep.scalars["auc_min"] == rep.per_label["half"]


def test_bad_input():
    m = MultiLabelAUROC(["a", "b"])
    with pytest.raises(ValueError, match=r"labels \[B, 2\]"):
        m.update(torch.rand(4), torch.ones(4, 3))
    with pytest.raises(ValueError, match="finite"):
        m.update(torch.tensor([0.1, float("nan")]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="binary"):
        m.update(torch.rand(2), torch.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
