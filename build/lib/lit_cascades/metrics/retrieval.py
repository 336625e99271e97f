"""Epoch-level retrieval metrics (MRR@k, Recall@k, NDCG@k) over full-corpus ranked lists, DDP-synced.

The state holds, per evaluated query, the gains of its top-``K`` ranked documents and a summary of its qrels
(number of relevant documents, ideal DCG), concatenated across batches and ranks (``dist_reduce_fx="cat"``).
Queries seen twice (``DistributedSampler`` pads the last batch by repeating samples) are counted once when a
``query_index`` is given, so 1 and 2 processes give the same value.

torchmetrics' ``RetrievalMRR`` / ``RetrievalRecall`` / ``RetrievalNormalizedDCG`` score a *given* candidate
list per query and would need every relevant-but-unretrieved document appended as a fake candidate; this
class works from the ranked top-``K`` lists of a full-corpus search instead, and the tests check it against
those torchmetrics functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lit_cascades.functional.retrieval import (
    EmptyTargetAction,
    Qrels,
    aggregate_rank_metrics,
    rank_metrics_per_query,
)


class RetrievalMetrics(Metric):
    """MRR@``mrr_k``, Recall@``recall_ks``, NDCG@``ndcg_k`` accumulated over an epoch.

    ``update(ranked_ids [Q, K], qrels, query_index [Q])`` with ``ranked_ids`` corpus indices ranked best
    first (e.g. from :func:`~lit_cascades.functional.retrieval.chunked_topk`) and ``query_index`` the rows of
    the queries in ``qrels``. ``compute()`` returns ``{"mrr@10": ..., "recall@1": ..., ..., "ndcg@10": ...,
    "queries_without_relevant": ..., "num_queries": ...}``.

    Args:
        recall_ks: cut-offs of Recall@k (MS MARCO reports 1/10/100/1000).
        mrr_k: cut-off of MRR (MS MARCO: 10).
        ndcg_k: cut-off of NDCG (TREC-DL: 10).
        empty_target_action: ``"skip"`` | ``"neg"`` | ``"error"`` for queries without relevant documents.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        recall_ks: Sequence[int] = (1, 10, 100),
        mrr_k: int = 10,
        ndcg_k: int = 10,
        empty_target_action: EmptyTargetAction = "skip",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.recall_ks = tuple(int(k) for k in recall_ks)
        self.mrr_k, self.ndcg_k = int(mrr_k), int(ndcg_k)
        self.empty_target_action = empty_target_action
        self.depth = max(*self.recall_ks, self.mrr_k, self.ndcg_k)
        for name in ("ranked_gains", "num_relevant", "ideal_dcg", "query_index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, ranked_ids: Tensor, qrels: Qrels, query_index: Tensor | None = None) -> None:
        """Add queries: ``ranked_ids [Q, K]`` corpus indices (best first), their rows ``query_index [Q]``."""
        if ranked_ids.ndim != 2:
            raise ValueError(f"`ranked_ids` must be [Q, K]; got {tuple(ranked_ids.shape)}")
        query_index = qrels._default_index(ranked_ids.shape[0], query_index, ranked_ids.device)
        gains = qrels.gains(ranked_ids[:, : self.depth], query_index)
        if gains.shape[1] < self.depth:  # shorter lists (small corpus): the rest is "not retrieved"
            gains = torch.nn.functional.pad(gains, (0, self.depth - gains.shape[1]))
        num_rel, idcg = qrels.summary(query_index, self.ndcg_k)
        self.ranked_gains.append(gains.to(self.device))
        self.num_relevant.append(num_rel.to(self.device))
        self.ideal_dcg.append(idcg.to(self.device))
        self.query_index.append(query_index.long().to(self.device))

    def compute(self) -> dict[str, Tensor]:
        gains = dim_zero_cat(self.ranked_gains)
        num_rel = dim_zero_cat(self.num_relevant)
        idcg = dim_zero_cat(self.ideal_dcg)
        qidx = dim_zero_cat(self.query_index)
        # count each query once (first occurrence); sorting makes the result independent of rank order
        order = torch.argsort(qidx, stable=True)
        qidx = qidx[order]
        first = torch.ones_like(qidx, dtype=torch.bool)
        first[1:] = qidx[1:] != qidx[:-1]
        keep = order[first]
        per_q = rank_metrics_per_query(gains[keep], num_rel[keep], idcg[keep], recall_ks=self.recall_ks,
                                       mrr_k=self.mrr_k, ndcg_k=self.ndcg_k)
        return aggregate_rank_metrics(per_q, num_rel[keep], self.empty_target_action)
