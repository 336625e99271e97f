import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_auroc

from lit_cascades.functional import (
    area_under_deferral_curve,
    calibrate_threshold,
    deferral_auroc,
    deferral_curve,
    deferral_metrics,
    deferral_performance,
    distributional_overlap,
    ideal_deferral_curve,
    quality_at_rate,
    random_deferral_curve,
)


def _brute_force_threshold_curve(scores, qs, ql):
    """Cascade quality for every threshold rule "defer iff score < tau", tau over all distinct values."""
    points = {}
    for tau in [*sorted(set(scores.tolist())), math.inf]:
        defer = scores < tau
        q = torch.where(defer, ql, qs).double().mean().item()
        points[int(defer.sum())] = q
    return points


@pytest.mark.parametrize("n_distinct", [1000, 4])  # continuous scores, then heavy ties
def test_curve_equals_brute_force_threshold_loop(n_distinct):
    g = torch.Generator().manual_seed(1)
    n = 60
    scores = torch.randint(0, n_distinct, (n,), generator=g).float()
    qs = torch.randint(0, 2, (n,), generator=g).float()
    ql = torch.rand(n, generator=g)  # real-valued large-model quality
    curve = deferral_curve(scores, qs, ql)
    assert curve.rates.shape == (n + 1,)
    brute = _brute_force_threshold_curve(scores, qs, ql)
    for k, q in brute.items():
        assert curve.quality[k].item() == pytest.approx(q, abs=1e-12)


def test_ties_are_the_expectation_over_random_tie_breaking():
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9])
    qs = torch.tensor([1.0, 0.0, 0.0, 1.0])
    ql = torch.tensor([1.0, 1.0, 1.0, 1.0])
    curve = deferral_curve(scores, qs, ql)
    # enumerate all orders of the three tied examples and average
    import itertools

    exp = torch.zeros(5, dtype=torch.float64)
    perms = list(itertools.permutations(range(3)))
    for perm in perms:
        order = [*perm, 3]
        for k in range(5):
            q = [ql[i] if pos < k else qs[i] for pos, i in enumerate(order)]
            exp[k] += float(sum(q)) / 4 / len(perms)
    torch.testing.assert_close(curve.quality, exp)
    # and the result does not depend on the input order
    perm = torch.tensor([3, 1, 0, 2])
    torch.testing.assert_close(deferral_curve(scores[perm], qs[perm], ql[perm]).quality, curve.quality)


def test_endpoints_and_area():
    scores, qs, ql = torch.rand(50), (torch.rand(50) > 0.3).float(), (torch.rand(50) > 0.1).float()
    curve = deferral_curve(scores, qs, ql)
    assert curve.quality[0].item() == pytest.approx(qs.mean().item())
    assert curve.quality[-1].item() == pytest.approx(ql.mean().item())
    auc = area_under_deferral_curve(curve).item()
    assert auc == pytest.approx(np.trapezoid(curve.quality.numpy(), curve.rates.numpy()))


def _cascade_data(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = (torch.rand(n, generator=g) < 0.7).float()
    # the large model is right wherever the small one is, plus on 2/3 of the rest
    ql = torch.where(qs.bool(), torch.ones(n), (torch.rand(n, generator=g) < 2 / 3).float())
    return qs, ql, g


def test_s_d_is_one_for_oracle_and_about_zero_for_random():
    qs, ql, g = _cascade_data()
    oracle = -(ql - qs) + 0.01 * torch.rand(qs.shape[0], generator=g)  # defer largest gain first
    for ideal in ("oracle", "capped"):
        curve = deferral_curve(oracle, qs, ql)
        assert deferral_performance(curve, qs, ql, ideal=ideal).item() == pytest.approx(1.0, abs=1e-6)
    random_sd = [
        deferral_performance(deferral_curve(torch.rand(qs.shape[0], generator=g), qs, ql), qs, ql).item()
        for _ in range(20)
    ]
    assert abs(np.mean(random_sd)) < 0.05
    # a score that sees only the small model's correctness is ideal under the "linear" variant
    small_only = qs + 0.01 * torch.rand(qs.shape[0], generator=g)
    sd_lin = deferral_performance(deferral_curve(small_only, qs, ql), qs, ql, ideal="linear").item()
    assert sd_lin == pytest.approx(1.0, abs=0.02)
    # the reverse of the oracle is worse than random
    assert deferral_performance(deferral_curve(-oracle, qs, ql), qs, ql).item() < -0.5


def test_ideal_variants_hand_values():
    qs = torch.tensor([1.0, 0.0, 0.0, 1.0])  # Q_S = 0.5
    ql = torch.tensor([1.0, 1.0, 0.0, 1.0])  # Q_L = 0.75
    rates = torch.linspace(0, 1, 5)
    torch.testing.assert_close(
        ideal_deferral_curve(rates, qs, ql, "capped"),
        torch.tensor([0.5, 0.75, 0.75, 0.75, 0.75], dtype=torch.float64),
    )
    torch.testing.assert_close(
        ideal_deferral_curve(rates, qs, ql, "linear"),
        torch.tensor([0.5, 0.625, 0.75, 0.75, 0.75], dtype=torch.float64),
    )
    torch.testing.assert_close(
        ideal_deferral_curve(rates, qs, ql, "oracle"),
        torch.tensor([0.5, 0.75, 0.75, 0.75, 0.75], dtype=torch.float64),
    )
    torch.testing.assert_close(
        random_deferral_curve(rates, qs, ql), torch.tensor([0.5, 0.5625, 0.625, 0.6875, 0.75], dtype=torch.float64)
    )


@pytest.mark.parametrize("n_distinct", [10_000, 3])
def test_auroc_equals_sklearn_and_torchmetrics(n_distinct):
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, n_distinct, (500,), generator=g).float() / n_distinct
    correct = (torch.rand(500, generator=g) < 0.3 + 0.5 * scores).long()
    ours = deferral_auroc(scores, correct).item()
    assert ours == pytest.approx(roc_auc_score(correct.numpy(), scores.numpy()), abs=1e-12)
    assert ours == pytest.approx(binary_auroc(scores, correct).item(), abs=1e-6)
    assert math.isnan(deferral_auroc(scores, torch.ones(500)).item())


def test_distributional_overlap():
    g = torch.Generator().manual_seed(4)
    same = torch.rand(20_000, generator=g)
    labels = torch.rand(20_000, generator=g) < 0.5
    for method in ("kde", "hist"):
        assert distributional_overlap(same, labels, method).item() > 0.9
    separated = torch.cat([0.1 * torch.rand(1000, generator=g), 0.9 + 0.1 * torch.rand(1000, generator=g)])
    corr = torch.cat([torch.zeros(1000), torch.ones(1000)]).bool()
    assert distributional_overlap(separated, corr, "hist").item() == 0.0
    assert distributional_overlap(separated, corr, "kde").item() < 0.05
    # histogram by hand: 4 bins over [0, 1]
    s = torch.tensor([0.1, 0.1, 0.6, 0.9, 0.3, 0.6])
    c = torch.tensor([1, 1, 1, 1, 0, 0]).bool()
    # correct: bins {0:2, 2:1, 3:1}/4 ; incorrect: bins {1:1, 2:1}/2 -> overlap = min(.25,.5) at bin 2
    assert distributional_overlap(s, c, "hist", bins=4).item() == pytest.approx(0.25)


def test_kde_overlap_matches_exact_gaussian_kde():
    g = torch.Generator().manual_seed(5)
    s = torch.rand(300, generator=g)
    c = torch.rand(300, generator=g) < s
    ours = distributional_overlap(s, c, "kde", bandwidth=0.05, grid_size=4000).item()
    h = 0.05
    grid = np.linspace(-3 * h, 1 + 3 * h, 4000)
    dens = []
    for m in (c.numpy(), ~c.numpy()):
        x = s.numpy()[m]
        d = np.exp(-0.5 * ((grid[:, None] - x[None]) / h) ** 2).sum(1)
        dens.append(d / np.trapezoid(d, grid))
    exact = np.trapezoid(np.minimum(*dens), grid)
    assert ours == pytest.approx(exact, abs=5e-3)


def test_quality_at_rate_and_threshold():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    qs = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    ql = torch.ones(5)
    curve = deferral_curve(scores, qs, ql)
    assert quality_at_rate(curve, 0.4).item() == pytest.approx(1.0)
    assert quality_at_rate(curve, 0.1).item() == pytest.approx(0.7)  # halfway between 0.6 and 0.8
    tau = calibrate_threshold(scores, 0.4)
    assert (scores < tau).float().mean().item() == pytest.approx(0.4)
    assert calibrate_threshold(scores, 1.0) == math.inf
    assert (scores < calibrate_threshold(scores, 0.0)).sum() == 0
    ties = torch.tensor([0.2, 0.2, 0.2, 0.8])
    assert (ties < calibrate_threshold(ties, 0.5)).sum() == 0  # cannot split the tie: largest rate <= 0.5
    assert (ties < calibrate_threshold(ties, 0.75)).sum() == 3
    assert (scores < calibrate_threshold(scores, 0.29 * 100 / 100)).sum() == 1


def test_deferral_metrics_report_is_consistent():
    qs, ql, g = _cascade_data(500, seed=7)
    scores = qs * 0.5 + torch.rand(500, generator=g)
    rep = deferral_metrics(scores, qs, ql, rate=0.2)
    sc = rep.scalars
    assert sc["small_quality"] == pytest.approx(qs.mean().item())
    assert sc["auc_random"] == pytest.approx((qs.mean() + ql.mean()).item() / 2)
    assert sc["auroc"] == pytest.approx(roc_auc_score(qs.numpy(), scores.numpy()))
    assert sc["s_d"] == pytest.approx(deferral_performance(rep.curve, qs, ql).item())
    assert 0 < sc["s_d"] < 1 and 0 < sc["s_o"] < 1 and sc["auc_gain"] > 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.rand(3), torch.rand(4), torch.rand(3)), "length mismatch"),
        ((torch.rand(0), torch.rand(0), torch.rand(0)), "empty"),
        ((torch.tensor([0.1, float("nan")]), torch.rand(2), torch.rand(2)), "finite"),
        ((torch.rand(2, 2), torch.rand(2), torch.rand(2)), "1-D"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        deferral_curve(*args)
    with pytest.raises(ValueError, match=match):
        deferral_metrics(*args)


def test_bad_options():
    s = torch.rand(4)
    with pytest.raises(ValueError, match="ideal"):
        deferral_metrics(s, s, s, ideal="best")
    with pytest.raises(ValueError, match="rate"):
        deferral_metrics(s, s, s, rate=1.5)
    with pytest.raises(ValueError, match="target_rate"):
        calibrate_threshold(s, -0.1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        deferral_curve([0.1, 0.2], s[:2], s[:2])


@pytest.fixture(params=[1 << 16, 7], ids=["one_block", "many_blocks"])
def block(request, monkeypatch):
    """Run a test with the default block size and with blocks of 7, so tie groups straddle block edges."""
    import lit_cascades.functional.auroc as auroc_mod

    monkeypatch.setattr(auroc_mod, "CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("real_valued", [False, True])
@pytest.mark.parametrize("n_distinct", [5, 40, 10_000])
def test_deferral_metrics_equal_oracles_across_blocks(block, n_distinct, real_valued):
    """Every field of the single-pass report against brute force, sklearn and the separate functions."""
    g = torch.Generator().manual_seed(n_distinct)
    n = 97
    scores = torch.randint(0, n_distinct, (n,), generator=g).float() / n_distinct
    qs = (torch.rand(n, generator=g) < 0.6).float()
    ql = torch.rand(n, generator=g) if real_valued else (torch.rand(n, generator=g) < 0.8).float()
    rep = deferral_metrics(scores, qs, ql)
    brute = _brute_force_threshold_curve(scores, qs, ql)
    for k, q in brute.items():
        assert rep.curve.quality[k].item() == pytest.approx(q, abs=1e-12)
    torch.testing.assert_close(rep.curve.rates, torch.arange(n + 1, dtype=torch.float64) / n)
    # the oracle ideal curve = cumulative gains sorted largest first (brute force)
    gains = sorted((ql.double() - qs.double()).tolist(), reverse=True)
    ideal = qs.double().mean().item() + np.concatenate([[0.0], np.cumsum(gains)]) / n
    np.testing.assert_allclose(rep.ideal.numpy(), ideal, atol=1e-12)
    np.testing.assert_allclose(rep.random.numpy(), qs.mean().item() + rep.curve.rates.numpy()
                               * (ql.mean() - qs.mean()).item(), atol=1e-12)
    assert rep.scalars["auroc"] == pytest.approx(roc_auc_score(qs.numpy(), scores.numpy()), abs=1e-12)
    assert rep.scalars["s_d"] == pytest.approx(deferral_performance(rep.curve, qs, ql).item(), abs=1e-12)
    correct = qs >= 0.5
    assert rep.scalars["s_o_hist"] == pytest.approx(
        distributional_overlap(scores, correct, method="hist").item(), abs=1e-12)
    # histogram overlap by hand: equal-width bins over [0, 1]
    idx = np.clip(np.floor(scores.numpy().astype(np.float64) * 100), 0, 99).astype(int)
    hc = np.bincount(idx[correct.numpy()], minlength=100) / correct.sum().item()
    hi_ = np.bincount(idx[~correct.numpy()], minlength=100) / (~correct).sum().item()
    assert rep.scalars["s_o_hist"] == pytest.approx(np.minimum(hc, hi_).sum(), abs=1e-6)


@pytest.mark.parametrize("n_distinct", [3, 50, 100_000])
def test_auroc_across_blocks_equals_sklearn(block, n_distinct):
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, n_distinct, (300,), generator=g).double() / n_distinct  # in [0, 1]: no sigmoid
    target = torch.rand(300, generator=g) < 0.3
    ours = deferral_auroc(scores, target).item()
    assert ours == pytest.approx(roc_auc_score(target.numpy(), scores.numpy()), abs=1e-12)
    assert ours == pytest.approx(binary_auroc(scores, target.long()).item(), abs=1e-6)
