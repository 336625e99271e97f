import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lit_cascades.functional import binary_auroc, deferral_auroc, level_pair_auroc, multipartite_auroc


@pytest.mark.parametrize("n_distinct", [10_000, 3])  # continuous scores, then heavy ties
def test_binary_auroc_equals_sklearn_per_column(n_distinct):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, n_distinct, (300,), generator=g).double() / n_distinct
    target = (torch.rand(300, 4, generator=g) < torch.tensor([0.5, 0.1, 0.9, 0.3])).long()
    auc = binary_auroc(scores, target)
    assert auc.shape == (4,)
    for k in range(4):
        assert auc[k].item() == pytest.approx(roc_auc_score(target[:, k].numpy(), scores.numpy()), abs=1e-12)
        assert binary_auroc(scores, target[:, k]).item() == pytest.approx(auc[k].item(), abs=1e-12)
    # the deferral AUROC is the same statistic
    assert deferral_auroc(scores, target[:, 0].bool()).item() == pytest.approx(auc[0].item(), abs=1e-12)


def test_binary_auroc_hand_computed_ties_and_single_class():
    # positives {0.4, 0.8}, negatives {0.1, 0.4}: pairs (0.4>0.1)=1, (0.4=0.4)=1/2, (0.8>*)=2 -> 3.5/4
    assert binary_auroc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 0, 1, 1])).item() == 0.875
    out = binary_auroc(torch.rand(5), torch.tensor([[1, 0], [1, 1], [1, 0], [1, 1], [1, 0]]))
    assert torch.isnan(out[0]) and not torch.isnan(out[1])


def test_binary_auroc_bad_input():
    with pytest.raises(ValueError, match="binary"):
        binary_auroc(torch.rand(4), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="finite"):
        binary_auroc(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"shape \[N\] or \[N, K\]"):
        binary_auroc(torch.rand(4), torch.tensor([0, 1, 1]))


def _brute_level_pairs(scores, levels):
    vals = sorted(set(levels.tolist()))
    out = np.full((len(vals), len(vals)), np.nan)
    for a, va in enumerate(vals):
        for b, vb in enumerate(vals):
            si, sj = scores[levels == va], scores[levels == vb]
            out[a, b] = np.mean([(x > y) + 0.5 * (x == y) for x in si.tolist() for y in sj.tolist()])
    return out, vals


@pytest.mark.parametrize("n_distinct", [1000, 4])
def test_level_pair_and_multipartite_auroc_equal_brute_force(n_distinct):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, n_distinct, (40,), generator=g).double()
    levels = torch.randint(0, 3, (40,), generator=g)
    auc, counts = level_pair_auroc(scores, levels)
    brute, _ = _brute_level_pairs(scores, levels)
    np.testing.assert_allclose(auc.numpy(), brute, atol=1e-12)
    assert counts.tolist() == [float((levels == v).sum()) for v in range(3)]
    # multipartite: brute-force average over ordered pairs of c * H
    s, lv = scores.tolist(), levels.double().tolist()
    for cost in ("uniform", "difference"):
        num = den = 0.0
        for i in range(40):
            for j in range(40):
                if lv[i] > lv[j]:
                    c = (lv[i] - lv[j]) if cost == "difference" else 1.0
                    num += c * ((s[i] > s[j]) + 0.5 * (s[i] == s[j]))
                    den += 1
        assert multipartite_auroc(scores, levels.double() * 0.5, cost).item() == pytest.approx(
            num / den * (0.5 if cost == "difference" else 1.0), abs=1e-12
        )
    # two levels: the multipartite AUROC is the binary AUROC
    binary = (levels > 0).long()
    assert multipartite_auroc(scores, binary.double()).item() == pytest.approx(
        roc_auc_score(binary.numpy(), scores.numpy()), abs=1e-12
    )


def test_difference_cost_auroc_is_prior_weighted_per_label_auroc():
    """Sample identity behind Prop. 5.4: with Ȳ = Σ_k Y_k and the difference cost,
    Σ_ij (Ȳ_i − Ȳ_j)₊ H_ij = ½ Σ_k P_k N_k (2 AUC_k − 1) + ¼ Σ_ij |Ȳ_i − Ȳ_j|,
    i.e. label aggregation weighs label k's AUC by its number of pairs P_k N_k ∝ π_k (1 − π_k)."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 7, (80,), generator=g).double()  # with ties
    labels = (torch.rand(80, 3, generator=g) < torch.tensor([0.5, 0.2, 0.1])).long()
    levels = labels.sum(1).double()
    ordered = float((levels[:, None] > levels[None, :]).sum())
    lhs = multipartite_auroc(scores, levels, "difference").item() * ordered
    p = labels.sum(0).double()
    pn = p * (80 - p)
    rhs = 0.5 * float((pn * (2 * binary_auroc(scores, labels) - 1)).sum())
    rhs += 0.25 * float((levels[:, None] - levels[None, :]).abs().sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)


@pytest.mark.parametrize("n_distinct", [4, 1000])
def test_multi_column_and_level_auroc_with_small_blocks(monkeypatch, n_distinct):
    """Blocks of 5 (tie groups straddle block edges) give the same per-column AUROCs as sklearn."""
    import lit_cascades.functional.auroc as auroc_mod

    monkeypatch.setattr(auroc_mod, "CHUNK", 5)
    g = torch.Generator().manual_seed(11)
    scores = torch.randint(0, n_distinct, (83,), generator=g).float()
    target = torch.rand(83, 3, generator=g) < 0.4
    ours = binary_auroc(scores, target)
    for k in range(3):
        assert ours[k].item() == pytest.approx(roc_auc_score(target[:, k].numpy(), scores.numpy()), abs=1e-12)
    levels = target.sum(1)
    auc, _ = level_pair_auroc(scores, levels)
    for a, b in ((1, 0), (2, 0), (3, 1)):
        sel = (levels == a) | (levels == b)
        if (levels == a).any() and (levels == b).any():
            exp = roc_auc_score((levels[sel] == a).numpy(), scores[sel].numpy())
            assert auc[a, b].item() == pytest.approx(exp, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_every_score_dtype_sorts_the_same(dtype):
    """NumPy's argsort (CPU float32/64, int32/64) and torch.sort (other dtypes) give sklearn's AUROC."""
    g = torch.Generator().manual_seed(4)
    raw = torch.randint(0, 30, (200,), generator=g)
    scores = raw.to(dtype) if dtype == torch.int64 else (raw / 30).to(dtype)
    target = torch.rand(200, generator=g) < 0.5
    exp = roc_auc_score(target.numpy(), raw.numpy())  # the dtype conversions keep the order and ties of raw
    assert binary_auroc(scores, target).item() == pytest.approx(exp, abs=1e-12)
