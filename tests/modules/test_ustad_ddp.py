"""USTAD on 2 gloo processes equals 1 process: the joint loss (DE InfoNCE gathered with gradients, hard
negatives included; CE listwise) and every parameter gradient (1×B vs 2×B/2), and the full-corpus evaluation
(corpus encoded in shards and gathered, padded duplicate queries counted once, synced metrics)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lit_cascades.functional.retrieval import Qrels
from tests.helpers import run_distributed
from tests.modules.test_ustad import DOCS, NEGS, QUERIES, tiny

EXTRA = [f"def helper_{i}(x):\n    return x * {i}" for i in range(5)]


def _take(batch, idx):
    return {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in batch.items()}


def _run(rank: int | None, world: int):
    m = tiny(ce_batch_negatives=0)
    b = {"query": QUERIES, "positive": DOCS, "negatives": NEGS, "positive_id": torch.arange(4),
         "negative_ids": torch.arange(4)[:, None] + 4, "index": torch.arange(4)}
    local = b if rank is None else _take(b, [2 * rank, 2 * rank + 1])
    out = m.compute_losses(local)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in m.named_parameters()}
    loss = out["loss"].detach()
    if rank is not None:  # DDP: gradients and the logged loss are averaged over processes
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(loss)
        loss /= world
    corpus = DOCS + [n[0] for n in NEGS] + EXTRA  # 13 documents: uneven shards
    m.set_eval_corpus("val", corpus, Qrels.from_targets(torch.arange(4), num_docs=len(corpus)))
    # uneven query shards with a padded duplicate (query 0) on rank 1, as DistributedSampler pads
    idx = [0, 1, 2, 3] if rank is None else ([0, 2] if rank == 0 else [1, 3, 0])
    with torch.no_grad():
        q = m.embed_queries([QUERIES[i] for i in idx])
        res = m.evaluate_retrieval(q, torch.tensor(idx), [QUERIES[i] for i in idx], "val")
    return loss, grads, {k: {n: v.item() for n, v in r.items()} for k, r in res.items()}


def _worker(rank, world):
    return _run(rank, world)


@pytest.mark.slow
def test_two_processes_equal_one_process():
    ranks = run_distributed(_worker, world_size=2)
    loss, grads, results = _run(None, 1)
    assert results["de"]["num_queries"] == 4 and set(results) == {"de", "rerank"}
    for r, (loss_r, grads_r, results_r) in enumerate(ranks):
        torch.testing.assert_close(loss_r, loss, msg=f"rank {r}: loss")
        for name, g in grads.items():
            torch.testing.assert_close(grads_r[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-8,
                                       msg=f"rank {r}: gradient of {name}")
        for kind in results:
            assert results_r[kind] == pytest.approx(results[kind], abs=1e-6), (r, kind)
    assert grads["ce_head.weight"].abs().sum() > 0
