"""Chunked top-k vs the full matrix, and rank metrics vs torchmetrics / brute force (ties included)."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.retrieval import (
    retrieval_normalized_dcg,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

from lit_cascades.functional.retrieval import Qrels, chunked_topk, dense_topk, rerank, retrieval_metrics


def _tied_embeddings(q, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-1, 2, (q, d), generator=g).float(), torch.randint(-1, 2, (n, d), generator=g).float())


def test_dense_topk_orders_ties_by_lower_index():
    queries, corpus = _tied_embeddings(6, 40, 3, 0)
    scores, idx = dense_topk(queries, corpus, 15)
    full = queries @ corpus.T
    for i in range(6):
        brute = sorted(range(40), key=lambda j: (-float(full[i, j]), j))[:15]
        assert idx[i].tolist() == brute
        assert scores[i].tolist() == [float(full[i, j]) for j in brute]


@pytest.mark.parametrize("data", ["random", "ties"])
@pytest.mark.parametrize(("k", "chunk", "qchunk"), [(5, 7, 4), (10, 3, 100), (25, 64, 1), (100, 16, 3), (1, 1, 2)])
def test_chunked_topk_equals_full_matrix(data, k, chunk, qchunk):
    if data == "ties":
        queries, corpus = _tied_embeddings(13, 50, 4, k)
    else:
        g = torch.Generator().manual_seed(k)
        queries, corpus = torch.randn(13, 8, generator=g), torch.randn(50, 8, generator=g)
    s_c, i_c = chunked_topk(queries, corpus, k, chunk_size=chunk, query_chunk_size=qchunk)
    s_d, i_d = dense_topk(queries, corpus, k)
    assert i_c.shape == (13, min(k, 50))
    assert torch.equal(i_c, i_d)
    if data == "ties":  # integer-valued scores are exact, whatever the matmul blocking
        assert torch.equal(s_c, s_d)
    else:  # a [Q, chunk] matmul may round differently from the [Q, N] one in the last bit
        torch.testing.assert_close(s_c, s_d, rtol=1e-6, atol=1e-6)


def test_topk_bad_input():
    with pytest.raises(ValueError, match="embedding dims differ"):
        chunked_topk(torch.randn(2, 3), torch.randn(5, 4), 2)
    with pytest.raises(ValueError, match="finite"):
        chunked_topk(torch.randn(2, 3), torch.full((5, 3), float("nan")), 2)
    with pytest.raises(ValueError, match="positive int"):
        dense_topk(torch.randn(2, 3), torch.randn(5, 3), 0)
    with pytest.raises(ValueError, match="empty"):
        chunked_topk(torch.randn(2, 3), torch.randn(0, 3), 2)


def _random_qrels(nq, n, seed, graded):
    g = torch.Generator().manual_seed(seed)
    qi, di, rel = [], [], []
    for q in range(nq):
        docs = torch.randperm(n, generator=g)[: int(torch.randint(1, 5, (1,), generator=g))]
        for d in docs.tolist():
            qi.append(q)
            di.append(d)
            rel.append(float(torch.randint(1, 4, (1,), generator=g)) if graded else 1.0)
    return Qrels(torch.tensor(qi), torch.tensor(di), torch.tensor(rel), num_queries=nq)


def _target_row(qrels, q, n):
    t = torch.zeros(n, dtype=torch.long)
    m = qrels.query_index == q
    t[qrels.doc_index[m]] = qrels.relevance[m].long()
    return t


@pytest.mark.parametrize("graded", [False, True])
def test_metrics_match_torchmetrics_on_full_corpus(graded):
    nq, n = 12, 200
    g = torch.Generator().manual_seed(5)
    queries, corpus = torch.randn(nq, 16, generator=g), torch.randn(n, 16, generator=g)
    qrels = _random_qrels(nq, n, 6, graded)
    _, ranked = chunked_topk(queries, corpus, 100, chunk_size=37)
    ours = retrieval_metrics(ranked, qrels, recall_ks=(1, 10, 100))
    full = queries @ corpus.T  # no ties with random floats
    # shifted to be positive: torchmetrics' reciprocal rank treats documents with preds <= 0 as not relevant
    full = full - full.min() + 1
    ref = {"mrr@10": [], "recall@1": [], "recall@10": [], "recall@100": [], "ndcg@10": []}
    for q in range(nq):
        t = _target_row(qrels, q, n)
        ref["mrr@10"].append(retrieval_reciprocal_rank(full[q], t > 0, top_k=10))
        for k in (1, 10, 100):
            ref[f"recall@{k}"].append(retrieval_recall(full[q], t > 0, top_k=k))
        ref["ndcg@10"].append(retrieval_normalized_dcg(full[q], t, top_k=10))
    for name, vals in ref.items():
        assert ours[name].item() == pytest.approx(torch.stack(vals).mean().item(), abs=1e-6), name
    assert ours["num_queries"].item() == nq and ours["queries_without_relevant"].item() == 0


def _brute_metrics(full, qrels, q, k=10):
    """Metrics of one query from a Python sort by (-score, index)."""
    n = full.shape[1]
    order = sorted(range(n), key=lambda j: (-float(full[q, j]), j))
    t = _target_row(qrels, q, n).tolist()
    first = next((r + 1 for r, j in enumerate(order[:k]) if t[j] > 0), None)
    dcg = sum(t[j] / math.log2(r + 2) for r, j in enumerate(order[:k]))
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(t, reverse=True)[:k]))
    n_rel = sum(x > 0 for x in t)
    return {"mrr@10": 1 / first if first else 0.0,
            "recall@1": sum(t[j] > 0 for j in order[:1]) / n_rel,
            "recall@10": sum(t[j] > 0 for j in order[:k]) / n_rel,
            "ndcg@10": dcg / idcg}, order


def test_metrics_with_ties_match_brute_force_and_torchmetrics():
    nq, n = 15, 60
    queries, corpus = _tied_embeddings(nq, n, 3, 9)  # many exactly tied scores
    qrels = _random_qrels(nq, n, 10, graded=True)
    _, ranked = chunked_topk(queries, corpus, 30, chunk_size=11)
    ours = retrieval_metrics(ranked, qrels, recall_ks=(1, 10))
    full = queries @ corpus.T
    brute = {k: 0.0 for k in ("mrr@10", "recall@1", "recall@10", "ndcg@10")}
    tm = {k: 0.0 for k in brute}
    for q in range(nq):
        m, order = _brute_metrics(full, qrels, q)
        for key in brute:
            brute[key] += m[key] / nq
        # torchmetrics on the same ranking written as tie-free scores (its sort of tied scores is unspecified)
        preds = torch.empty(n)
        preds[torch.tensor(order)] = n - torch.arange(n, dtype=torch.float)  # > 0, see above
        t = _target_row(qrels, q, n)
        tm["mrr@10"] += retrieval_reciprocal_rank(preds, t > 0, top_k=10).item() / nq
        tm["recall@1"] += retrieval_recall(preds, t > 0, top_k=1).item() / nq
        tm["recall@10"] += retrieval_recall(preds, t > 0, top_k=10).item() / nq
        tm["ndcg@10"] += retrieval_normalized_dcg(preds, t, top_k=10).item() / nq
    for key in brute:
        assert ours[key].item() == pytest.approx(brute[key], abs=1e-6), key
        assert ours[key].item() == pytest.approx(tm[key], abs=1e-6), key


def test_hand_computed_case():
    # query 0: relevant {2 (gain 2), 5 (gain 1)}; ranked [5, 1, 2]; query 1: relevant {0}; ranked [3, 4, 1]
    qrels = Qrels(torch.tensor([0, 0, 1]), torch.tensor([2, 5, 0]), torch.tensor([2.0, 1.0, 1.0]), num_queries=2)
    m = retrieval_metrics(torch.tensor([[5, 1, 2], [3, 4, 1]]), qrels, recall_ks=(1, 3), mrr_k=10, ndcg_k=3)
    assert m["mrr@10"].item() == pytest.approx((1.0 + 0.0) / 2)
    assert m["recall@1"].item() == pytest.approx((0.5 + 0) / 2)
    assert m["recall@3"].item() == pytest.approx((1.0 + 0) / 2)
    ndcg0 = (1 + 2 / 2) / (2 + 1 / math.log2(3))
    assert m["ndcg@3"].item() == pytest.approx(ndcg0 / 2)


def test_queries_without_relevant_are_reported():
    qrels = Qrels(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([1.0, 0.0]), num_queries=3)
    ranked = torch.tensor([[1, 0], [0, 1], [0, 1]])  # query 1 unjudged, query 2 judged non-relevant
    with pytest.warns(UserWarning, match="2 of 3 queries have no relevant"):
        skip = retrieval_metrics(ranked, qrels, recall_ks=(1,))
    assert skip["mrr@10"].item() == 1.0 and skip["queries_without_relevant"].item() == 2
    neg = retrieval_metrics(ranked, qrels, recall_ks=(1,), empty_target_action="neg")
    assert neg["mrr@10"].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no relevant document"):
        retrieval_metrics(ranked, qrels, empty_target_action="error")


def test_qrels_from_dict():
    qrels = Qrels.from_dict({"q1": {"d2": 1}, "q9": {"d1": 1}, "q0": {"d0": 2, "d2": 1}},
                            query_ids=["q0", "q1"], doc_ids=["d0", "d1", "d2"])
    assert qrels.num_queries == 2
    got = sorted(zip(qrels.query_index.tolist(), qrels.doc_index.tolist(), qrels.relevance.tolist()))
    assert got == [(0, 0, 2.0), (0, 2, 1.0), (1, 2, 1.0)]  # q9 (not evaluated) is ignored
    assert qrels.gains(torch.tensor([[2, 1, 0], [0, 2, 1]])).tolist() == [[1, 0, 2], [0, 1, 0]]
    with pytest.raises(ValueError, match="not in the corpus"):
        Qrels.from_dict({"q0": {"dx": 1}}, ["q0"], ["d0"])
    with pytest.raises(ValueError, match="`doc_ids` hold duplicates"):
        Qrels.from_dict({}, ["q0"], ["d0", "d0"])
    with pytest.raises(ValueError, match="duplicate"):
        Qrels(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.ones(2), num_queries=1)


def test_rerank_reorders_head_and_keeps_tail():
    ids = torch.tensor([[4, 7, 1, 9, 3]])
    out = rerank(ids, torch.tensor([[0.1, 0.9, 0.5]]))
    assert out.tolist() == [[7, 1, 4, 9, 3]]
    assert rerank(ids, torch.tensor([[1.0, 1.0, 2.0]])).tolist() == [[1, 4, 7, 9, 3]]  # ties keep DE order
    with pytest.raises(ValueError, match="depth"):
        rerank(ids, torch.zeros(1, 6))
