"""The seed-effect criterion shared by the recipes and the results tables (lit_cascades.effects)."""

from __future__ import annotations

import statistics

import pytest

from lit_cascades.effects import (
    interval_bounds,
    mean_std,
    paired_cell,
    paired_differences,
    paired_interval,
    seed_verdict,
)


@pytest.mark.parametrize(("diffs", "expected"), [
    ([0.05, 0.06, 0.04], "beyond seed spread"),   # same sign, mean 0.05 > 2 × std 0.01
    ([0.05, -0.01, 0.04], "noise"),               # signs disagree
    ([0.01, 0.05, 0.09], "noise"),                # same sign but mean 0.05 < 2 × std 0.04
    ([-0.2, -0.21, -0.19], "beyond seed spread"),
    ([0.3], "one seed"),
])
def test_seed_verdict_rule(diffs: list[float], expected: str) -> None:
    assert seed_verdict(diffs) == expected


def test_the_verdict_pairs_by_seed():
    # two methods whose own spreads overlap widely, but the same seed moves both alike: the paired
    # differences are +0.02 on every seed, beyond the seed spread
    base, method = [0.10, 0.30, 0.50], [0.12, 0.32, 0.53]
    assert statistics.stdev(base) > 0.1
    assert seed_verdict(paired_differences(method, base)) == "beyond seed spread"
    # and the reverse: separated means, but one seed flips the sign
    assert seed_verdict(paired_differences([0.50, 0.50, 0.11], [0.10, 0.10, 0.12])) == "noise"
    with pytest.raises(ValueError, match="^`method` and `baseline`: expected one value per seed on both sides; got 3 and 2"):
        paired_differences([1.0, 2.0, 3.0], [1.0, 2.0])


def test_paired_differences_by_seed_pairs_keys_not_positions() -> None:
    # insertion orders differ: pairing by position would give 0.1 − 0.7, i.e. a wrong sign on two seeds
    method, base = {2: 0.9, 0: 0.2, 1: 0.5}, {0: 0.1, 1: 0.4, 2: 0.7}
    assert paired_differences(method, base) == pytest.approx([0.1, 0.1, 0.2])


def test_paired_differences_refuses_a_missing_seed() -> None:
    with pytest.raises(ValueError, match=r"^`method` and `baseline`: expected the same seeds on both sides; seeds "
                                         r"\[3\] only in `method`, \[2\] only in `baseline`"):
        paired_differences({0: 1.0, 1: 1.0, 3: 1.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    with pytest.raises(TypeError, match="two {seed: value} mappings or two sequences; got dict and list"):
        paired_differences({0: 1.0}, [0.0])


def test_mean_std_is_the_sample_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == "2.000 ± 1.000"
    assert mean_std([0.5, 0.5, 0.8], 2) == "0.60 ± 0.17"
    assert mean_std([0.25]) == "0.250 ± 0.000"


def test_paired_interval_by_hand_and_against_scipy():
    from scipy import stats

    # diffs 1, 2, 3: mean 2, std 1, n 3; the 0.975 t quantile with 2 degrees of freedom is 4.302653 (tables)
    half = 4.302653 / 3 ** 0.5
    assert paired_interval([1.0, 2.0, 3.0]) == f"[{2 - half:+.3f}, {2 + half:+.3f}]" == "[-0.484, +4.484]"
    d = [0.122, 0.044, 0.070, 0.031]
    want = stats.t.interval(0.9, len(d) - 1, loc=statistics.fmean(d), scale=stats.sem(d))
    assert interval_bounds(d, 0.9) == pytest.approx(want, rel=1e-12)
    # eight same-sign seeds whose spread is wide: the mean is pinned down (interval excludes 0) while the
    # verdict, which compares the effect with single seeds' spread, stays noise
    diffs = [-0.121, -0.051, -0.167, -0.070, -0.258, -0.059, -0.051, -0.073]
    lo, hi = (float(x) for x in paired_interval(diffs).strip("[]").split(", "))
    assert lo < hi < 0 and seed_verdict(diffs) == "noise"
    assert paired_interval([0.5]) == "—"
    assert interval_bounds([0.000385, 0.000285])[0] < 0
    assert paired_interval([0.000385, 0.000285]) == "[+0.000, +0.001]"  # a bound rounding to zero is not "-0.000"
    with pytest.raises(ValueError, match="^`diffs`: expected at least 2"):
        interval_bounds([0.5])
    with pytest.raises(ValueError, match=r"^`level`: expected a value in \(0, 1\); got 1.0"):
        interval_bounds([0.1, 0.2], level=1.0)


def test_paired_cell_joins_the_three_parts():
    assert paired_cell([1.0, 2.0, 3.0]) == "2.000 ± 1.000 [-0.484, +4.484] (noise)"
    assert paired_cell([0.05, 0.06, 0.04], 2).endswith("(beyond seed spread)")
