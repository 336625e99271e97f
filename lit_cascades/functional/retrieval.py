"""Full-corpus dense retrieval (chunked top-k) and rank metrics from ranked lists and qrels.

Used by USTAD (dual-encoder retrieval then cross-encoder reranking, evaluated by MRR@10 and Recall@k as on
MS MARCO) and TASK-former (Recall@K over an image gallery; arXiv:2208.03354).

Ranking convention (every function here): candidates are ordered by descending score and **ties are broken
by the lower corpus index**. :func:`chunked_topk` returns exactly the first ``k`` columns of a stable
descending sort of the full ``[Q, N]`` score matrix (:func:`dense_topk`), without ever building it.

Metrics (per query, then averaged over queries that have at least one relevant document; a query is
*relevant-less* when its qrels hold no document with gain > 0):

* ``mrr@k``: ``1 / rank`` of the first relevant document within the top ``k``, else 0;
* ``recall@k``: relevant documents in the top ``k`` / all relevant documents of the query;
* ``ndcg@k``: ``DCG@k / IDCG@k`` with linear gains (the qrels relevance) and discount ``1/log2(rank + 1)``
  (torchmetrics / scikit-learn definition), ``IDCG@k`` from the query's best possible ranking.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lit_cascades.functional._checks import check_choice, check_finite, check_nonempty

EmptyTargetAction = Literal["skip", "neg", "error"]


# ----------------------------------------------------------------------------------------------- top-k
def _topk_low_index(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` of ``scores [Q, C]`` along dim 1 with ties at the boundary resolved to the lowest column.

    Returns ``(values [Q, k], columns [Q, k])`` in no particular order.
    """
    kth = scores.topk(k, dim=1).values[:, -1:]  # [Q, 1] the k-th largest value
    cols = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    # Everything strictly above the k-th value is in (fewer than k of them); among those equal to it the
    # lowest columns fill the rest. Encode that preference as a key and take the k smallest keys.
    big = scores.shape[1]
    key = torch.where(scores > kth, -1, torch.where(scores == kth, cols, big))
    chosen = key.topk(k, dim=1, largest=False).indices
    return scores.gather(1, chosen), chosen


def _sort_desc_low_index(values: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by descending value, ties by ascending ``index``."""
    order = index.argsort(dim=1, stable=True)
    values, index = values.gather(1, order), index.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), index.gather(1, order)


def _check_embeddings(queries: Tensor, corpus: Tensor, k: int) -> None:
    if queries.ndim != 2 or corpus.ndim != 2:
        raise ValueError(f"`queries` and `corpus` must be [Q, D] and [N, D]; got {tuple(queries.shape)}, "
                         f"{tuple(corpus.shape)}")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"embedding dims differ: queries have D={queries.shape[1]}, corpus D={corpus.shape[1]}")
    check_nonempty("queries", queries)
    check_nonempty("corpus", corpus)
    check_finite("queries", queries)
    check_finite("corpus", corpus)
    if not (isinstance(k, int) and k > 0):
        raise ValueError(f"`k` must be a positive int; got {k!r}")


def dense_topk(queries: Tensor, corpus: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Reference top-``k`` by inner product through the full ``[Q, N]`` score matrix (stable sort).

    Args:
        queries: ``[Q, D]``; corpus: ``[N, D]``; k: list length (clipped to ``N``).

    Returns:
        ``(scores [Q, k], indices [Q, k])``, descending, ties by lower corpus index.
    """
    _check_embeddings(queries, corpus, k)
    scores = queries @ corpus.T
    values, order = scores.sort(dim=1, descending=True, stable=True)
    k = min(k, corpus.shape[0])
    return values[:, :k], order[:, :k]


@torch.no_grad()
def chunked_topk(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    *,
    chunk_size: int = 16384,
    query_chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` corpus documents by inner product, never holding more than ``query_chunk × chunk`` scores.

    Equals :func:`dense_topk` (same order and tie-breaking; scores can differ in the last bit because a
    ``[q, chunk]`` matmul may sum in a different order than the ``[Q, N]`` one, so two documents whose scores
    differ only by rounding may swap). Peak extra memory is
    ``query_chunk_size × (chunk_size + k)`` scores instead of ``Q × N``.

    Args:
        queries: ``[Q, D]`` query embeddings.
        corpus: ``[N, D]`` document embeddings (any device; chunks are moved to the queries' device).
        k: list length (clipped to ``N``).
        chunk_size: corpus rows scored at once.
        query_chunk_size: query rows scored at once.

    Returns:
        ``(scores [Q, k], indices [Q, k])``, descending, ties by lower corpus index.
    """
    _check_embeddings(queries, corpus, k)
    if chunk_size < 1 or query_chunk_size < 1:
        raise ValueError(f"`chunk_size` and `query_chunk_size` must be >= 1; got {chunk_size}, {query_chunk_size}")
    n = corpus.shape[0]
    k = min(k, n)
    out_s, out_i = [], []
    for q0 in range(0, queries.shape[0], query_chunk_size):
        q = queries[q0 : q0 + query_chunk_size]
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for c0 in range(0, n, chunk_size):
            chunk = corpus[c0 : c0 + chunk_size].to(q.device, q.dtype)
            s = q @ chunk.T
            kk = min(k, s.shape[1])
            s, cols = _topk_low_index(s, kk)
            cand_s = torch.cat([best_s, s], dim=1)
            cand_i = torch.cat([best_i, cols + c0], dim=1)
            best_s, best_i = _sort_desc_low_index(cand_s, cand_i)
            best_s, best_i = best_s[:, :k], best_i[:, :k]
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)


def rerank(candidate_ids: Tensor, scores: Tensor, depth: int | None = None) -> Tensor:
    """Reorder the first ``depth`` candidates of each ranked list by ``scores`` (e.g. cross-encoder scores).

    Candidates beyond ``depth`` keep their first-stage order after the reranked head (the usual
    retrieve-then-rerank protocol); ties in ``scores`` keep the first-stage order.

    Args:
        candidate_ids: ``[Q, K]`` first-stage ranked ids.
        scores: ``[Q, depth]`` second-stage scores of ``candidate_ids[:, :depth]``.
        depth: reranking depth (default ``scores.shape[1]``).

    Returns:
        ``[Q, K]`` reranked ids.
    """
    depth = scores.shape[1] if depth is None else depth
    if candidate_ids.ndim != 2 or scores.shape != (candidate_ids.shape[0], depth) or depth > candidate_ids.shape[1]:
        raise ValueError(f"`scores` must be [Q, depth]=[{candidate_ids.shape[0]}, {depth}] with depth <= K="
                         f"{candidate_ids.shape[1] if candidate_ids.ndim == 2 else '?'}; got {tuple(scores.shape)}")
    check_finite("scores", scores)
    order = scores.argsort(dim=1, descending=True, stable=True)
    head = candidate_ids[:, :depth].gather(1, order)
    return torch.cat([head, candidate_ids[:, depth:]], dim=1)


# ----------------------------------------------------------------------------------------------- qrels
@dataclass(frozen=True)
class Qrels:
    """Sparse relevance judgements over integer query / document indices (one row per judged pair).

    Attributes:
        query_index: ``[R]`` int64 query row (index into the evaluated query list).
        doc_index: ``[R]`` int64 corpus row.
        relevance: ``[R]`` float gains; only pairs with gain > 0 count as relevant.
        num_queries: number of queries the indices refer to.
    """

    query_index: Tensor
    doc_index: Tensor
    relevance: Tensor
    num_queries: int

    def __post_init__(self) -> None:
        r = self.query_index.shape
        if self.query_index.ndim != 1 or self.doc_index.shape != r or self.relevance.shape != r:
            raise ValueError(f"Qrels fields must be 1-D of equal length; got query_index {tuple(r)}, doc_index "
                             f"{tuple(self.doc_index.shape)}, relevance {tuple(self.relevance.shape)}")
        if r[0] and (int(self.query_index.min()) < 0 or int(self.query_index.max()) >= self.num_queries):
            raise ValueError(f"`query_index` must be in [0, {self.num_queries}); got range "
                             f"[{int(self.query_index.min())}, {int(self.query_index.max())}]")
        key = self._keys(self.query_index, self.doc_index)
        if torch.unique(key).numel() != key.numel():
            raise ValueError("Qrels hold duplicate (query, document) pairs; expected one judgement per pair")

    @staticmethod
    def _keys(q: Tensor, d: Tensor) -> Tensor:
        return q.long() * (1 << 32) + d.long()

    @classmethod
    def from_dict(
        cls,
        qrels: Mapping[str, Mapping[str, float]],
        query_ids: Sequence[str],
        doc_ids: Sequence[str],
    ) -> Qrels:
        """Build from ``{query_id: {doc_id: gain}}`` (TREC / BEIR style) and the evaluated id lists.

        Judgements of queries not in ``query_ids`` are ignored (evaluating a subset of queries is common);
        a judged document missing from ``doc_ids`` raises, because the metrics would silently be wrong.
        """
        q_pos = {q: i for i, q in enumerate(query_ids)}
        if len(q_pos) != len(query_ids):
            raise ValueError("`query_ids` hold duplicates; expected unique ids")
        d_pos = {d: i for i, d in enumerate(doc_ids)}
        if len(d_pos) != len(doc_ids):
            raise ValueError("`doc_ids` hold duplicates; expected unique ids")
        qi, di, rel, missing = [], [], [], []
        for q, docs in qrels.items():
            if q not in q_pos:
                continue
            for d, g in docs.items():
                if d not in d_pos:
                    missing.append(d)
                    continue
                qi.append(q_pos[q])
                di.append(d_pos[d])
                rel.append(float(g))
        if missing:
            raise ValueError(f"{len(missing)} judged documents are not in the corpus (e.g. {missing[:3]}); "
                             "the corpus must contain every document in the qrels")
        return cls(torch.tensor(qi, dtype=torch.long), torch.tensor(di, dtype=torch.long),
                   torch.tensor(rel, dtype=torch.float), num_queries=len(query_ids))

    @classmethod
    def from_targets(cls, targets: Tensor, num_docs: int | None = None) -> Qrels:
        """One relevant document per query (e.g. text/sketch → image galleries): query ``i`` ↔ ``targets[i]``.

        Then ``recall@k`` is the hit rate of the target within the top ``k`` (the usual image-retrieval R@K).

        Args:
            targets: ``[Q]`` corpus row of each query's single relevant document.
            num_docs: corpus size, to check the targets against (optional).
        """
        if targets.ndim != 1:
            raise ValueError(f"`targets` must be [Q]; got shape {tuple(targets.shape)}")
        targets = targets.long().cpu()
        if num_docs is not None and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_docs):
            raise ValueError(f"`targets` must be corpus rows in [0, {num_docs}); got range "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        q = targets.numel()
        return cls(torch.arange(q), targets, torch.ones(q), num_queries=q)

    def gains(self, ranked_ids: Tensor, query_index: Tensor | None = None) -> Tensor:
        """Gains ``[Q, K]`` of the ranked documents ``ranked_ids [Q, K]`` of queries ``query_index [Q]``.

        ``query_index`` defaults to ``arange(Q)``. Unjudged documents have gain 0.
        """
        query_index = self._default_index(ranked_ids.shape[0], query_index, ranked_ids.device)
        ranked_ids = ranked_ids.to(self.doc_index.device)
        query_index = query_index.to(self.doc_index.device)
        if self.query_index.numel() == 0:
            return torch.zeros(ranked_ids.shape, dtype=torch.float)
        keys, order = self._keys(self.query_index, self.doc_index).sort()
        rel = self.relevance[order]
        probe = self._keys(query_index[:, None].expand_as(ranked_ids), ranked_ids)
        pos = torch.searchsorted(keys, probe).clamp(max=keys.numel() - 1)
        hit = keys[pos] == probe
        return torch.where(hit, rel[pos], torch.zeros_like(rel[pos]))

    def summary(self, query_index: Tensor, ndcg_k: int) -> tuple[Tensor, Tensor]:
        """``(num_relevant [Q], ideal DCG@ndcg_k [Q])`` of the queries ``query_index [Q]``."""
        query_index = query_index.to(self.query_index.device)
        pos = self.relevance > 0
        num_rel = torch.zeros(self.num_queries, dtype=torch.long).index_add_(
            0, self.query_index[pos], torch.ones(int(pos.sum()), dtype=torch.long))
        # per-query gains sorted descending: sort by (query asc, gain desc)
        order = torch.argsort(-self.relevance, stable=True)
        order = order[torch.argsort(self.query_index[order], stable=True)]
        q_sorted, g_sorted = self.query_index[order], self.relevance[order].clamp(min=0)
        start = torch.searchsorted(q_sorted, torch.arange(self.num_queries))
        rank = torch.arange(q_sorted.numel()) - start[q_sorted]  # 0-based rank within the query
        keep = rank < ndcg_k
        disc = 1.0 / torch.log2(rank[keep].float() + 2.0)
        idcg = torch.zeros(self.num_queries).index_add_(0, q_sorted[keep], g_sorted[keep] * disc)
        return num_rel[query_index], idcg[query_index]

    def _default_index(self, q: int, query_index: Tensor | None, device: torch.device) -> Tensor:
        if query_index is None:
            if q != self.num_queries:
                raise ValueError(f"`query_index` is needed: ranked lists cover {q} queries, qrels {self.num_queries}")
            return torch.arange(q, device=device)
        if query_index.shape != (q,):
            raise ValueError(f"`query_index` must be [Q]=[{q}]; got {tuple(query_index.shape)}")
        return query_index


# ----------------------------------------------------------------------------------------------- metrics
def metric_names(recall_ks: Sequence[int] = (1, 10, 100), mrr_k: int = 10, ndcg_k: int = 10) -> list[str]:
    """Names of the metrics :func:`rank_metrics` returns, in order."""
    return [f"mrr@{mrr_k}", *(f"recall@{k}" for k in recall_ks), f"ndcg@{ndcg_k}"]


def rank_metrics_per_query(
    ranked_gains: Tensor,
    num_relevant: Tensor,
    ideal_dcg: Tensor,
    *,
    recall_ks: Sequence[int] = (1, 10, 100),
    mrr_k: int = 10,
    ndcg_k: int = 10,
) -> dict[str, Tensor]:
    """Per-query MRR@k, Recall@k, NDCG@k from the gains of ranked lists.

    Args:
        ranked_gains: ``[Q, K]`` gain of the document at each rank (0 = not relevant). Ranks beyond ``K``
            count as not retrieved.
        num_relevant: ``[Q]`` number of documents with gain > 0 in the qrels of each query.
        ideal_dcg: ``[Q]`` best achievable DCG@``ndcg_k`` of each query.

    Returns:
        ``{name: [Q] float}`` (see :func:`metric_names`); entries of relevant-less queries are 0.
    """
    if ranked_gains.ndim != 2:
        raise ValueError(f"`ranked_gains` must be [Q, K]; got {tuple(ranked_gains.shape)}")
    q = ranked_gains.shape[0]
    if num_relevant.shape != (q,) or ideal_dcg.shape != (q,):
        raise ValueError(f"`num_relevant` and `ideal_dcg` must be [Q]=[{q}]; got {tuple(num_relevant.shape)}, "
                         f"{tuple(ideal_dcg.shape)}")
    for name, k in [("mrr_k", mrr_k), ("ndcg_k", ndcg_k), *(("recall_ks", k) for k in recall_ks)]:
        if not (isinstance(k, int) and k > 0):
            raise ValueError(f"`{name}` must hold positive ints; got {k!r}")
    g = ranked_gains.float()
    rel = g > 0
    n_rel = num_relevant.float()
    has = n_rel > 0
    out: dict[str, Tensor] = {}
    ranks = torch.arange(1, g.shape[1] + 1, dtype=torch.float, device=g.device)
    hit = rel[:, :mrr_k]
    first = torch.where(hit.any(1), hit.float().argmax(1).float() + 1, torch.full((q,), float("inf"), device=g.device))
    out[f"mrr@{mrr_k}"] = 1.0 / first
    for k in recall_ks:
        found = rel[:, :k].sum(1).float()
        out[f"recall@{k}"] = torch.where(has, found / n_rel.clamp(min=1), torch.zeros_like(found))
    dcg = (g[:, :ndcg_k] / torch.log2(ranks[:ndcg_k] + 1)).sum(1)
    out[f"ndcg@{ndcg_k}"] = torch.where(ideal_dcg > 0, dcg / ideal_dcg.clamp(min=1e-12), torch.zeros_like(dcg))
    return out


def aggregate_rank_metrics(
    per_query: Mapping[str, Tensor],
    num_relevant: Tensor,
    empty_target_action: EmptyTargetAction = "skip",
) -> dict[str, Tensor]:
    """Average per-query metrics, handling queries without any relevant document.

    ``empty_target_action``: ``"skip"`` (default, as trec_eval / the MS MARCO script: excluded from the
    mean), ``"neg"`` (they score 0) or ``"error"``. Relevant-less queries are never dropped silently: the
    result has ``queries_without_relevant`` and ``num_queries``, and ``"skip"`` warns when there are any.
    """
    check_choice("empty_target_action", empty_target_action, ("skip", "neg", "error"))
    has = num_relevant > 0
    n_empty = int((~has).sum())
    if n_empty and empty_target_action == "error":
        raise ValueError(f"{n_empty} of {has.numel()} queries have no relevant document in the qrels")
    if n_empty and empty_target_action == "skip":
        warnings.warn(f"{n_empty} of {has.numel()} queries have no relevant document in the qrels; they are "
                      "excluded from the averages (reported as `queries_without_relevant`)", stacklevel=2)
    keep = has if empty_target_action == "skip" else torch.ones_like(has)
    out = {}
    for name, v in per_query.items():
        out[name] = v[keep].mean() if bool(keep.any()) else v.new_tensor(0.0)
    out["queries_without_relevant"] = torch.tensor(float(n_empty))
    out["num_queries"] = torch.tensor(float(has.numel()))
    return out


def retrieval_metrics(
    ranked_ids: Tensor,
    qrels: Qrels,
    query_index: Tensor | None = None,
    *,
    recall_ks: Sequence[int] = (1, 10, 100),
    mrr_k: int = 10,
    ndcg_k: int = 10,
    empty_target_action: EmptyTargetAction = "skip",
) -> dict[str, Tensor]:
    """MRR@k, Recall@k, NDCG@k of ranked lists ``ranked_ids [Q, K]`` (corpus indices) against ``qrels``.

    Returns scalars keyed by :func:`metric_names` plus ``queries_without_relevant`` and ``num_queries``.
    """
    query_index = qrels._default_index(ranked_ids.shape[0], query_index, ranked_ids.device)
    gains = qrels.gains(ranked_ids, query_index)
    num_rel, idcg = qrels.summary(query_index, ndcg_k)
    per_q = rank_metrics_per_query(gains, num_rel, idcg, recall_ks=recall_ks, mrr_k=mrr_k, ndcg_k=ndcg_k)
    return aggregate_rank_metrics(per_q, num_rel, empty_target_action)
