"""TASK-former's functional pieces: asymmetric loss, late fusion, Recall@K of single-target galleries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_cascades.functional import asymmetric_loss, late_fusion
from lit_cascades.functional.retrieval import Qrels, chunked_topk, retrieval_metrics
from lit_cascades.metrics.retrieval import RetrievalMetrics


# ------------------------------------------------------------------------------------------ asymmetric loss
def _asl_oracle(z, y, gn, gp, m):
    """Element by element from Ridnik et al. (2021), eq. 3–5."""
    total = 0.0
    for b in range(z.shape[0]):
        for c in range(z.shape[1]):
            p = 1 / (1 + math.exp(-float(z[b, c])))
            if y[b, c]:
                total -= (1 - p) ** gp * math.log(max(p, 1e-8))
            else:
                pm = max(p - m, 0.0)
                total -= pm**gn * math.log(max(1 - pm, 1e-8))
    return total


@pytest.mark.parametrize(("gn", "gp", "m"), [(4.0, 1.0, 0.05), (2.0, 0.0, 0.2), (0.0, 0.0, 0.0)])
def test_asymmetric_loss_matches_formula(gn, gp, m):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, generator=g) * 3
    y = (torch.rand(5, 7, generator=g) < 0.3).float()
    expected = _asl_oracle(z, y, gn, gp, m)
    assert asymmetric_loss(z, y, gamma_neg=gn, gamma_pos=gp, clip=m, reduction="sum").item() == pytest.approx(
        expected, rel=1e-5)
    assert asymmetric_loss(z, y, gamma_neg=gn, gamma_pos=gp, clip=m).item() == pytest.approx(expected / 5, rel=1e-5)
    per = asymmetric_loss(z, y, gamma_neg=gn, gamma_pos=gp, clip=m, reduction="none")
    assert per.shape == (5,) and per.sum().item() == pytest.approx(expected, rel=1e-5)


def test_asymmetric_loss_without_focusing_is_binary_cross_entropy():
    z, y = torch.randn(4, 6), (torch.rand(4, 6) < 0.5).float()
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="sum") / 4
    assert asymmetric_loss(z, y, gamma_neg=0, gamma_pos=0, clip=0).item() == pytest.approx(bce.item(), rel=1e-5)


def test_asymmetric_loss_clip_ignores_easy_negatives():
    z = torch.tensor([[-5.0, 5.0]])  # p ≈ 0.0067 < clip: the negative contributes exactly 0
    y = torch.tensor([[0.0, 1.0]])
    z.requires_grad_(True)
    loss = asymmetric_loss(z, y, clip=0.05)
    loss.backward()
    assert z.grad[0, 0].item() == 0.0 and torch.isfinite(z.grad).all()


@pytest.mark.parametrize(("z", "y", "match"), [
    (torch.randn(3), torch.zeros(3), r"\[B, C\]"),
    (torch.randn(2, 3), torch.zeros(2, 4), "shape"),
    (torch.randn(2, 3), torch.full((2, 3), 0.5), "binary"),
    (torch.full((2, 3), float("nan")), torch.zeros(2, 3), "finite"),
])
def test_asymmetric_loss_bad_input(z, y, match):
    with pytest.raises(ValueError, match=match):
        asymmetric_loss(z, y)


# ------------------------------------------------------------------------------------------ late fusion
def test_fusion_is_normalised_mean_of_normalised_embeddings():
    t, s = torch.randn(6, 5), torch.randn(6, 5) * 3
    expected = F.normalize((F.normalize(t, dim=-1) + F.normalize(s, dim=-1)) / 2, dim=-1)
    torch.testing.assert_close(late_fusion([t, s]), expected)
    raw = late_fusion([t, s], renormalize=False)  # the official code's (t + s) / 2
    torch.testing.assert_close(raw, (F.normalize(t, dim=-1) + F.normalize(s, dim=-1)) / 2)
    assert (raw.norm(dim=-1) <= 1 + 1e-6).all()


def test_fusion_uses_the_modalities_present():
    t, s = torch.randn(3, 4), torch.randn(3, 4)
    tp, sp = torch.tensor([True, True, False]), torch.tensor([True, False, True])
    out = late_fusion([t, s], [tp, sp])
    torch.testing.assert_close(out[0], late_fusion([t[:1], s[:1]])[0])
    torch.testing.assert_close(out[1], F.normalize(t[1], dim=-1))
    torch.testing.assert_close(out[2], F.normalize(s[2], dim=-1))
    with pytest.raises(ValueError, match="no modality"):
        late_fusion([t, s], [tp, torch.tensor([True, False, False])])
    with pytest.raises(ValueError, match="shape"):
        late_fusion([t, torch.randn(3, 5)])


# ------------------------------------------------------------------------------------------ Recall@K
def _brute_recall(scores, targets, k):
    """Hit rate of each query's single target among its k best columns (ties: lower column first)."""
    hits = 0
    for q in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: (-float(scores[q, j]), j))
        hits += int(targets[q]) in order[:k]
    return hits / scores.shape[0]


def test_recall_at_k_with_one_target_equals_brute_force_with_ties():
    g = torch.Generator().manual_seed(4)
    queries = torch.randint(-1, 2, (40, 3), generator=g).float()  # few distinct scores: many ties
    gallery = torch.randint(-1, 2, (40, 3), generator=g).float()
    targets = torch.randperm(40, generator=g)
    _, ranked = chunked_topk(queries, gallery, 10, chunk_size=7, query_chunk_size=9)
    qrels = Qrels.from_targets(targets, num_docs=40)
    ours = retrieval_metrics(ranked, qrels, recall_ks=(1, 5, 10))
    metric = RetrievalMetrics(recall_ks=(1, 5, 10))
    for lo in range(0, 40, 16):
        idx = torch.arange(lo, min(lo + 16, 40))
        metric.update(ranked[idx], qrels, idx)
    batched = metric.compute()
    for k in (1, 5, 10):
        expected = _brute_recall(queries @ gallery.T, targets, k)
        assert ours[f"recall@{k}"].item() == pytest.approx(expected), k
        assert batched[f"recall@{k}"].item() == pytest.approx(expected), k


def test_qrels_from_targets_checks_range():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        Qrels.from_targets(torch.tensor([0, 3]), num_docs=3)
    with pytest.raises(ValueError, match=r"\[Q\]"):
        Qrels.from_targets(torch.zeros(2, 2))
