"""Epoch-level deferral metrics as a torchmetrics ``Metric`` (DDP-synced by concatenation)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_cascades.functional._checks import check_choice, check_range
from lit_cascades.functional.deferral import IDEAL_VARIANTS, DeferralReport, IdealVariant, deferral_metrics


class DeferralMetrics(Metric):
    """Accumulate ``(score, small_quality, large_quality)`` over an epoch, then compute every deferral metric.

    States are concatenated across batches and, under DDP, gathered from all processes before
    :func:`~lit_cascades.functional.deferral.deferral_metrics` runs, so the values equal a single-process
    computation over the whole split (rank-based metrics are never averaged per batch). Pass example
    ``ids`` to :meth:`update` and duplicates are dropped before computing: a ``DistributedSampler`` pads the
    last batch with repeated examples so that every process gets the same number.

    Args:
        ideal: reference curve for ``s_d`` (``"oracle"``, ``"linear"`` or ``"capped"``).
        rate: deferral rate for ``quality_at_rate``.
        correct_threshold: ``small_quality >= correct_threshold`` counts as correct (AUROC, ``s_o``).

    Example:
        >>> m = DeferralMetrics()
        >>> m.update(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1., 0., 1.]), torch.tensor([1., 1., 1.]))
        >>> round(m.compute().scalars["auroc"], 3)
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    scores: list[Tensor]
    small_quality: list[Tensor]
    large_quality: list[Tensor]

    def __init__(
        self, ideal: IdealVariant = "oracle", rate: float = 0.2, correct_threshold: float = 0.5, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        check_choice("ideal", ideal, IDEAL_VARIANTS)
        check_range("rate", rate, 0.0, 1.0)
        self.ideal, self.rate, self.correct_threshold = ideal, rate, correct_threshold
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("small_quality", default=[], dist_reduce_fx="cat")
        self.add_state("large_quality", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, small_quality: Tensor, large_quality: Tensor, ids: Tensor | None = None
               ) -> None:
        """Add a batch: three ``[B]`` tensors (scores: higher = keep the small model's answer) and optional
        integer example ids ``[B]`` (give them for every batch or for none)."""
        shapes = {tuple(t.shape) for t in (scores, small_quality, large_quality)}
        if len(shapes) != 1 or scores.ndim != 1:
            raise ValueError(
                "`scores`, `small_quality` and `large_quality` must be 1-D of equal length [B]; got shapes "
                f"{tuple(scores.shape)}, {tuple(small_quality.shape)}, {tuple(large_quality.shape)}"
            )
        if (ids is None) != (not self.ids) and self.scores:
            raise ValueError("`ids` must be given for every update or for none")
        if ids is not None:
            if tuple(ids.shape) != tuple(scores.shape):
                raise ValueError(f"`ids` must have shape {tuple(scores.shape)}; got {tuple(ids.shape)}")
            self.ids.append(ids.detach().long())
        self.scores.append(scores.detach().double())
        self.small_quality.append(small_quality.detach().double())
        self.large_quality.append(large_quality.detach().double())

    def compute(self) -> DeferralReport:
        """Deferral report over everything seen since the last reset (all processes)."""
        if _is_empty(self.scores):
            raise ValueError("DeferralMetrics.compute() called before any update()")
        scores, small, large = (dim_zero_cat(x) for x in (self.scores, self.small_quality, self.large_quality))
        if not _is_empty(self.ids):
            keep = first_occurrences(dim_zero_cat(self.ids))
            scores, small, large = scores[keep], small[keep], large[keep]
        return deferral_metrics(
            scores,
            small,
            large,
            ideal=self.ideal,
            rate=self.rate,
            correct_threshold=self.correct_threshold,
        )

    def plot(self, val: DeferralReport | None = None, ax: Any = None) -> Any:  # type: ignore[override]
        """Plot the deferral curve with its references; returns ``(figure, axes)``."""
        from lit_cascades.plotting import plot_deferral_curves

        return plot_deferral_curves({"score": val if val is not None else self.compute()}, ax=ax)


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    """A ``cat`` state is a list before DDP sync and a tensor after it."""
    return len(state) == 0 if isinstance(state, list) else state.numel() == 0


def first_occurrences(ids: Tensor) -> Tensor:
    """Positions ``[U]`` of the first occurrence of each distinct id in ``ids [N]``, in id order."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((uniq.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    return first.scatter_reduce(0, inverse, pos, reduce="amin")


__all__ = ["DeferralMetrics", "first_occurrences"]
