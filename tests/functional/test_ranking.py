import itertools
import math

import pytest
import torch

from lit_cascades.functional import (
    aggregate_labels,
    bayes_optimal_label_aggregation,
    bayes_optimal_loss_aggregation,
    bipartite_pairwise_losses,
    effective_loss_weights,
    label_aggregation_loss,
    loss_aggregation_loss,
    pairwise_surrogate,
    population_auroc,
    population_multipartite_auroc,
)
from lit_cascades.functional.ranking import (
    independent_level_probs,
    lexicographic_loa_auc,
    tied_laa_auc,
)

PHI = {
    "logistic": lambda z: math.log1p(math.exp(-z)),
    "hinge": lambda z: max(0.0, 1.0 - z),
    "squared": lambda z: (1.0 - z) ** 2,
}


def _batch(b=23, k=3, seed=0, groups=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    labels = (torch.rand(b, k, generator=g) < torch.linspace(0.2, 0.6, k)).long()
    grp = torch.randint(0, 3, (b,), generator=g) if groups else None
    return scores, labels, grp


def _brute_loa(scores, labels, weights, surrogate, groups=None):
    b, k = labels.shape
    phi, s, y = PHI[surrogate], scores.tolist(), labels.tolist()
    w = [x / sum(weights) for x in weights]
    per_label = []
    for c in range(k):
        num = den = 0.0
        for i in range(b):
            for j in range(b):
                if y[i][c] == 1 and y[j][c] == 0 and (groups is None or groups[i] == groups[j]):
                    num += phi(s[i] - s[j])
                    den += 1
        per_label.append(num / den if den else 0.0)
    return sum(wc * lc for wc, lc in zip(w, per_label)), per_label


def _brute_laa(scores, levels, cost, surrogate, groups=None):
    phi, s, lv = PHI[surrogate], scores.tolist(), levels.tolist()
    num = den = 0.0
    for i in range(len(s)):
        for j in range(len(s)):
            if lv[i] > lv[j] and (groups is None or groups[i] == groups[j]):
                c = lv[i] - lv[j] if cost == "difference" else 1.0
                num += c * phi(s[i] - s[j])
                den += 1
    return num / den


@pytest.mark.parametrize("surrogate", ["logistic", "hinge", "squared"])
@pytest.mark.parametrize("grouped", [False, True])
def test_loss_aggregation_equals_double_loop(surrogate, grouped):
    scores, labels, groups = _batch(groups=grouped)
    weights = [0.5, 0.2, 0.3]
    out = loss_aggregation_loss(scores, labels, weights, surrogate, groups=groups)
    total, per_label = _brute_loa(scores, labels, weights, surrogate, groups)
    assert out.loss.item() == pytest.approx(total, rel=1e-10)
    torch.testing.assert_close(out.per_label, torch.tensor(per_label, dtype=torch.float64))


@pytest.mark.parametrize("surrogate", ["logistic", "hinge", "squared"])
@pytest.mark.parametrize("cost", ["difference", "uniform"])
@pytest.mark.parametrize("agg", ["sum", "weighted", "product"])
def test_label_aggregation_equals_double_loop(surrogate, cost, agg):
    scores, labels, groups = _batch(seed=1, groups=(agg == "sum"))
    weights = [0.6, 0.2, 0.2] if agg == "weighted" else None
    label_agg = "product" if agg == "product" else "sum"
    out = label_aggregation_loss(scores, labels, cost, label_agg, weights, surrogate, groups=groups)
    if agg == "sum":
        levels = labels.sum(1).double()
    elif agg == "weighted":
        levels = labels.double() @ torch.tensor([1.8, 0.6, 0.6], dtype=torch.float64)  # mean-1 rescaling
    else:
        levels = labels.prod(1).double()
    assert out.loss.item() == pytest.approx(_brute_laa(scores, levels, cost, surrogate, groups), rel=1e-10)


def test_gradients_match_double_loop_autograd():
    scores, labels, _ = _batch(b=9, seed=2)
    s1 = scores.clone().requires_grad_(True)
    loss_aggregation_loss(s1, labels, [1.0, 2.0, 1.0]).loss.backward()
    s2 = scores.clone().requires_grad_(True)
    ref = 0.0
    w = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    for c in range(3):
        pos, neg = torch.nonzero(labels[:, c]).flatten(), torch.nonzero(1 - labels[:, c]).flatten()
        terms = [torch.nn.functional.softplus(-(s2[i] - s2[j])) for i in pos for j in neg]
        ref = ref + w[c] * torch.stack(terms).mean()
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_degenerate_batches():
    scores = torch.randn(6, dtype=torch.float64)
    labels = torch.tensor([[1, 0]] * 3 + [[1, 1]] * 3)  # label 0 has no negative
    out = loss_aggregation_loss(scores, labels)
    assert out.per_label[0].item() == 0.0 and out.num_pairs[0].item() == 0.0 and out.num_pairs[1].item() == 9.0
    same = label_aggregation_loss(scores, torch.ones(6, 2, dtype=torch.long))
    assert same.loss.item() == 0.0 and same.num_pairs.item() == 0.0
    assert loss_aggregation_loss(scores, labels, num_pairs=5).per_label[0].item() == 0.0


def test_sampled_pairs_are_uniform_over_valid_pairs():
    """The sampler's pair frequencies match the uniform distribution over valid ordered pairs."""
    torch.manual_seed(0)
    levels = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.0, 2.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 0, 0])
    from lit_cascades.functional.ranking import _sample_ordered_pairs

    g = torch.Generator().manual_seed(3)
    n = 200_000
    i, j, valid, total = _sample_ordered_pairs(levels[None], groups, n, None, g)
    assert bool(valid.all())
    expected = {
        (a, b)
        for a in range(7)
        for b in range(7)
        if levels[a] > levels[b] and groups[a] == groups[b]
    }
    assert total.item() == len(expected)
    counts: dict[tuple[int, int], int] = {}
    for a, b in zip(i[0].tolist(), j[0].tolist()):
        counts[(a, b)] = counts.get((a, b), 0) + 1
    assert set(counts) == expected
    p = 1 / len(expected)
    tol = 5 * math.sqrt(p * (1 - p) / n)  # 5 standard errors
    for pair in expected:
        assert abs(counts[pair] / n - p) < tol


@pytest.mark.parametrize("mode", ["loss", "label"])
def test_sampled_loss_is_unbiased(mode):
    scores, labels, _ = _batch(b=40, seed=4)
    g = torch.Generator().manual_seed(0)
    if mode == "loss":
        exact = loss_aggregation_loss(scores, labels).loss.item()
        draws = [loss_aggregation_loss(scores, labels, pair_fraction=0.1, generator=g).loss.item() for _ in range(400)]
    else:
        exact = label_aggregation_loss(scores, labels).loss.item()
        draws = [label_aggregation_loss(scores, labels, num_pairs=64, generator=g).loss.item() for _ in range(400)]
    d = torch.tensor(draws)
    stderr = d.std().item() / math.sqrt(len(draws))
    assert abs(d.mean().item() - exact) < 4 * stderr
    assert d.std().item() > 0  # it is really sampling


def test_bad_input_messages():
    s, y, _ = _batch()
    with pytest.raises(ValueError, match="one entry per label"):
        loss_aggregation_loss(s, y, [1.0, 1.0])
    with pytest.raises(ValueError, match="positive number"):
        loss_aggregation_loss(s, y, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        loss_aggregation_loss(s, y, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="binary"):
        label_aggregation_loss(s, y * 2)
    with pytest.raises(ValueError, match="finite"):
        loss_aggregation_loss(torch.full_like(s, float("nan")), y)
    with pytest.raises(ValueError, match=r"shape \[B, K\]"):
        loss_aggregation_loss(s, y[:-1])
    with pytest.raises(ValueError, match="at most one"):
        loss_aggregation_loss(s, y, num_pairs=3, pair_fraction=0.5)
    with pytest.raises(ValueError, match="surrogate"):
        pairwise_surrogate(s, "exp")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Bayes-optimal scorers: brute force over every ranking of a small finite distribution
# ---------------------------------------------------------------------------------------------------------


def _finite_distribution(m=6, k=2, seed=0, deterministic=False):
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    eta = torch.rand(m, k, generator=g, dtype=torch.float64) ** torch.tensor([1.0, 3.0][:k] + [1.0] * (k - 2))
    if deterministic:
        eta = (eta > 0.5).double()
    priors = (mass[:, None] * eta).sum(0) / mass.sum()
    return mass, eta, priors


def _all_rankings(m):
    """Every weak order would be larger; strict orders suffice for the optimum of these linear objectives."""
    for perm in itertools.permutations(range(m)):
        scores = torch.empty(m, dtype=torch.float64)
        scores[list(perm)] = torch.arange(m, dtype=torch.float64)
        yield scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bayes_optimal_loss_aggregation_maximises_weighted_auc(seed):
    mass, eta, priors = _finite_distribution(seed=seed)
    weights = torch.tensor([0.7, 0.3], dtype=torch.float64)
    best = max(float(population_auroc(s, mass, eta) @ weights) for s in _all_rankings(6))
    gamma = bayes_optimal_loss_aggregation(eta, priors, weights)
    assert float(population_auroc(gamma, mass, eta) @ weights) == pytest.approx(best, abs=1e-12)
    # ranking by the raw weighted sum of η (no 1/π(1−π) factor) is generally *not* optimal
    naive = eta @ weights
    assert float(population_auroc(naive, mass, eta) @ weights) <= best + 1e-12


def test_loss_aggregation_prior_factor_matters():
    """A case where Σ a_k η_k (without the 1/(π(1−π)) factor) is strictly suboptimal for LoA."""
    found = False
    for seed in range(20):
        mass, eta, priors = _finite_distribution(seed=seed)
        a = torch.tensor([0.5, 0.5], dtype=torch.float64)
        opt = float(population_auroc(bayes_optimal_loss_aggregation(eta, priors, a), mass, eta) @ a)
        naive = float(population_auroc(eta @ a, mass, eta) @ a)
        found |= naive < opt - 1e-6
    assert found


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("label_agg", ["sum", "product"])
def test_bayes_optimal_label_aggregation_maximises_difference_cost_auc(seed, label_agg):
    mass, eta, _ = _finite_distribution(k=3 if label_agg == "sum" else 2, seed=seed)
    probs, values = independent_level_probs(eta, label_agg)
    best = max(
        float(population_multipartite_auroc(s, mass, probs, values, "difference")) for s in _all_rankings(6)
    )
    gamma = bayes_optimal_label_aggregation(eta, label_agg=label_agg)
    got = float(population_multipartite_auroc(gamma, mass, probs, values, "difference"))
    assert got == pytest.approx(best, abs=1e-12)


def test_effective_weights_favour_the_skewed_label():
    alpha = effective_loss_weights([0.5, 0.5], [0.5, 0.1])
    assert alpha[1] > alpha[0]
    assert (alpha[1] / alpha[0]).item() == pytest.approx((0.5 * 0.5) / (0.1 * 0.9))


@pytest.mark.parametrize("p1,p2", [(0.5, 0.5), (0.3, 0.1), (0.5, 0.05)])
def test_label_dictatorship_closed_forms(p1, p2):
    """Deterministic independent labels: four cells (1,1), (1,0), (0,1), (0,0) (Prop. 6.1)."""
    mass = torch.tensor([p1 * p2, p1 * (1 - p2), (1 - p1) * p2, (1 - p1) * (1 - p2)], dtype=torch.float64)
    eta = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=torch.float64)
    priors = torch.tensor([p1, p2], dtype=torch.float64)
    for weights in ([0.5, 0.5], [0.9, 0.1], [0.1, 0.9]):
        alpha = effective_loss_weights(weights, priors)
        gamma = bayes_optimal_loss_aggregation(eta, priors, weights)
        auc = population_auroc(gamma, mass, eta)
        if torch.isclose(alpha[0], alpha[1]):  # equal effective weights: no dictator, (1,0) ~ (0,1)
            assert gamma[1].item() == pytest.approx(gamma[2].item())
            continue
        dictator = 0 if alpha[0] > alpha[1] else 1
        assert (gamma[1] > gamma[2]).item() == (dictator == 0)  # the (1,0) vs (0,1) edge
        assert auc[dictator].item() == pytest.approx(1.0)
        assert auc[1 - dictator].item() == pytest.approx(lexicographic_loa_auc(float(priors[dictator])))
    laa = population_auroc(bayes_optimal_label_aggregation(eta), mass, eta)
    assert gamma.shape == (4,)
    assert laa[0].item() == pytest.approx(tied_laa_auc(p2))
    assert laa[1].item() == pytest.approx(tied_laa_auc(p1))


def test_aggregate_labels():
    y = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0]])
    assert aggregate_labels(y).tolist() == [2.0, 3.0, 0.0]
    assert aggregate_labels(y, "product").tolist() == [0.0, 1.0, 0.0]
    assert aggregate_labels(y, weights=[2.0, 1.0, 0.0]).tolist() == [2.0, 3.0, 0.0]


def test_bipartite_losses_shapes_and_counts():
    scores, labels, _ = _batch()
    losses, counts = bipartite_pairwise_losses(scores, labels)
    n_pos = labels.sum(0).double()
    torch.testing.assert_close(counts, n_pos * (labels.shape[0] - n_pos))
    assert losses.shape == (3,)


def test_cross_cell_order_hand_computed():
    from lit_cascades.functional.ranking import cross_cell_order

    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [0, 0]])
    # (1,0) scores {3, 1}, (0,1) scores {2, 1}: pairs 3>2, 3>1, 1<2, 1=1 -> (1 + 1 + 0 + 0.5) / 4
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 9.0, -9.0])
    assert cross_cell_order(scores, labels).item() == 0.625
    assert torch.isnan(cross_cell_order(scores, torch.tensor([[1, 1]] * 3 + [[0, 0]] * 3)))
