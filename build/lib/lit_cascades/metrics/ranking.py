"""Per-label, mean and worst-label AUROC of one ranking score as a torchmetrics ``Metric`` (epoch-level).

The per-label AUROC uses the library's one AUROC convention (:func:`~lit_cascades.functional.binary_auroc`:
Mann–Whitney, ties ½, equal to scikit-learn's and to ``torchmetrics.classification.MultilabelAUROC`` applied to
the score repeated for every label). States are concatenated across batches and gathered from all processes
before the AUROCs are computed, so the values equal a single-process computation over the whole split.
When batches carry example ids (``ids=``), examples seen twice are counted once: this undoes the
padding of ``DistributedSampler`` (which repeats examples to even out the ranks), so 1 and 2 processes
give identical values.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_cascades.functional.auroc import binary_auroc, check_binary, multipartite_auroc
from lit_cascades.functional.ranking import aggregate_labels
from lit_cascades.metrics.deferral import _is_empty, first_occurrences


@dataclass
class RankingAUCReport:
    """Result of :class:`MultiLabelAUROC`: ``per_label`` AUROCs by label name and the summary scalars.

    ``scalars`` holds ``auc_<label>`` for every label, ``auc_mean``, ``auc_min`` (worst label), ``auc_diff``
    (max − min, the paper's "Diff AUC" for two labels), the multipartite AUROC of the summed label with the
    uniform cost (``auc_laa_uniform``) and with the difference cost (``auc_laa_difference``), the label priors
    ``prior_<label>`` and ``num_examples``. Labels with a single class have a NaN AUROC and are left out of
    the mean/min/diff (with a warning).
    """

    per_label: dict[str, float]
    scalars: dict[str, float] = field(default_factory=dict)


def ranking_auc_report(scores: Tensor, labels: Tensor, label_names: Sequence[str]) -> RankingAUCReport:
    """All ranking AUROCs of ``scores`` ``[N]`` for binary ``labels`` ``[N, K]`` named ``label_names``."""
    if labels.ndim != 2 or labels.shape[1] != len(label_names):
        raise ValueError(f"`labels` must be [N, K] with K={len(label_names)} ({list(label_names)}); "
                         f"got shape {tuple(labels.shape)}")
    auc = binary_auroc(scores, labels)
    per_label = {name: float(a) for name, a in zip(label_names, auc)}
    undefined = [n for n, a in per_label.items() if a != a]
    if undefined:
        warnings.warn(
            f"AUROC undefined (NaN) for labels {undefined}: each has a single class among the "
            f"{labels.shape[0]} examples; they are left out of auc_mean/auc_min/auc_diff",
            RuntimeWarning,
            stacklevel=2,
        )
    defined = auc[~torch.isnan(auc)]
    nan = float("nan")
    scalars = {f"auc_{n}": a for n, a in per_label.items()}
    scalars["auc_mean"] = float(defined.mean()) if defined.numel() else nan
    scalars["auc_min"] = float(defined.min()) if defined.numel() else nan
    scalars["auc_diff"] = float(defined.max() - defined.min()) if defined.numel() else nan
    levels = aggregate_labels(labels)
    scalars["auc_laa_uniform"] = float(multipartite_auroc(scores, levels, "uniform"))
    scalars["auc_laa_difference"] = float(multipartite_auroc(scores, levels, "difference"))
    for n, p in zip(label_names, labels.double().mean(0).tolist()):
        scalars[f"prior_{n}"] = p
    scalars["num_examples"] = float(labels.shape[0])
    return RankingAUCReport(per_label=per_label, scalars=scalars)


class MultiLabelAUROC(Metric):
    """Accumulate ``(score, labels)`` over an epoch; compute per-label, mean and worst-label AUROC.

    Args:
        label_names: the ``K`` label names (keys of ``per_label`` and ``auc_<name>``).

    Example:
        >>> m = MultiLabelAUROC(["helpful", "correct"])
        >>> m.update(torch.tensor([0.9, 0.1, 0.5, 0.7]), torch.tensor([[1, 1], [0, 0], [1, 0], [0, 1]]))
        >>> m.compute().scalars["auc_min"]
        0.75
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    scores: list[Tensor]
    labels: list[Tensor]
    ids: list[Tensor]

    def __init__(self, label_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not label_names:
            raise ValueError("`label_names` is empty; expected one name per label column")
        self.label_names = [str(n) for n in label_names]
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor, ids: Tensor | None = None) -> None:
        """Add a batch: ``scores [B]``, binary ``labels [B, K]`` and optional integer example ``ids [B]``
        (give them for every batch or for none)."""
        k = len(self.label_names)
        if scores.ndim != 1 or labels.shape != (scores.shape[0], k):
            raise ValueError(f"expected scores [B] and labels [B, {k}] for labels {self.label_names}; got shapes "
                             f"{tuple(scores.shape)} and {tuple(labels.shape)}")
        if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
            raise ValueError(f"`scores` must be finite; got {int((~torch.isfinite(scores)).sum())} NaN/inf values")
        check_binary("labels", labels)
        if not _is_empty(self.scores) and (ids is None) != _is_empty(self.ids):
            raise ValueError("`ids` must be given for every update or for none")
        if ids is not None:
            if ids.shape != scores.shape:
                raise ValueError(f"`ids` must have shape {tuple(scores.shape)}; got {tuple(ids.shape)}")
            self.ids.append(ids.detach().long())
        self.scores.append(scores.detach().double())
        self.labels.append(labels.detach().to(torch.uint8))

    def compute(self) -> RankingAUCReport:
        """The report over everything seen since the last reset (all processes)."""
        if _is_empty(self.scores):
            raise ValueError("MultiLabelAUROC.compute() called before any update()")
        scores, labels = dim_zero_cat(self.scores), dim_zero_cat(self.labels)
        if not _is_empty(self.ids):
            keep = first_occurrences(dim_zero_cat(self.ids))
            scores, labels = scores[keep], labels[keep]
        return ranking_auc_report(scores, labels, self.label_names)

    def plot(self, val: RankingAUCReport | None = None, ax: Any = None) -> Any:  # type: ignore[override]
        """Bar chart of the per-label AUROCs; returns ``(figure, axes)``."""
        from lit_cascades.plotting import new_axes

        rep = val if val is not None else self.compute()
        fig, ax = new_axes(ax)
        names = list(rep.per_label)
        ax.bar(names, [rep.per_label[n] for n in names], color="tab:blue")
        ax.axhline(0.5, color="tab:gray", ls=":", lw=1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("AUROC")
        ax.set_title(f"worst label {rep.scalars['auc_min']:.3f}, mean {rep.scalars['auc_mean']:.3f}")
        fig.tight_layout()
        return fig, ax


__all__ = ["MultiLabelAUROC", "RankingAUCReport", "ranking_auc_report"]
