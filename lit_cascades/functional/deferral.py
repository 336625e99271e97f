"""Deferral curves and the scalar deferral metrics every cascade in lit_cascades reports.

A two-model cascade answers with the small model unless its *deferral score* (a confidence: higher means
"keep") is low, in which case it defers to the large model. Given per-example

* ``scores``         ``[N]`` the small model's confidence (any real number, higher = more confident),
* ``small_quality``  ``[N]`` the quality of the small model's answer (0/1 correctness or a real score),
* ``large_quality``  ``[N]`` the quality of the large model's answer,

deferring the ``k`` lowest-scored examples gives cascade quality
``Q(k/N) = (Σ_{deferred} large_quality + Σ_{kept} small_quality) / N``. Sweeping ``k`` from 0 to ``N``
traces the *deferral curve* (Gatekeeper §4 / App. B; Gupta et al. 2024 §2, "AUC-DF").

Conventions (shared by all modules, metrics and callbacks):

* Defer iff ``score < τ``. The curve is evaluated at every rate ``k/N``, ``k = 0..N``.
* **Ties** are resolved by expectation: when examples share a score, no threshold can separate them, so
  inside a tie group the curve is the linear interpolation between the group's boundaries, i.e. the
  expected quality under a uniformly random order of the tied examples. At group boundaries the curve
  equals the threshold rule exactly. This is deterministic and matches how ROC AUC treats ties.
* Areas are trapezoidal integrals over the rate grid ``k/N`` (exact for these piecewise-linear curves).
* Everything is computed from one ``O(N log N)`` sort; the rest is vectorised ``O(N)``.

Functions here are plain torch and never import Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_cascades.functional._checks import (
    check_choice,
    check_finite,
    check_nonempty,
    check_range,
    check_same_length,
)

IdealVariant = Literal["oracle", "linear", "capped"]
IDEAL_VARIANTS: tuple[str, ...] = ("oracle", "linear", "capped")


class DeferralCurve(NamedTuple):
    """A deferral curve: ``quality[k]`` is the cascade quality at deferral rate ``rates[k] = k/N``."""

    rates: Tensor
    quality: Tensor


class _SortedScores(NamedTuple):
    order: Tensor  # [N] argsort of the scores, ascending (least confident first)
    sorted_scores: Tensor  # [N]
    group_starts: Tensor  # [G + 1] sorted positions where a new tie group starts, plus N


def _validate(scores: Tensor, small_quality: Tensor, large_quality: Tensor | None = None) -> None:
    tensors = {"scores": scores, "small_quality": small_quality}
    if large_quality is not None:
        tensors["large_quality"] = large_quality
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor; got {type(t).__name__}")
    check_same_length(**tensors)
    for name, t in tensors.items():
        check_nonempty(name, t)
        check_finite(name, t.float())


def _sort_scores(scores: Tensor) -> _SortedScores:
    sorted_scores, order = torch.sort(scores.double(), stable=True)
    n = sorted_scores.shape[0]
    change = torch.ones(n, dtype=torch.bool, device=scores.device)
    change[1:] = sorted_scores[1:] != sorted_scores[:-1]
    starts = torch.nonzero(change).squeeze(-1)
    group_starts = torch.cat([starts, torch.tensor([n], device=scores.device)])
    return _SortedScores(order, sorted_scores, group_starts)


def _interpolate_ties(cum: Tensor, group_starts: Tensor) -> Tensor:
    """Replace ``cum[k]`` inside each tie group by the interpolation between the group's boundaries."""
    n = cum.shape[0] - 1
    k = torch.arange(n + 1, device=cum.device)
    hi_idx = torch.searchsorted(group_starts, k, right=False)  # first boundary >= k
    lo_idx = torch.searchsorted(group_starts, k, right=True) - 1  # last boundary <= k
    lo = group_starts[lo_idx.clamp(min=0)]
    hi = group_starts[hi_idx.clamp(max=group_starts.shape[0] - 1)]
    width = (hi - lo).clamp(min=1).to(cum.dtype)
    frac = (k - lo).to(cum.dtype) / width
    return cum[lo] + frac * (cum[hi] - cum[lo])


def _curve_from_sorted(srt: _SortedScores, small_quality: Tensor, large_quality: Tensor) -> DeferralCurve:
    n = small_quality.shape[0]
    gain = (large_quality.double() - small_quality.double())[srt.order]
    cum = F.pad(torch.cumsum(gain, 0), (1, 0))
    cum = _interpolate_ties(cum, srt.group_starts)
    quality = (small_quality.double().sum() + cum) / n
    rates = torch.arange(n + 1, dtype=torch.float64, device=small_quality.device) / n
    return DeferralCurve(rates, quality)


def deferral_curve(scores: Tensor, small_quality: Tensor, large_quality: Tensor) -> DeferralCurve:
    """Cascade quality at every deferral rate ``k/N`` when the lowest-scored examples are deferred.

    Args:
        scores: ``[N]`` deferral scores (higher = keep the small model's answer).
        small_quality: ``[N]`` per-example quality of the small model (0/1 or real-valued).
        large_quality: ``[N]`` per-example quality of the large model.

    Returns:
        :class:`DeferralCurve` with ``rates`` and ``quality`` of shape ``[N + 1]`` (float64). Ties in
        ``scores`` are averaged (see module docstring).
    """
    _validate(scores, small_quality, large_quality)
    return _curve_from_sorted(_sort_scores(scores), small_quality, large_quality)


def random_deferral_curve(rates: Tensor, small_quality: Tensor, large_quality: Tensor) -> Tensor:
    """Expected quality of deferring a random ``r`` fraction: ``Q_S + r (Q_L − Q_S)``.

    Args:
        rates: ``[K]`` deferral rates in ``[0, 1]``.
        small_quality, large_quality: ``[N]`` per-example qualities.

    Returns:
        ``[K]`` float64 qualities.
    """
    qs, ql = small_quality.double().mean(), large_quality.double().mean()
    return qs + rates.double() * (ql - qs)


def ideal_deferral_curve(
    rates: Tensor, small_quality: Tensor, large_quality: Tensor, variant: IdealVariant = "oracle"
) -> Tensor:
    """The best deferral curve, the reference for ``s_d``.

    The Gatekeeper paper's exact definition (App. B.3, eq. 11) could not be verified; three readings:

    * ``"oracle"`` (default): defer in order of the per-example gain ``large_quality − small_quality``
      (largest first). This is the upper envelope of every deferral curve achievable with these two
      sets of predictions, is defined for real-valued qualities, and for 0/1 correctness equals
      ``"capped"`` whenever the large model is right on every example the small model gets right.
      ``rates`` must be the grid ``k/N`` for this variant.
    * ``"linear"`` (third-party variant A): ``Q_S + (Q_L − Q_S)/(1 − Q_S) · r`` for ``r ≤ 1 − Q_S``, then
      ``Q_L`` (the small model's errors are deferred first, in random order w.r.t. the large model).
    * ``"capped"`` (third-party variant B): ``min(Q_S + r, Q_L)`` (each deferral fixes one error).

    Args:
        rates: ``[K]`` deferral rates (``[N + 1]`` grid ``k/N`` for ``"oracle"``).
        small_quality, large_quality: ``[N]`` per-example qualities (``"linear"``/``"capped"`` assume a
            maximum quality of 1).
        variant: which definition to use.

    Returns:
        ``[K]`` float64 qualities.
    """
    check_choice("variant", variant, IDEAL_VARIANTS)
    qs, ql = small_quality.double().mean(), large_quality.double().mean()
    rates = rates.double()
    if variant == "oracle":
        n = small_quality.shape[0]
        if rates.shape[0] != n + 1:
            raise ValueError(f"`rates` must be the [N + 1] grid k/N for variant='oracle'; got {rates.shape[0]} "
                             f"rates for N={n}")
        gain = torch.sort(large_quality.double() - small_quality.double(), descending=True).values
        return qs + F.pad(torch.cumsum(gain, 0), (1, 0)) / n
    if variant == "linear":
        err = 1.0 - qs
        if float(err) <= 0.0:
            return torch.full_like(rates, float(ql))
        return torch.where(rates <= err, qs + (ql - qs) / err * rates, ql)
    return torch.minimum(qs + rates, ql)


def _trapz(y: Tensor, x: Tensor) -> Tensor:
    return torch.trapezoid(y, x)


def area_under_deferral_curve(curve: DeferralCurve) -> Tensor:
    """AUC-DF: the trapezoidal area under a deferral curve over rates ``[0, 1]`` (a float64 scalar)."""
    return _trapz(curve.quality, curve.rates)


def deferral_performance(
    curve: DeferralCurve, small_quality: Tensor, large_quality: Tensor, ideal: IdealVariant = "oracle"
) -> Tensor:
    """Gatekeeper's deferral performance ``s_d``.

    ``s_d = ∫(Q_real − Q_rand) dr / ∫(Q_ideal − Q_rand) dr``: 1 for an ideal score, about 0 for a random
    one, negative when worse than random. Not clipped. NaN when the ideal curve equals the random line
    (nothing to gain by deferring well, e.g. both models are always right).
    """
    rand = random_deferral_curve(curve.rates, small_quality, large_quality)
    best = ideal_deferral_curve(curve.rates, small_quality, large_quality, ideal)
    num = _trapz(curve.quality - rand, curve.rates)
    den = _trapz(best - rand, curve.rates)
    if float(den.abs()) < 1e-12:
        return torch.tensor(float("nan"), dtype=torch.float64, device=curve.rates.device)
    return num / den


def quality_at_rate(curve: DeferralCurve, rate: float) -> Tensor:
    """Cascade quality at deferral rate ``rate ∈ [0, 1]``, linearly interpolated on the curve."""
    check_range("rate", rate, 0.0, 1.0)
    n = curve.rates.shape[0] - 1
    pos = rate * n
    lo = min(math.floor(pos), n)
    hi = min(lo + 1, n)
    frac = pos - lo
    return curve.quality[lo] + frac * (curve.quality[hi] - curve.quality[lo])


def calibrate_threshold(scores: Tensor, target_rate: float) -> float:
    """Threshold ``τ`` for the rule "defer iff score < τ" that defers at most ``target_rate`` of ``scores``.

    Returns the ``τ`` achieving the largest deferral fraction ``≤ target_rate`` (ties cannot be split, so
    the exact rate may not be attainable): the ``k``-th smallest score for ``k = ⌊target_rate · N⌋``, or
    ``+inf`` (defer everything) when ``k = N``.

    Args:
        scores: ``[N]`` deferral scores, typically on a validation split.
        target_rate: the wanted deferral rate in ``[0, 1]``.
    """
    check_range("target_rate", target_rate, 0.0, 1.0)
    if scores.ndim != 1:
        raise ValueError(f"`scores` must be 1-D of shape [N]; got shape {tuple(scores.shape)}")
    check_nonempty("scores", scores)
    check_finite("scores", scores.float())
    n = scores.shape[0]
    k = math.floor(target_rate * n + 1e-9)
    if k >= n:
        return float("inf")
    return float(torch.sort(scores.double()).values[k])


def _auroc_from_sorted(srt: _SortedScores, positive: Tensor) -> Tensor:
    """Mann–Whitney AUROC of ``scores`` separating ``positive`` from the rest; ties count 1/2."""
    pos_sorted = positive[srt.order].double()
    n_pos = pos_sorted.sum()
    n_neg = pos_sorted.shape[0] - n_pos
    if float(n_pos) == 0 or float(n_neg) == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=positive.device)
    # average 1-based rank of each tie group
    starts = srt.group_starts[:-1]
    sizes = srt.group_starts[1:] - starts
    group_rank = starts.double() + (sizes.double() + 1.0) / 2.0
    group_id = torch.repeat_interleave(torch.arange(sizes.shape[0], device=positive.device), sizes)
    rank_sum = (group_rank[group_id] * pos_sorted).sum()
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def deferral_auroc(scores: Tensor, correct: Tensor) -> Tensor:
    """AUROC of the score for telling the small model's correct answers (positive) from its mistakes.

    Equal to ``sklearn.metrics.roc_auc_score(correct, scores)``; NaN if one class is absent.

    Args:
        scores: ``[N]`` deferral scores.
        correct: ``[N]`` boolean (or 0/1) correctness of the small model.
    """
    _validate(scores, correct.float())
    return _auroc_from_sorted(_sort_scores(scores), correct.bool())


def _score_range(scores: Tensor) -> tuple[float, float]:
    lo, hi = float(scores.min()), float(scores.max())
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    if hi - lo < 1e-12:
        return lo - 0.5, hi + 0.5
    return lo, hi


def distributional_overlap(
    scores: Tensor,
    correct: Tensor,
    method: Literal["kde", "hist"] = "kde",
    bins: int = 100,
    bandwidth: float = 0.05,
    grid_size: int = 1000,
) -> Tensor:
    """Gatekeeper's distributional overlap ``s_o = ∫ min(f_correct(s), f_incorrect(s)) ds`` (lower is better).

    ``f_correct`` and ``f_incorrect`` are the densities of the score on the small model's correct and
    incorrect examples. The paper's estimator is not verified; two are offered:

    * ``"kde"`` (default): Gaussian KDE with ``bandwidth`` given as a fraction of the score range (the
      range is ``[0, 1]`` when all scores lie in it, so 0.05 is the usual absolute bandwidth for
      probabilities), evaluated on ``grid_size`` points spanning the range ± 3 bandwidths. The KDE is
      *binned* (linear binning on the grid, then a Gaussian convolution), which is ``O(N + grid²)``
      instead of ``O(N · grid)`` and accurate to the grid resolution.
    * ``"hist"``: ``bins`` equal-width bins over the score range; ``Σ_b min(P_correct(b), P_incorrect(b))``.

    Args:
        scores: ``[N]`` deferral scores.
        correct: ``[N]`` boolean correctness of the small model.
        method: ``"kde"`` or ``"hist"``.

    Returns:
        Scalar float64 in ``[0, 1]``; NaN when all examples are correct or all incorrect.
    """
    check_choice("method", method, ("kde", "hist"))
    _validate(scores, correct.float())
    correct = correct.bool()
    if bool(correct.all()) or not bool(correct.any()):
        return torch.tensor(float("nan"), dtype=torch.float64, device=scores.device)
    lo, hi = _score_range(scores)
    x = scores.double()
    if method == "hist":
        edges_span = hi - lo
        idx = ((x - lo) / edges_span * bins).floor().long().clamp(0, bins - 1)
        p_c = torch.bincount(idx[correct], minlength=bins).double() / correct.sum()
        p_i = torch.bincount(idx[~correct], minlength=bins).double() / (~correct).sum()
        return torch.minimum(p_c, p_i).sum()
    h = bandwidth * (hi - lo)
    g_lo, g_hi = lo - 3 * h, hi + 3 * h
    dx = (g_hi - g_lo) / (grid_size - 1)
    densities = []
    for mask in (correct, ~correct):
        pos = (x[mask] - g_lo) / dx
        left = pos.floor().clamp(0, grid_size - 2)
        w_right = (pos - left).clamp(0, 1)
        left = left.long()
        hist = torch.zeros(grid_size, dtype=torch.float64, device=x.device)
        hist.index_add_(0, left, 1.0 - w_right)
        hist.index_add_(0, left + 1, w_right)
        half = math.ceil(4 * h / dx)
        offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=x.device) * dx
        kernel = torch.exp(-0.5 * (offsets / h) ** 2)
        dens = F.conv1d(hist[None, None], kernel[None, None], padding=half)[0, 0]
        dens = dens / (dens.sum() * dx)
        densities.append(dens)
    return torch.minimum(densities[0], densities[1]).sum() * dx


@dataclass
class DeferralReport:
    """All deferral metrics of one score, as returned by :func:`deferral_metrics`.

    Scalars are python floats; ``curve`` holds the realised curve and ``random``/``ideal`` the reference
    curves on the same rate grid.
    """

    curve: DeferralCurve
    random: Tensor
    ideal: Tensor
    scalars: dict[str, float] = field(default_factory=dict)


def deferral_metrics(
    scores: Tensor,
    small_quality: Tensor,
    large_quality: Tensor,
    ideal: IdealVariant = "oracle",
    rate: float = 0.2,
    correct_threshold: float = 0.5,
    overlap_bandwidth: float = 0.05,
    overlap_bins: int = 100,
) -> DeferralReport:
    """Every deferral metric from a single sort of ``scores``.

    Args:
        scores: ``[N]`` deferral scores (higher = keep the small model's answer).
        small_quality: ``[N]`` small-model quality (0/1 or real-valued).
        large_quality: ``[N]`` large-model quality.
        ideal: reference curve for ``s_d`` (see :func:`ideal_deferral_curve`).
        rate: deferral rate at which ``quality_at_rate`` is reported.
        correct_threshold: an example counts as "correct" for AUROC and ``s_o`` when
            ``small_quality >= correct_threshold`` (0.5 suits 0/1 correctness).
        overlap_bandwidth, overlap_bins: estimator settings of :func:`distributional_overlap`.

    Returns:
        :class:`DeferralReport` whose ``scalars`` hold ``small_quality``, ``large_quality``, ``auc_df``,
        ``auc_random``, ``auc_ideal``, ``auc_gain`` (relative gain of AUC-DF over random), ``s_d``,
        ``s_o`` (KDE), ``s_o_hist``, ``auroc``, ``quality_at_rate`` and ``rate``.
    """
    _validate(scores, small_quality, large_quality)
    check_choice("ideal", ideal, IDEAL_VARIANTS)
    check_range("rate", rate, 0.0, 1.0)
    srt = _sort_scores(scores)
    curve = _curve_from_sorted(srt, small_quality, large_quality)
    rand = random_deferral_curve(curve.rates, small_quality, large_quality)
    best = ideal_deferral_curve(curve.rates, small_quality, large_quality, ideal)
    auc = _trapz(curve.quality, curve.rates)
    auc_rand = _trapz(rand, curve.rates)
    auc_ideal = _trapz(best, curve.rates)
    den = auc_ideal - auc_rand
    s_d = (auc - auc_rand) / den if float(den.abs()) > 1e-12 else torch.tensor(float("nan"))
    correct = small_quality.double() >= correct_threshold
    scalars = {
        "small_quality": float(small_quality.double().mean()),
        "large_quality": float(large_quality.double().mean()),
        "auc_df": float(auc),
        "auc_random": float(auc_rand),
        "auc_ideal": float(auc_ideal),
        "auc_gain": float((auc - auc_rand) / auc_rand) if float(auc_rand) != 0 else float("nan"),
        "s_d": float(s_d),
        "s_o": float(distributional_overlap(scores, correct, "kde", bandwidth=overlap_bandwidth)),
        "s_o_hist": float(distributional_overlap(scores, correct, "hist", bins=overlap_bins)),
        "auroc": float(_auroc_from_sorted(srt, correct)),
        "quality_at_rate": float(quality_at_rate(curve, rate)),
        "rate": float(rate),
    }
    return DeferralReport(curve=curve, random=rand, ideal=best, scalars=scalars)
