"""Effects over seeds: the one criterion every comparison of lit_cascades reports (recipes, results tables).

A comparison of method A with a baseline B over seeds pairs them by seed (the same seed gives both the same data
order and, where they share one, the same starting model), so its evidence is the list of per-seed differences
``d_s = A_s − B_s``:

* :func:`seed_verdict` calls the effect **beyond the seed spread** when every ``d_s`` has the same sign and
  ``|mean d| > 2 · std d`` (sample std, n − 1), and **noise** otherwise. It compares the effect with how much a
  single seed's difference varies: a claim about what one more run would show.
* :func:`paired_interval` is the Student-t confidence interval of the mean difference,
  ``mean ± t_{n−1, (1+level)/2} · std / √n``: how well the seeds pin down the *mean* effect. With 3 seeds
  ``t_2 = 4.30``, so an effect can be beyond the seed spread while its 95% interval still reaches 0; tables report
  both.

Comparing the two methods' own standard deviations instead (e.g. "the gap exceeds the sum of the two stds")
ignores the pairing and is not used.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

BEYOND = "beyond seed spread"
NOISE = "noise"


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± std"`` of ``values`` (sample std; 0 for a single value)."""
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def paired_differences(method: Sequence[float] | Mapping[Any, float],
                       baseline: Sequence[float] | Mapping[Any, float]) -> list[float]:
    """Per-seed differences ``method[s] − baseline[s]``.

    Args:
        method, baseline: either two ``{seed: value}`` mappings (paired by key, returned in sorted seed order) or
            two sequences in the same seed order.

    Raises:
        ValueError: a seed is missing on one side (the mappings' keys differ, naming the seeds; or the sequences'
            lengths differ). A missing seed is an error, never silently dropped: dropping it would report an
            effect over fewer seeds than the table says.
    """
    if isinstance(method, Mapping) or isinstance(baseline, Mapping):
        if not (isinstance(method, Mapping) and isinstance(baseline, Mapping)):
            raise TypeError("`method` and `baseline`: expected two {seed: value} mappings or two sequences; got "
                            f"{type(method).__name__} and {type(baseline).__name__}")
        only_m, only_b = sorted(set(method) - set(baseline)), sorted(set(baseline) - set(method))
        if only_m or only_b:
            raise ValueError(f"`method` and `baseline`: expected the same seeds on both sides; seeds {only_m} only "
                             f"in `method`, {only_b} only in `baseline`")
        return [method[s] - baseline[s] for s in sorted(method)]
    if len(method) != len(baseline):
        raise ValueError(f"`method` and `baseline`: expected one value per seed on both sides; got {len(method)} "
                         f"and {len(baseline)} values")
    return [a - b for a, b in zip(method, baseline, strict=True)]


def seed_verdict(diffs: Sequence[float]) -> str:
    """``"beyond seed spread"`` when every per-seed difference has the same sign and ``|mean| > 2 × std``, else
    ``"noise"``; ``"one seed"`` when there is nothing to compare the effect with."""
    if len(diffs) < 2:
        return "one seed"
    m, s = statistics.fmean(diffs), statistics.stdev(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return BEYOND if same_sign and abs(m) > 2 * s else NOISE


def interval_bounds(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """``(lo, hi)`` of the ``level`` Student-t interval of the mean of ``diffs`` (at least 2 values)."""
    from scipy.stats import t

    if len(diffs) < 2:
        raise ValueError(f"`diffs`: expected at least 2 per-seed differences for an interval; got {len(diffs)}")
    if not 0 < level < 1:
        raise ValueError(f"`level`: expected a value in (0, 1); got {level}")
    m, s = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(t.ppf(0.5 + level / 2, len(diffs) - 1)) * s / math.sqrt(len(diffs))
    return m - half, m + half


def paired_interval(diffs: Sequence[float], level: float = 0.95, digits: int = 3) -> str:
    """:func:`interval_bounds` as ``"[lo, hi]"`` with signs (``"—"`` for fewer than 2 values; no ``-0.000``)."""
    if len(diffs) < 2:
        return "—"
    lo, hi = (round(v, digits) + 0.0 for v in interval_bounds(diffs, level))
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def paired_cell(diffs: Sequence[float], digits: int = 3) -> str:
    """One table cell for a paired effect: ``"mean ± std [lo, hi] (verdict)"`` (95% interval, :func:`seed_verdict`)."""
    return f"{mean_std(diffs, digits)} {paired_interval(diffs, digits=digits)} ({seed_verdict(diffs)})"
