import numpy as np
import pandas as pd
import pytest
import torch

from lit_cascades.data.multilabel import (
    DigitsRankingDataModule,
    MultiLabelDataModule,
    RankingData,
    SyntheticRankingDataModule,
    TabularRankingDataModule,
    _correlation_factor,
    load_digits_ranking,
    load_table,
    make_synthetic_ranking,
)


@pytest.mark.parametrize("deterministic", [False, True])
def test_synthetic_knobs(deterministic):
    d = make_synthetic_ranking(n=100_000, priors=(0.5, 0.1, 0.3), correlation=0.4, deterministic=deterministic, seed=1)
    assert d.features.shape == (100_000, 8) and d.labels.shape == (100_000, 3)
    # the priors are population priors: E[eta] and the label frequencies match them
    torch.testing.assert_close(d.eta.double().mean(0), d.priors, atol=0.006, rtol=0)
    torch.testing.assert_close(d.labels.double().mean(0), d.priors, atol=0.006, rtol=0)
    w = _correlation_factor(0.4, 3)  # latent scores s = W x[:, :3] have unit variances and correlation 0.4
    torch.testing.assert_close(w @ w.T, torch.full((3, 3), 0.4, dtype=torch.float64).fill_diagonal_(1.0))
    if deterministic:
        assert set(d.eta.unique().tolist()) == {0.0, 1.0} and torch.equal(d.eta, d.labels)
    else:
        assert 0 < float(d.eta.min()) and float(d.eta.max()) < 1
    # positive latent correlation gives positively correlated labels
    c = np.corrcoef(d.labels.T.numpy())
    assert c[0, 1] > 0.1 and c[0, 2] > 0.1


def test_synthetic_independent_labels_and_bad_input():
    d = make_synthetic_ranking(n=50_000, priors=(0.5, 0.2), correlation=0.0, deterministic=True)
    joint = (d.labels[:, 0] * d.labels[:, 1]).mean().item()
    assert joint == pytest.approx(0.5 * 0.2, abs=0.006)
    with pytest.raises(ValueError, match="^priors"):
        make_synthetic_ranking(priors=(0.5, 1.0))
    with pytest.raises(ValueError, match="correlation"):
        make_synthetic_ranking(priors=(0.5, 0.5, 0.5), correlation=-0.9)
    with pytest.raises(ValueError, match="num_features"):
        make_synthetic_ranking(priors=(0.5, 0.5, 0.5), num_features=2)


def test_digits_labels_and_noise():
    d = load_digits_ranking({"even": [0, 2, 4, 6, 8], "zero": [0]})
    from sklearn.datasets import load_digits

    y = load_digits().target
    assert torch.equal(d.labels[:, 0], torch.as_tensor(y % 2 == 0).float())
    assert torch.equal(d.labels[:, 1], torch.as_tensor(y == 0).float())
    noisy = load_digits_ranking({"even": [0, 2, 4, 6, 8], "zero": [0]}, label_noise={"zero": 0.2}, seed=3)
    flipped = (noisy.labels[:, 1] != d.labels[:, 1]).float().mean().item()
    assert 0.15 < flipped < 0.25 and torch.equal(noisy.labels[:, 0], d.labels[:, 0])
    with pytest.raises(ValueError, match="^label_noise: names unknown labels"):
        load_digits_ranking({"a": [1]}, label_noise={"b": 0.1})
    with pytest.raises(ValueError, match=r"^label_sets: .*0\.\.9"):
        load_digits_ranking({"a": [10]})
    for rate in (0.5, -0.1):  # a flip rate of 0.5 destroys the label; above it inverts it
        with pytest.raises(ValueError, match=r"^label_noise: expected flip probabilities in \[0, 0\.5\)"):
            DigitsRankingDataModule(label_sets={"a": [1]}, label_noise={"a": rate})


def _write_table(tmp_path, fmt="csv"):
    df = pd.DataFrame({
        "age": [30, 40, 50, 60, 35, 45, 55, 65, 33, 44],
        "job": ["a", "b", "a", "c", "b", "a", "c", "b", "a", "c"],
        "helpful": ["yes", "no"] * 5,
        "correct": [1, 0, 0, 1, 1, 0, 1, 0, 1, 1],
        "rating": [1, 2, 3, 4, 5, 1, 2, 3, 4, 5],
        "qid": [1, 1, 2, 2, 3, 3, 4, 4, 5, 5],
    })
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False, sep=";")
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_load_table(tmp_path, fmt):
    path = _write_table(tmp_path, fmt)
    d = load_table(path, ["helpful", "correct"], group="qid", label_thresholds=None, drop=["rating"],
                   categorical=["job"])
    assert d.label_names == ["helpful", "correct"]
    assert d.labels[:, 0].tolist() == [1.0, 0.0] * 5
    assert d.features.shape == (10, 4)  # age + one-hot job (3)
    assert d.groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    graded = load_table(path, ["rating"], features=["age"], label_thresholds={"rating": 4})
    assert graded.labels[:, 0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    dropped = load_table(path, ["helpful", "correct"], group="qid", drop=["rating", "job"])
    assert dropped.feature_names == ["age"]


def test_load_table_bad_input(tmp_path):
    path = _write_table(tmp_path)
    with pytest.raises(ValueError, match=r"^labels: .*\['clicked'\] not found.*available columns: \['age', 'job'"):
        load_table(path, ["helpful", "clicked"])
    with pytest.raises(ValueError, match=r"^features: .*\['city'\] not found.*available columns: \['age', 'job'"):
        load_table(path, ["helpful"], features=["age", "city"])
    with pytest.raises(ValueError, match=r"^drop: .*\['nope'\] not found"):
        load_table(path, ["helpful"], drop=["nope"])
    with pytest.raises(ValueError, match=r"^labels: label column .rating. must be binary.*threshold"):
        load_table(path, ["rating"])
    with pytest.raises(FileNotFoundError, match="^path: no such file"):
        load_table(tmp_path / "missing.csv", ["a"])
    with pytest.raises(ValueError, match="^label_thresholds: .*not label columns"):
        load_table(path, ["helpful"], label_thresholds={"rating": 3})


def test_string_feature_column_is_an_error_naming_it(tmp_path):
    """A numeric column with a few stray strings must not become dozens of one-hot features."""
    n = 150
    df = pd.DataFrame({"score": [str(i) for i in range(n - 3)] + ["n/a", "?", "missing"],
                       "age": np.arange(n, dtype=float), "y": [0, 1] * (n // 2)})
    path = tmp_path / "mixed.csv"
    df.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"^features: column 'score' holds strings \('0', '1', '2', \.\.\.\); "
                                         r"expected numbers.*drop=\[\.\.\.\]"):
        load_table(path, ["y"])
    with pytest.raises(ValueError, match=r"^features: column 'score'"):
        TabularRankingDataModule(path=path, labels=["y"], batch_size=4).setup()
    assert load_table(path, ["y"], drop=["score"]).feature_names == ["age"]


def test_non_finite_and_missing_features_name_the_column(tmp_path):
    df = pd.DataFrame({"a": [1.0, 2.0, np.inf, 4.0], "b": [1.0, np.nan, 3.0, 4.0], "y": [0, 1, 0, 1]})
    df.to_csv(tmp_path / "inf.csv", index=False)
    with pytest.raises(ValueError, match=r"^features: column\(s\) \['b'\] have missing values"):
        load_table(tmp_path / "inf.csv", ["y"])
    with pytest.raises(ValueError, match=r"^features: column\(s\) 'a' \(1 values\) hold non-finite"):
        load_table(tmp_path / "inf.csv", ["y"], drop=["b"])


def test_constant_training_feature_stays_bounded_on_validation():
    g = torch.Generator().manual_seed(0)
    n = 400
    x = torch.randn(n, 3, generator=g)
    labels = torch.stack([torch.arange(n) % 2, (torch.arange(n) % 3 == 0)], 1).float()
    train_rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[200:]  # the split of split_seed=0
    x[:, 2] = 5.0 + torch.randn(n, generator=g)
    x[train_rows, 2] = 5.0  # constant on the training split only
    dm = MultiLabelDataModule(data=RankingData(x, labels, ["a", "b"]), val_fraction=0.25, test_fraction=0.25)
    dm.setup()
    assert float(dm.splits["train"].features[:, 2].abs().max()) == 0.0  # centred
    torch.testing.assert_close(dm.splits["train"].features[:, :2].std(0), torch.ones(2))  # others standardised
    for name in ("val", "test"):
        feats = dm.splits[name].features
        assert float(feats[:, 2].std()) > 0.5  # the validation values still differ
        assert float(feats.abs().max()) < 10  # not (x - 5) / 1e-6


def test_datamodules_split_standardize_and_batches(tmp_path):
    dm = SyntheticRankingDataModule(n=1000, priors=(0.5, 0.2), batch_size=64, val_fraction=0.2, test_fraction=0.1)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"val": 200, "test": 100, "train": 700}
    tr = dm.splits["train"].features
    torch.testing.assert_close(tr.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (64, 8) and batch["labels"].shape == (64, 2) and batch["eta"].shape == (64, 2)
    assert dm.label_names == ["label0", "label1"] and dm.num_features == 8
    torch.testing.assert_close(dm.priors(), torch.tensor([0.5, 0.2], dtype=torch.float64))
    # indices of the three splits are disjoint and cover the data
    idx = torch.cat([dm.splits[s].features[:, 0] for s in ("train", "val", "test")])
    assert idx.shape[0] == 1000

    digits = DigitsRankingDataModule(label_sets={"even": [0, 2, 4, 6, 8], "zero": [0]})
    assert digits.num_features == 64 and digits.label_names == ["even", "zero"]

    tab = TabularRankingDataModule(path=_write_table(tmp_path), labels=["helpful", "correct"], group="qid",
                                   categorical=["job"], val_fraction=0.2, test_fraction=0.2, batch_size=4)
    tab.setup()
    for s in tab.splits.values():  # groups are kept whole
        assert all(int((s.groups == g).sum()) == 2 for g in s.groups.unique())
    batch = next(iter(tab.train_dataloader()))
    assert all(int((batch["group"] == g).sum()) == 2 for g in batch["group"].unique())  # whole groups

    constant = load_digits_ranking({"even": [0, 2, 4, 6, 8], "any": list(range(10))})
    with pytest.raises(ValueError, match=r"single class in the training split.*any \(\d+ of \d+ positive\)"):
        MultiLabelDataModule(data=constant).setup()
    with pytest.raises(NotImplementedError):
        MultiLabelDataModule().setup()
    with pytest.raises(ValueError, match="^val_fraction: val_fraction \\+ test_fraction"):
        MultiLabelDataModule(val_fraction=0.6, test_fraction=0.5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"val_fraction": 0.0}, r"^val_fraction: expected a fraction in \(0, 1\); got 0.0"),
    ({"val_fraction": -0.1}, r"^val_fraction: expected a fraction in \(0, 1\)"),
    ({"test_fraction": 1.0}, r"^test_fraction: expected a fraction in \(0, 1\)"),
    ({"batch_size": 1}, r"^batch_size: expected >= 2"),
    ({"eval_batch_size": 0}, r"^eval_batch_size: expected >= 1"),
    ({"priors": (0.5, 1.0)}, r"^priors: expected label priors in \(0, 1\)"),
    ({"priors": (0.0,)}, r"^priors: expected label priors in \(0, 1\)"),
    ({"priors": ()}, r"^priors: expected at least one"),
    ({"priors": (0.5, 0.5, 0.5), "correlation": -0.9}, r"^correlation: expected a number in"),
    ({"priors": (0.5, 0.5, 0.5), "num_features": 2}, r"^num_features: expected >= the number of labels"),
    ({"label_names": ["a"]}, r"^label_names: expected one name per prior"),
])
def test_synthetic_datamodule_rejects_bad_values_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticRankingDataModule(**kwargs)


def test_tabular_datamodule_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="^labels: expected a non-empty list"):
        TabularRankingDataModule(path=tmp_path / "t.csv", labels="helpful")
    with pytest.raises(ValueError, match="^drop: expected a list"):
        TabularRankingDataModule(path=tmp_path / "t.csv", labels=["helpful"], drop="job")
    with pytest.raises(FileNotFoundError, match="^path: no such file"):
        TabularRankingDataModule(path=tmp_path / "nope.csv", labels=["helpful"]).setup()
    path = _write_table(tmp_path)
    with pytest.raises(ValueError, match="^categorical: .*not feature columns"):
        load_table(path, ["helpful"], features=["age"], categorical=["job"])


def test_group_batch_sampler():
    from lit_cascades.data.multilabel import GroupBatchSampler

    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])
    sampler = GroupBatchSampler(groups, batch_size=4, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(11))
    for b in batches:
        assert all(set(torch.nonzero(groups == groups[i]).flatten().tolist()) <= set(b) for i in b)
    assert all(len(b) >= 4 for b in batches[:-1]) and len(sampler) == len(batches)
    sampler.set_epoch(1)
    assert [sorted(b) for b in sampler] != [sorted(b) for b in batches] or len(batches) == 1
