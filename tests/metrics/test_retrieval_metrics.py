"""RetrievalMetrics: batched == functional, padded duplicates counted once, 1 process == 2 processes."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_cascades.functional.retrieval import Qrels, chunked_topk, retrieval_metrics
from lit_cascades.metrics.retrieval import RetrievalMetrics


def _problem(nq=20, n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries, corpus = torch.randn(nq, 8, generator=g), torch.randn(n, 8, generator=g)
    qi = torch.arange(nq).repeat_interleave(2)
    di = torch.randint(0, n, (2 * nq,), generator=g)
    di[1::2] = (di[0::2] + 1) % n  # two distinct relevant docs per query
    rel = torch.randint(1, 3, (2 * nq,), generator=g).float()
    rel[:4] = 0  # query 0 and 1: judged but nothing relevant
    qrels = Qrels(qi, di, rel, num_queries=nq)
    return queries, corpus, qrels


def test_metric_over_batches_equals_functional():
    queries, corpus, qrels = _problem()
    _, ranked = chunked_topk(queries, corpus, 50)
    with pytest.warns(UserWarning, match="no relevant"):
        expected = retrieval_metrics(ranked, qrels, recall_ks=(1, 10, 50))
    metric = RetrievalMetrics(recall_ks=(1, 10, 50))
    for lo in range(0, 20, 6):
        idx = torch.arange(lo, min(lo + 6, 20))
        metric.update(ranked[idx], qrels, idx)
    metric.update(ranked[:3], qrels, torch.arange(3))  # sampler padding repeats queries: counted once
    with pytest.warns(UserWarning, match="no relevant"):
        got = metric.compute()
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].item() == pytest.approx(expected[key].item(), abs=1e-6), key
    assert got["queries_without_relevant"].item() == 2 and got["num_queries"].item() == 20


def test_metric_pads_short_lists():
    qrels = Qrels(torch.tensor([0]), torch.tensor([2]), torch.tensor([1.0]), num_queries=1)
    metric = RetrievalMetrics(recall_ks=(1, 100))
    metric.update(torch.tensor([[0, 2, 1]]), qrels)  # a 3-document corpus: the whole ranking
    out = metric.compute()
    assert out["recall@100"].item() == 1.0 and out["mrr@10"].item() == 0.5


def _worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queries, corpus, qrels = _problem()
        _, ranked = chunked_topk(queries, corpus, 50)
        # DistributedSampler order: rank r gets r, r + 2, ... (padded to 11 each by repeating query 0)
        idx = torch.cat([torch.arange(20), torch.tensor([0, 1])])[rank::world]
        metric = RetrievalMetrics(recall_ks=(1, 10, 50), empty_target_action="neg")
        metric.update(ranked[idx[:5]], qrels, idx[:5])
        metric.update(ranked[idx[5:]], qrels, idx[5:])
        torch.save({k: v.item() for k, v in metric.compute().items()}, os.path.join(tmp, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metric_two_processes_equal_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, port, tmp), nprocs=2, join=True)
        res = [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(2)]
    queries, corpus, qrels = _problem()
    _, ranked = chunked_topk(queries, corpus, 50)
    expected = retrieval_metrics(ranked, qrels, recall_ks=(1, 10, 50), empty_target_action="neg")
    for r in res:
        for key, value in expected.items():
            assert r[key] == pytest.approx(value.item(), abs=1e-6), key
