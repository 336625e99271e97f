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

from lit_cascades.functional import auroc as _auroc
from lit_cascades.functional._checks import (
    check_choice,
    check_finite,
    check_nonempty,
    check_range,
    check_same_length,
)
from lit_cascades.functional.auroc import _auroc_from_sorted, _sort_scores, _SortedScores

IdealVariant = Literal["oracle", "linear", "capped"]
IDEAL_VARIANTS: tuple[str, ...] = ("oracle", "linear", "capped")


class DeferralCurve(NamedTuple):
    """A deferral curve: ``quality[k]`` is the cascade quality at deferral rate ``rates[k] = k/N``."""

    rates: Tensor
    quality: Tensor


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
        check_finite(name, t if t.is_floating_point() else t.float())


def _interpolate_ties(cum: Tensor, srt: _SortedScores) -> Tensor:
    """Replace ``cum[k]`` inside each tie group by the interpolation between the group's boundaries, in place.

    Block by block: a block reads ``cum`` only at boundaries, which the interpolation leaves unchanged.
    """
    if not srt.has_ties:
        return cum
    for s in _auroc._chunks(cum.shape[0]):
        e = min(s + _auroc.CHUNK, cum.shape[0])
        lo, hi = srt.lo[s:e], srt.hi[s:e]
        k = torch.arange(s, e, dtype=cum.dtype, device=cum.device)
        frac = (k - lo).div_((hi - lo).clamp(min=1))
        c_lo = cum.index_select(0, lo)
        cum[s:e] = frac.mul_(cum.index_select(0, hi) - c_lo).add_(c_lo)
    return cum


def _cumsum0(x: Tensor) -> Tensor:
    """``[0, x0, x0+x1, ...]`` (length ``N + 1``) without an extra padding copy."""
    out = torch.empty(x.shape[0] + 1, dtype=x.dtype, device=x.device)
    out[0] = 0
    torch.cumsum(x, 0, out=out[1:])
    return out


def _sorted_gain_cumsum(order: Tensor, small_quality: Tensor, large_quality: Tensor) -> Tensor:
    """``[N + 1]`` float64 ``[0, g_0, g_0 + g_1, ...]`` of the gains ``large − small`` in sorted order.

    Written into the output buffer and summed in place (no float64 copy of the inputs, no gain array).
    """
    out = torch.empty(order.shape[0] + 1, dtype=torch.float64, device=order.device)
    out[0] = 0
    body = out[1:]
    body.copy_(large_quality.index_select(0, order))  # index_select: much faster than x[order] on CPU
    body.sub_(small_quality.index_select(0, order))
    body.cumsum_(0)
    return out


def _rates(n: int, device: torch.device) -> Tensor:
    return torch.arange(n + 1, dtype=torch.float64, device=device) / n


def _curve_from_sorted(srt: _SortedScores, gain: Tensor, small_sum: Tensor) -> DeferralCurve:
    """Curve from the per-example gains ``large − small`` (float64) and ``Σ small_quality``."""
    n = gain.shape[0]
    cum = _interpolate_ties(_cumsum0(gain.index_select(0, srt.order)), srt)
    return DeferralCurve(_rates(n, gain.device), cum.add_(small_sum).div_(n))


def _gain(small_quality: Tensor, large_quality: Tensor) -> Tensor:
    return large_quality.double() - small_quality.double()


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
    return _curve_from_sorted(_sort_scores(scores), _gain(small_quality, large_quality),
                              small_quality.double().sum())


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
    n = small_quality.shape[0]
    if variant == "oracle" and rates.shape[0] != n + 1:
        raise ValueError(f"`rates` must be the [N + 1] grid k/N for variant='oracle'; got {rates.shape[0]} "
                         f"rates for N={n}")
    return _ideal(rates.double(), small_quality.double().mean(), large_quality.double().mean(), variant,
                  _gain(small_quality, large_quality))


def _ideal(rates: Tensor, qs: Tensor, ql: Tensor, variant: str, gain: Tensor) -> Tensor:
    if variant == "oracle":
        return _cumsum0(_gains_descending(gain)).div_(gain.shape[0]).add_(qs)
    if variant == "linear":
        err = 1.0 - qs
        if float(err) <= 0.0:
            return torch.full_like(rates, float(ql))
        return torch.where(rates <= err, qs + (ql - qs) / err * rates, ql)
    return torch.minimum(qs + rates, ql)


def _gains_descending(gain: Tensor) -> Tensor:
    """``gain`` sorted descending; counted instead of sorted when every gain is -1, 0 or 1 (0/1 qualities)."""
    n_up, n_down = int((gain == 1).sum()), int((gain == -1).sum())
    if n_up + n_down + int((gain == 0).sum()) != gain.shape[0]:
        return torch.sort(gain, descending=True).values
    out = torch.zeros_like(gain)
    out[:n_up] = 1.0
    if n_down:
        out[-n_down:] = -1.0
    return out


def _trapz(y: Tensor, x: Tensor) -> Tensor:
    return torch.trapezoid(y, x)


def _area_on_grid(y: Tensor) -> Tensor:
    """Trapezoidal area of ``y`` sampled on the uniform grid ``k/N``, ``k = 0..N``."""
    n = y.shape[0] - 1
    return (y.sum() - 0.5 * (y[0] + y[-1])) / n


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
    return _s_d(_trapz(curve.quality, curve.rates), _trapz(rand, curve.rates), _trapz(best, curve.rates))


def _s_d(auc: Tensor, auc_random: Tensor, auc_ideal: Tensor) -> Tensor:
    """``(AUC − AUC_rand) / (AUC_ideal − AUC_rand)``; NaN when the ideal curve equals the random line."""
    den = auc_ideal - auc_random
    if float(den.abs()) < 1e-12:
        return torch.tensor(float("nan"), dtype=torch.float64, device=auc.device)
    return (auc - auc_random) / den


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


def _class_histograms(bin_idx: Tensor, correct: Tensor, n_bins: int, weights: Tensor | None = None) -> Tensor:
    """``[2, n_bins]`` histograms of the correct (row 0) and incorrect (row 1) examples in one bincount."""
    idx = torch.where(correct, bin_idx, bin_idx + n_bins)
    return torch.bincount(idx, weights=weights, minlength=2 * n_bins).double().view(2, n_bins)


def _overlap_hist(x: Tensor, correct: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    hist = torch.zeros(2, bins, dtype=torch.float64, device=x.device)
    for s in _auroc._chunks(x.shape[0]):  # blocks bound the temporaries
        e = min(s + _auroc.CHUNK, x.shape[0])
        idx = ((x[s:e] - lo) / (hi - lo) * bins).floor_().long().clamp_(0, bins - 1)
        hist += _class_histograms(idx, correct[s:e], bins)
    p = hist / hist.sum(1, keepdim=True)
    return torch.minimum(p[0], p[1]).sum()


def _overlap_kde(x: Tensor, correct: Tensor, lo: float, hi: float, bandwidth: float, grid_size: int) -> Tensor:
    h = bandwidth * (hi - lo)
    g_lo, g_hi = lo - 3 * h, hi + 3 * h
    dx = (g_hi - g_lo) / (grid_size - 1)
    hist = torch.zeros(2, grid_size, dtype=torch.float64, device=x.device)
    for s in _auroc._chunks(x.shape[0]):  # linear binning onto the grid, block by block
        e = min(s + _auroc.CHUNK, x.shape[0])
        pos = (x[s:e] - g_lo) / dx
        left = pos.floor().clamp_(0, grid_size - 2)
        w_right = pos.sub_(left).clamp_(0, 1)
        left = left.long()
        hist += _class_histograms(left, correct[s:e], grid_size, 1.0 - w_right)
        hist += _class_histograms(left + 1, correct[s:e], grid_size, w_right)
    half = math.ceil(4 * h / dx)
    offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=x.device) * dx
    kernel = torch.exp(-0.5 * (offsets / h) ** 2)
    dens = F.conv1d(hist[:, None], kernel[None, None], padding=half)[:, 0]
    dens = dens / (dens.sum(1, keepdim=True) * dx)
    return torch.minimum(dens[0], dens[1]).sum() * dx


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
    return _overlap(scores, correct.bool(), method, bins, bandwidth, grid_size)


def _overlap(scores: Tensor, correct: Tensor, method: str, bins: int, bandwidth: float, grid_size: int) -> Tensor:
    n_correct = int(correct.sum())
    if n_correct in (0, correct.shape[0]):
        return torch.tensor(float("nan"), dtype=torch.float64, device=scores.device)
    lo, hi = _score_range(scores)
    x = scores if scores.dtype in (torch.float32, torch.float64) else scores.double()
    if method == "hist":
        return _overlap_hist(x, correct, lo, hi, bins)
    return _overlap_kde(x, correct, lo, hi, bandwidth, grid_size)


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
    # Memory: the report's four [N + 1] float64 curves are the only O(N) float64 arrays; everything else is
    # the sort (values + int64 order), int32 tie bounds, bool masks and block-sized temporaries.
    n = scores.shape[0]
    qs = torch.sum(small_quality, dtype=torch.float64) / n
    ql = torch.sum(large_quality, dtype=torch.float64) / n
    srt = _sort_scores(scores)
    quality = _interpolate_ties(_sorted_gain_cumsum(srt.order, small_quality, large_quality), srt)
    quality.div_(n).add_(qs)
    correct = small_quality >= correct_threshold
    auroc = float(_auroc_from_sorted(srt, correct))
    del srt
    rates = _rates(n, scores.device)
    curve = DeferralCurve(rates, quality)
    rand = torch.mul(rates, ql - qs).add_(qs)
    best = _ideal_lean(rates, qs, ql, ideal, small_quality, large_quality)
    auc, auc_ideal = _area_on_grid(quality), _area_on_grid(best)
    auc_rand = (qs + ql) / 2
    scalars = {
        "small_quality": float(qs),
        "large_quality": float(ql),
        "auc_df": float(auc),
        "auc_random": float(auc_rand),
        "auc_ideal": float(auc_ideal),
        "auc_gain": float((auc - auc_rand) / auc_rand) if float(auc_rand) != 0 else float("nan"),
        "s_d": float(_s_d(auc, auc_rand, auc_ideal)),
        "s_o": float(_overlap(scores, correct, "kde", overlap_bins, overlap_bandwidth, 1000)),
        "s_o_hist": float(_overlap(scores, correct, "hist", overlap_bins, overlap_bandwidth, 1000)),
        "auroc": auroc,
        "quality_at_rate": float(quality_at_rate(curve, rate)),
        "rate": float(rate),
    }
    return DeferralReport(curve=curve, random=rand, ideal=best, scalars=scalars)


def _ideal_lean(rates: Tensor, qs: Tensor, ql: Tensor, variant: str, small_quality: Tensor,
                large_quality: Tensor) -> Tensor:
    """:func:`_ideal` without a float64 gain array when both qualities are 0/1 (the oracle curve from counts)."""
    if variant != "oracle":
        return _ideal(rates, qs, ql, variant, torch.empty(0))
    binary = all(bool(((q == 0) | (q == 1)).all()) for q in (small_quality, large_quality))
    if not binary:
        return _ideal(rates, qs, ql, variant, _gain(small_quality, large_quality))
    n = small_quality.shape[0]
    n_up = int((large_quality > small_quality).sum())  # gain +1
    n_down = int((large_quality < small_quality).sum())  # gain -1
    out = torch.arange(n + 1, dtype=torch.float64, device=rates.device).clamp_(max=n_up)
    if n_down:
        out[n - n_down:] -= torch.arange(n_down + 1, dtype=torch.float64, device=rates.device)
    return out.div_(n).add_(qs)
