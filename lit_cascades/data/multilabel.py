"""Instances with several binary labels, for bipartite ranking from multiple labels (Lukasik et al., ICML 2025).

Three sources, all giving a :class:`RankingData` (features ``[N, D]``, labels ``[N, K]``):

* :func:`make_synthetic_ranking`: Gaussian features with the paper's knobs (label priors, correlation between
  the labels, deterministic or noisy labels) and the true ``η_k(x) = P(Y_k = 1 | x)``, so the Bayes-optimal
  scorers of :mod:`lit_cascades.functional.ranking` can be evaluated on every example. Synthetic by design.
* :func:`load_digits_ranking` (embedded, real): scikit-learn's 1,797 handwritten digits with several binary
  label definitions over the digit class ("the digit is even", "the digit is 0"...), optionally flipped at
  per-label rates to simulate annotators of different quality.
* :func:`load_table`: a CSV/TSV or Parquet file with several label columns (for users' data: Bank Marketing,
  MSLR-Web30K exports, HelpSteer attributes...). Feature columns must be numeric (or boolean); a column of
  strings is an error unless it is listed in ``drop`` (ignored) or in ``categorical`` (one-hot encoded).
  Graded labels are binarised with a threshold.

:class:`MultiLabelDataModule` splits a source into train/val/test, standardises the features with the
training statistics (a feature that is constant on the training split is only centred: its std is taken
as 1, so validation/test values stay on the scale of the raw differences) and serves dict batches ``{"x": [B, D], "labels": [B, K], "index": [B]}`` (plus
``"eta"`` ``[B, K]`` when known and ``"group"`` ``[B]`` when given). The subclasses
:class:`SyntheticRankingDataModule`, :class:`DigitsRankingDataModule` and :class:`TabularRankingDataModule`
only implement :meth:`MultiLabelDataModule.load_data`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_cascades.data.sampling import EpochSeededSampler, SplitLoaders, process_batch_size

DIGIT_LABELS: dict[str, list[int]] = {"even": [0, 2, 4, 6, 8], "zero": [0]}
"""Default label definitions of :func:`load_digits_ranking`: a balanced label and a skewed one (π ≈ 0.1)."""

CONSTANT_STD = 1e-6
"""A training feature with ``std <= CONSTANT_STD * (1 + |mean|)`` counts as constant: it is centred, not scaled."""

TRUE_STRINGS = {"1", "true", "yes", "y", "t", "pos", "positive"}
FALSE_STRINGS = {"0", "false", "no", "n", "f", "neg", "negative"}


@dataclass
class RankingData:
    """A dataset of instances with ``K`` binary labels.

    Attributes:
        features: ``[N, D]`` float32.
        labels: ``[N, K]`` float32 in {0, 1}.
        label_names: ``K`` names (used in log keys ``<split>/rank/auc_<name>``).
        eta: ``[N, K]`` true ``P(Y_k = 1 | x)`` when known (synthetic data), else ``None``.
        priors: ``[K]`` population priors ``π_k`` when known, else ``None`` (use :meth:`empirical_priors`).
        groups: ``[N]`` integer group ids (e.g. query ids) or ``None``.
        feature_names: ``D`` names.
        description: where the data came from (logged).
    """

    features: Tensor
    labels: Tensor
    label_names: list[str]
    eta: Tensor | None = None
    priors: Tensor | None = None
    groups: Tensor | None = None
    feature_names: list[str] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        n, k = self.labels.shape
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise ValueError(f"`features` must be [N, D] with N={n}; got {tuple(self.features.shape)}")
        if len(self.label_names) != k:
            raise ValueError(f"need one name per label column ({k}); got {self.label_names}")
        if len(set(self.label_names)) != k:
            raise ValueError(f"label names must be distinct; got {self.label_names}")
        if self.eta is not None and self.eta.shape != self.labels.shape:
            raise ValueError(f"`eta` must have the labels' shape {tuple(self.labels.shape)}; got {tuple(self.eta.shape)}")
        if not self.feature_names:
            self.feature_names = [f"x{i}" for i in range(self.features.shape[1])]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, index: Tensor) -> RankingData:
        """The examples at ``index`` (population ``priors`` are kept)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return replace(self, features=self.features[index], labels=self.labels[index], eta=pick(self.eta),
                       groups=pick(self.groups))

    def empirical_priors(self) -> Tensor:
        """``[K]`` fraction of positives per label."""
        return self.labels.double().mean(0)


# --------------------------------------------------------------------------------------------------------
# synthetic data with known η
# --------------------------------------------------------------------------------------------------------
def _logistic_intercept(prior: float, sharpness: float) -> float:
    """``b`` with ``E[σ(β Z + b)] = prior`` for ``Z ~ N(0, 1)`` (Gauss–Hermite quadrature + bisection)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()

    def mean_prob(b: float) -> float:
        return float((weights / (1.0 + np.exp(-(sharpness * nodes + b)))).sum())

    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_prob(mid) < prior else (lo, mid)
    return 0.5 * (lo + hi)


def _correlation_factor(correlation: float | Sequence[Sequence[float]], k: int) -> Tensor:
    """``W [K, K]`` with ``W Wᵀ = C``: equicorrelation ``ρ`` or a given correlation matrix."""
    if isinstance(correlation, int | float):
        lo = -1.0 / (k - 1) if k > 1 else -1.0
        if not lo <= float(correlation) <= 1.0:
            raise ValueError(f"correlation: expected a number in [{lo:.3g}, 1] for {k} labels; got {correlation}")
        corr = torch.full((k, k), float(correlation), dtype=torch.float64)
        corr.fill_diagonal_(1.0)
    else:
        corr = torch.as_tensor(correlation, dtype=torch.float64)
        if corr.shape != (k, k) or not torch.allclose(corr, corr.T) or not torch.allclose(corr.diagonal(), torch.ones(k, dtype=torch.float64)):
            raise ValueError(f"correlation: expected a number or a symmetric [{k}, {k}] matrix with unit diagonal")
    vals, vecs = torch.linalg.eigh(corr)
    if float(vals.min()) < -1e-9:
        raise ValueError(f"correlation: the matrix must be positive semi-definite; smallest eigenvalue "
                         f"{float(vals.min()):.3g}")
    return vecs * vals.clamp(min=0).sqrt()


def _check_synthetic(n: int, priors: Sequence[float], correlation: float | Sequence[Sequence[float]],
                     num_features: int, label_names: Sequence[str] | None) -> list[float]:
    """Validate the arguments of :func:`make_synthetic_ranking`; return the priors as floats."""
    if int(n) < 1:
        raise ValueError(f"n: expected a number of instances >= 1; got {n}")
    pri = [float(p) for p in priors]
    if not pri:
        raise ValueError("priors: expected at least one label prior in (0, 1); got []")
    bad = [p for p in pri if not 0.0 < p < 1.0]
    if bad:
        raise ValueError(f"priors: expected label priors in (0, 1); got {pri}")
    if num_features < len(pri):
        raise ValueError(f"num_features: expected >= the number of labels ({len(pri)}); got {num_features}")
    if label_names is not None and len(label_names) != len(pri):
        raise ValueError(f"label_names: expected one name per prior ({len(pri)}); got {list(label_names)}")
    _correlation_factor(correlation, len(pri))
    return pri


def make_synthetic_ranking(
    n: int = 4000,
    priors: Sequence[float] = (0.5, 0.5),
    correlation: float | Sequence[Sequence[float]] = 0.0,
    deterministic: bool = False,
    sharpness: float = 3.0,
    num_features: int = 8,
    label_names: Sequence[str] | None = None,
    seed: int = 0,
) -> RankingData:
    """Gaussian instances with ``K = len(priors)`` labels and known ``η`` (the paper's synthetic knobs).

    ``x ~ N(0, I_D)``. Label ``k`` depends on the latent score ``s_k = (W x_{:K})_k``, where ``W Wᵀ`` is the
    correlation matrix (``corr(s_j, s_k) = correlation``, each ``s_k ~ N(0, 1)``); the other ``D − K``
    features are noise.

    * ``deterministic=True``: ``Y_k = 1[s_k > Φ⁻¹(1 − π_k)]``, so ``η_k ∈ {0, 1}`` (the label-dictatorship
      setting of Prop. 6.1; with ``correlation=0`` the labels are independent).
    * otherwise ``η_k(x) = σ(sharpness · s_k + b_k)`` with ``b_k`` solved so that ``E[η_k] = π_k`` exactly,
      and the labels are drawn independently given ``x``.

    Args:
        n: number of instances.
        priors: ``[K]`` population label priors ``π_k`` in ``(0, 1)`` (the skew knob).
        correlation: correlation of the latent scores (a number for all pairs, or a ``[K, K]`` matrix).
        deterministic: deterministic labels (see above).
        sharpness: ``β`` of the noisy labels (larger = less label noise).
        num_features: ``D ≥ K``.
        label_names: default ``label0, label1, ...``.
        seed: random seed.

    Returns:
        :class:`RankingData` with ``eta`` and population ``priors``.
    """
    pri = _check_synthetic(n, priors, correlation, num_features, label_names)
    k = len(pri)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, num_features, generator=g, dtype=torch.float64)
    s = x[:, :k] @ _correlation_factor(correlation, k).T
    pi = torch.tensor(pri, dtype=torch.float64)
    if deterministic:
        eta = (s > torch.special.ndtri(1 - pi)).double()
        labels = eta.clone()
    else:
        b = torch.tensor([_logistic_intercept(p, sharpness) for p in pri], dtype=torch.float64)
        eta = torch.sigmoid(sharpness * s + b)
        labels = (torch.rand(n, k, generator=g, dtype=torch.float64) < eta).double()
    names = list(label_names) if label_names is not None else [f"label{i}" for i in range(k)]
    kind = "deterministic" if deterministic else f"noisy (sharpness {sharpness})"
    return RankingData(
        features=x.float(), labels=labels.float(), label_names=names, eta=eta.float(), priors=pi,
        description=f"synthetic Gaussian, {kind} labels, priors {pri}, correlation {correlation}",
    )


# --------------------------------------------------------------------------------------------------------
# embedded real data: scikit-learn digits with several label definitions
# --------------------------------------------------------------------------------------------------------
def _check_digit_labels(label_sets: Mapping[str, Sequence[int]] | None, label_noise: Mapping[str, float] | None
                        ) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Validate :func:`load_digits_ranking`'s label definitions and flip rates (``[0, 0.5)``)."""
    sets = {str(k): list(v) for k, v in (DIGIT_LABELS if label_sets is None else label_sets).items()}
    if not sets:
        raise ValueError("label_sets: expected {name: [digit classes]}; got an empty mapping")
    for name, classes in sets.items():
        bad = [c for c in classes if int(c) not in range(10)]
        if bad:
            raise ValueError(f"label_sets: label '{name}': digit classes must be in 0..9; got {bad}")
    noise = {str(k): float(v) for k, v in (label_noise or {}).items()}
    unknown = set(noise) - set(sets)
    if unknown:
        raise ValueError(f"label_noise: names unknown labels {sorted(unknown)}; labels are {list(sets)}")
    bad_rates = {k: v for k, v in noise.items() if not 0.0 <= v < 0.5}
    if bad_rates:
        raise ValueError(f"label_noise: expected flip probabilities in [0, 0.5); got {bad_rates}")
    return sets, noise


def load_digits_ranking(
    label_sets: Mapping[str, Sequence[int]] | None = None,
    label_noise: Mapping[str, float] | None = None,
    seed: int = 0,
) -> RankingData:
    """scikit-learn's handwritten digits (1,797 × 64 pixels) with several binary labels.

    Args:
        label_sets: ``{label name: digit classes that are positive}``; default :data:`DIGIT_LABELS`
            (``even``: π ≈ 0.49, ``zero``: π ≈ 0.10).
        label_noise: ``{label name: flip probability}`` to simulate annotators of different quality.
        seed: seed of the label flips.

    Returns:
        :class:`RankingData` with pixel features in ``[0, 1]``.
    """
    from sklearn.datasets import load_digits

    sets, noise = _check_digit_labels(label_sets, label_noise)
    digits = load_digits()
    target = torch.as_tensor(digits.target)
    cols = [torch.isin(target, torch.as_tensor([int(c) for c in classes])) for classes in sets.values()]
    labels = torch.stack(cols, 1).float()
    g = torch.Generator().manual_seed(seed)
    for j, name in enumerate(sets):
        rate = float(noise.get(name, 0.0))
        flip = torch.rand(labels.shape[0], generator=g) < rate
        labels[flip, j] = 1.0 - labels[flip, j]
    desc = "scikit-learn digits; labels " + ", ".join(f"{k}={list(v)}" for k, v in sets.items())
    return RankingData(
        features=torch.as_tensor(digits.data, dtype=torch.float32) / 16.0,
        labels=labels,
        label_names=list(sets),
        feature_names=[f"pixel{i}" for i in range(64)],
        description=desc + (f"; flip noise {noise}" if noise else ""),
    )


# --------------------------------------------------------------------------------------------------------
# user tables: CSV / Parquet
# --------------------------------------------------------------------------------------------------------
def read_table(path: str | Path, sep: str | None = None) -> Any:
    """Read a CSV/TSV (``sep`` sniffed when ``None``) or Parquet file into a pandas DataFrame."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    suffix = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".tsv", ".txt") or suffix.endswith((".csv.gz", ".tsv.gz")):
        if sep is None and path.suffix.lower() == ".tsv":
            sep = "\t"
        return pd.read_csv(path, sep=sep, engine="python" if sep is None else "c")
    raise ValueError(f"path: unsupported file type {path.suffix!r} for {path}; expected .csv, .tsv, .txt or .parquet")


def binarize_label(values: Any, name: str, threshold: float | None = None) -> Tensor:
    """Turn a label column into 0/1: numeric 0/1, booleans, yes/no-like strings, or ``value >= threshold``.

    Raises ``ValueError`` naming the column and the values found when the column is not binary (and no
    threshold is given) or has missing values.
    """
    import pandas as pd

    col = pd.Series(values)
    if col.isna().any():
        raise ValueError(f"labels: label column '{name}' has {int(col.isna().sum())} missing values")
    if threshold is not None:
        if not pd.api.types.is_numeric_dtype(col):
            raise ValueError(f"label_thresholds: label column '{name}': a threshold needs numeric values; "
                             f"got dtype {col.dtype}")
        return torch.as_tensor((col.to_numpy(dtype=float) >= float(threshold)).astype(np.float32))
    if pd.api.types.is_bool_dtype(col):
        return torch.tensor(col.to_numpy(dtype=np.float32))
    if pd.api.types.is_numeric_dtype(col):
        arr = col.to_numpy(dtype=float)
        if np.isin(arr, (0.0, 1.0)).all():
            return torch.as_tensor(arr.astype(np.float32))
    else:
        low = col.astype(str).str.strip().str.lower()
        if low.isin(TRUE_STRINGS | FALSE_STRINGS).all():
            return torch.tensor(low.isin(TRUE_STRINGS).to_numpy(dtype=np.float32))
    found = sorted(map(str, col.unique()[:8]))
    raise ValueError(
        f"labels: label column '{name}' must be binary (0/1, true/false, yes/no); found values {found}"
        f"{' ...' if col.nunique() > 8 else ''}. Give a threshold (label_thresholds: {{{name}: <t>}}) to "
        "binarise a graded label as value >= t."
    )


def _examples(values: Any, k: int = 3) -> str:
    """A few distinct values of a column, quoted, for error messages."""
    uniq = list(dict.fromkeys(str(v) for v in values if v == v))  # v == v drops NaN
    shown = ", ".join(repr(v) for v in uniq[:k])
    return f"({shown}{', ...' if len(uniq) > k else ''})"


def load_table(
    path: str | Path,
    labels: Sequence[str],
    features: Sequence[str] | None = None,
    group: str | None = None,
    label_thresholds: Mapping[str, float] | None = None,
    sep: str | None = None,
    drop: Sequence[str] = (),
    categorical: Sequence[str] = (),
) -> RankingData:
    """A :class:`RankingData` from a CSV/Parquet file with several label columns.

    Args:
        path: ``.csv``/``.tsv``/``.txt`` (separator sniffed unless ``sep``) or ``.parquet``.
        labels: the label columns (at least one).
        features: feature columns (default: every other column except ``group`` and ``drop``). They must be
            numeric or boolean, with finite values; a column holding strings is an error naming it, unless
            it is listed in ``drop`` or ``categorical``.
        group: optional column of group ids (e.g. a query id); pairs are then formed within groups.
        label_thresholds: ``{label: t}`` binarises a graded label as ``value >= t``.
        sep: column separator for text files.
        drop: columns to ignore.
        categorical: feature columns to one-hot encode (one feature per distinct value).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: starting with the argument at fault (``labels``, ``features``, ``group``, ``drop``,
            ``categorical``, ``label_thresholds``): unknown columns (listing the available ones), a string
            feature column (with example values), missing or non-finite feature values, non-binary labels.
    """
    import pandas as pd

    df = read_table(path, sep)
    labels = list(labels)
    if not labels:
        raise ValueError("labels: expected at least one label column; got []")
    available = [str(c) for c in df.columns]
    named = {"labels": labels, "features": list(features or []), "group": [group] if group else [],
             "drop": list(drop), "categorical": list(categorical)}
    for arg, cols in named.items():
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{arg}: column(s) {missing} not found in {path}; available columns: {available}")
    thresholds = dict(label_thresholds or {})
    unknown = set(thresholds) - set(labels)
    if unknown:
        raise ValueError(f"label_thresholds: names {sorted(unknown)}, which are not label columns {labels}")
    y = torch.stack([binarize_label(df[c], c, thresholds.get(c)) for c in labels], 1)
    used = set(labels) | set(drop) | ({group} if group else set())
    feat_cols = list(features) if features else [c for c in df.columns if c not in used]
    feat_cols = [c for c in feat_cols if c not in set(drop)]
    if not feat_cols:
        raise ValueError(f"features: no feature columns left in {path} (labels {labels}, group {group}, "
                         f"drop {list(drop)}); available columns: {available}")
    not_features = [c for c in categorical if c not in feat_cols]
    if not_features:
        raise ValueError(f"categorical: {not_features} are not feature columns; feature columns: {feat_cols}")
    strings = [c for c in feat_cols if c not in set(categorical) and not pd.api.types.is_numeric_dtype(df[c])
               and not pd.api.types.is_bool_dtype(df[c])]
    if strings:
        detail = "; ".join(f"column '{c}' holds strings {_examples(df[c])}" for c in strings[:5])
        raise ValueError(f"features: {detail}{' ...' if len(strings) > 5 else ''}; expected numbers. List "
                         f"{'it' if len(strings) == 1 else 'them'} in drop=[...] to ignore, in categorical=[...] "
                         "to one-hot encode, or encode it yourself")
    frame = df[feat_cols]
    nan_cols = [str(c) for c in feat_cols if frame[c].isna().any()]
    if nan_cols:
        raise ValueError(f"features: column(s) {nan_cols} have missing values; fill them or list them in drop=[...]")
    frame = pd.get_dummies(frame, columns=list(categorical), dtype=np.float32).astype(np.float32)
    values = frame.to_numpy(dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        bad = [f"'{frame.columns[j]}' ({int((~finite[:, j]).sum())} values)" for j in np.flatnonzero(~finite.all(0))]
        raise ValueError(f"features: column(s) {', '.join(bad)} hold non-finite values (inf, or too large for "
                         "float32); expected finite numbers")
    groups = None
    if group:
        groups = torch.as_tensor(pd.factorize(df[group])[0], dtype=torch.long)
    return RankingData(
        features=torch.tensor(values),
        labels=y,
        label_names=labels,
        groups=groups,
        feature_names=[str(c) for c in frame.columns],
        description=f"table {Path(path).name} ({len(df)} rows); labels {labels}",
    )


# --------------------------------------------------------------------------------------------------------
# datamodules
# --------------------------------------------------------------------------------------------------------
class RankingDataset(Dataset):
    """Dict items ``{"x", "labels", "index"}`` (+ ``"eta"``, ``"group"``) over a :class:`RankingData`."""

    def __init__(self, data: RankingData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        d = self.data
        item = {"x": d.features[i], "labels": d.labels[i], "index": torch.tensor(i)}
        if d.eta is not None:
            item["eta"] = d.eta[i]
        if d.groups is not None:
            item["group"] = d.groups[i]
        return item


class GroupBatchSampler(Sampler[list[int]]):
    """Batches of whole groups (e.g. all documents of a query), in an order that depends on ``(seed, epoch)``.

    Groups are shuffled every epoch and packed into batches of at least ``batch_size`` examples (a group
    larger than ``batch_size`` is a batch of its own). Single-process: under DDP Lightning cannot shard a
    custom batch sampler, so split grouped data across processes yourself.
    """

    def __init__(self, groups: Tensor, batch_size: int, seed: int = 0) -> None:
        self.members = [torch.nonzero(groups == g).flatten().tolist() for g in torch.unique(groups)]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches, current = [], []
        for i in torch.randperm(len(self.members), generator=g).tolist():
            current += self.members[i]
            if len(current) >= self.batch_size:
                batches.append(current)
                current = []
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class MultiLabelDataModule(SplitLoaders, pl.LightningDataModule):
    """Train/val/test splits of a multi-label ranking dataset; subclasses implement :meth:`load_data`.

    Training batches are reshuffled every epoch from ``(split_seed, epoch)`` (so a resumed run sees the same
    batches); with groups, every batch holds whole groups (:class:`GroupBatchSampler`).

    Args:
        batch_size: training batch size (pairs are formed within a batch).
        eval_batch_size: validation/test batch size (metrics are epoch-level, so this only sets memory).
        val_fraction, test_fraction: split sizes, each in ``(0, 1)`` with a sum below 1 (random split with
            ``split_seed``; groups are kept whole when the data has groups).
        standardize: z-score the features with the training split's mean and std. A feature constant on
            the training split (std <= :data:`CONSTANT_STD` ``* (1 + |mean|)``) is centred with std 1 instead
            of being divided by ~0, so its validation/test values stay bounded.
        split_seed: seed of the split.
        num_workers: DataLoader workers.
        data: a ready :class:`RankingData` (for :class:`MultiLabelDataModule` itself; subclasses load theirs).
    """

    def __init__(
        self,
        batch_size: int = 256,
        eval_batch_size: int = 4096,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        standardize: bool = True,
        split_seed: int = 0,
        num_workers: int = 0,
        data: RankingData | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < float(value) < 1.0:
                raise ValueError(f"{name}: expected a fraction in (0, 1); got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction: val_fraction + test_fraction must be < 1 (the rest is the training "
                             f"split); got {val_fraction} + {test_fraction}")
        if batch_size < 2:
            raise ValueError(f"batch_size: expected >= 2 (pairs are formed within a batch); got {batch_size}")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: expected >= 1; got {eval_batch_size}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.standardize, self.split_seed, self.num_workers = standardize, split_seed, num_workers
        self._data = data
        self.splits: dict[str, RankingData] = {}

    def load_data(self) -> RankingData:
        """Return the whole dataset (override in subclasses)."""
        if self._data is None:
            raise NotImplementedError("pass `data=` or subclass MultiLabelDataModule and implement load_data()")
        return self._data

    # -- splits -------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data = self.load_data()
        g = torch.Generator().manual_seed(self.split_seed)
        if data.groups is not None:  # split whole groups
            uniq = torch.unique(data.groups)
            perm_groups = uniq[torch.randperm(uniq.shape[0], generator=g)]
            n_val, n_test = _split_sizes(uniq.shape[0], self.val_fraction, self.test_fraction)
            parts = {"val": perm_groups[:n_val], "test": perm_groups[n_val : n_val + n_test],
                     "train": perm_groups[n_val + n_test :]}
            index = {k: torch.nonzero(torch.isin(data.groups, v)).flatten() for k, v in parts.items()}
        else:
            perm = torch.randperm(len(data), generator=g)
            n_val, n_test = _split_sizes(len(data), self.val_fraction, self.test_fraction)
            index = {"val": perm[:n_val], "test": perm[n_val : n_val + n_test], "train": perm[n_val + n_test :]}
        splits = {k: data.subset(v) for k, v in index.items()}
        for name, split in splits.items():
            if len(split) == 0:
                arg = "test_fraction" if name == "test" else "val_fraction"
                raise ValueError(f"{arg}: the {name} split is empty ({len(data)} examples, val_fraction "
                                 f"{self.val_fraction}, test_fraction {self.test_fraction}); adjust the fractions")
        if self.standardize:
            mean, std = standardization(splits["train"].features)
            splits = {k: replace(v, features=(v.features - mean) / std) for k, v in splits.items()}
        positives = splits["train"].labels.sum(0)
        single = [f"{n} ({int(p)} of {len(splits['train'])} positive)" for n, p in zip(data.label_names, positives)
                  if p == 0 or p == len(splits["train"])]
        if single:
            raise ValueError(f"labels with a single class in the training split cannot be ranked: {single}")
        self.splits = splits

    @property
    def label_names(self) -> list[str]:
        self.setup()
        return self.splits["train"].label_names

    @property
    def num_features(self) -> int:
        self.setup()
        return self.splits["train"].features.shape[1]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def priors(self) -> Tensor:
        """``[K]`` label priors: the population priors when known, else the training split's."""
        self.setup()
        train = self.splits["train"]
        return train.priors if train.priors is not None else train.empirical_priors()

    # -- loaders ------------------------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        data = self.splits[split]
        if shuffle and data.groups is not None:  # whole groups per batch, so that pairs exist within groups
            return DataLoader(RankingDataset(data), num_workers=self.num_workers,
                              batch_sampler=GroupBatchSampler(data.groups, self.batch_size, self.split_seed))
        return DataLoader(
            RankingDataset(data),
            batch_size=process_batch_size(self.batch_size, self.trainer) if shuffle else self.eval_batch_size,
            sampler=EpochSeededSampler(len(data), self.split_seed) if shuffle else None,
            drop_last=shuffle and len(data) > self.batch_size,
            num_workers=self.num_workers,
        )


def standardization(train: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean [D], std [D])`` of the training features; constant features get std 1 (centred, not scaled).

    A feature counts as constant when its std is at most ``CONSTANT_STD * (1 + |mean|)``: dividing by such a
    std would blow up the (different) values of that feature on validation/test data.
    """
    mean = train.mean(0)
    std = train.std(0) if train.shape[0] > 1 else torch.zeros_like(mean)
    constant = ~(std > CONSTANT_STD * (1 + mean.abs()))  # also catches NaN std
    return mean, torch.where(constant, torch.ones_like(std), std)


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    return math.floor(n * val_fraction), math.floor(n * test_fraction)


class SyntheticRankingDataModule(MultiLabelDataModule):
    """:func:`make_synthetic_ranking` data (keyword arguments ``n`` ... ``seed``) in a datamodule."""

    def __init__(
        self,
        n: int = 4000,
        priors: Sequence[float] = (0.5, 0.5),
        correlation: float = 0.0,
        deterministic: bool = False,
        sharpness: float = 3.0,
        num_features: int = 8,
        label_names: Sequence[str] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_synthetic(n, priors, correlation, num_features, label_names)
        self.generator_kwargs = dict(n=n, priors=list(priors), correlation=correlation, deterministic=deterministic,
                                     sharpness=sharpness, num_features=num_features,
                                     label_names=list(label_names) if label_names else None, seed=seed)

    def load_data(self) -> RankingData:
        return make_synthetic_ranking(**self.generator_kwargs)


class DigitsRankingDataModule(MultiLabelDataModule):
    """:func:`load_digits_ranking` (embedded, offline) in a datamodule."""

    def __init__(
        self,
        label_sets: Mapping[str, Sequence[int]] | None = None,
        label_noise: Mapping[str, float] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_digit_labels(label_sets, label_noise)
        self.label_sets = {k: list(v) for k, v in label_sets.items()} if label_sets else None
        self.label_noise = dict(label_noise) if label_noise else None
        self.seed = seed

    def load_data(self) -> RankingData:
        return load_digits_ranking(self.label_sets, self.label_noise, self.seed)


class TabularRankingDataModule(MultiLabelDataModule):
    """A CSV/Parquet file with several label columns (see :func:`load_table` for the arguments and the checks;
    the file is read in :meth:`setup`)."""

    def __init__(
        self,
        path: str | Path,
        labels: Sequence[str],
        features: Sequence[str] | None = None,
        group: str | None = None,
        label_thresholds: Mapping[str, float] | None = None,
        sep: str | None = None,
        drop: Sequence[str] = (),
        categorical: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(labels, str) or not list(labels):
            raise ValueError(f"labels: expected a non-empty list of label columns; got {labels!r}")
        for name, cols in (("features", features), ("drop", drop), ("categorical", categorical)):
            if isinstance(cols, str):
                raise ValueError(f"{name}: expected a list of column names; got the string {cols!r}")
        self.table_kwargs = dict(path=path, labels=list(labels), features=list(features) if features else None,
                                 group=group, label_thresholds=dict(label_thresholds or {}), sep=sep,
                                 drop=list(drop), categorical=list(categorical))

    def load_data(self) -> RankingData:
        return load_table(**self.table_kwargs)
