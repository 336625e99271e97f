"""InfoNCE: hand-computed oracle on one process, and 1×B == 2×B/2 (loss and gradients) across gloo ranks."""

from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_cascades.functional.contrastive import gather_with_grad, info_nce


def _oracle(q, k, hn=None, tau=0.1, symmetric=False, shared=True, key_ids=None, hn_ids=None):
    """Loop-by-loop InfoNCE straight from the formula."""
    b = q.shape[0]
    total = 0.0
    for i in range(b):
        cands, ids = [k[j] for j in range(b)], [None if key_ids is None else int(key_ids[j]) for j in range(b)]
        if hn is not None:
            if shared:
                pool = hn.reshape(-1, q.shape[1])
                pool_ids = None if hn_ids is None else hn_ids.reshape(-1)
            else:
                pool, pool_ids = hn[i], (None if hn_ids is None else hn_ids[i])
            cands += list(pool)
            ids += [None] * len(pool) if pool_ids is None else [int(x) for x in pool_ids]
        logits = []
        for c, (cand, cid) in enumerate(zip(cands, ids)):
            if key_ids is not None and c != i and cid == int(key_ids[i]):
                continue  # a duplicate of the positive is not a negative
            logits.append((float(q[i] @ cand) / tau, c == i))
        lse = math.log(sum(math.exp(v) for v, _ in logits))
        li = lse - next(v for v, pos in logits if pos)
        if symmetric:
            lk = []
            for j in range(b):
                if key_ids is not None and j != i and int(key_ids[j]) == int(key_ids[i]):
                    continue
                lk.append((float(k[i] @ q[j]) / tau, j == i))
            lse_k = math.log(sum(math.exp(v) for v, _ in lk))
            li = 0.5 * (li + lse_k - next(v for v, pos in lk if pos))
        total += li
    return total / b


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("neg", ["none", "shared", "per_query", "pool"])
def test_info_nce_matches_formula(symmetric, neg):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    hn = {"none": None, "shared": torch.randn(5, 2, 4, generator=g), "per_query": torch.randn(5, 2, 4, generator=g),
          "pool": torch.randn(3, 4, generator=g)}[neg]
    out = info_nce(q, k, hn, temperature=0.1, symmetric=symmetric, shared_negatives=neg != "per_query")
    expected = _oracle(q, k, hn, 0.1, symmetric, shared=neg != "per_query")
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.labels.tolist() == list(range(5))
    n_cols = 5 + {"none": 0, "shared": 10, "per_query": 2, "pool": 3}[neg]
    assert out.logits.shape == (5, n_cols)


def test_info_nce_masks_duplicate_positives():
    g = torch.Generator().manual_seed(2)
    q, k, hn = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    key_ids = torch.tensor([7, 8, 7, 9])  # queries 0 and 2 share their positive (two captions, one image)
    hn_ids = torch.tensor([[8, 1], [2, 3], [4, 7], [5, 6]])
    for symmetric in (False, True):
        out = info_nce(q, k, hn, temperature=0.5, symmetric=symmetric, key_ids=key_ids, hard_negative_ids=hn_ids)
        assert out.loss.item() == pytest.approx(
            _oracle(q, k, hn, 0.5, symmetric, key_ids=key_ids, hn_ids=hn_ids), rel=1e-5)
    assert torch.isinf(out.logits[0, 2]) and torch.isinf(out.logits[2, 0])
    assert torch.isinf(out.logits[0, 4 + 5])  # query 0's positive id 7 appears as hard negative [2, 1]


def test_info_nce_temperature_tensor_gets_gradient():
    q, k = torch.randn(3, 2), torch.randn(3, 2)
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    info_nce(q, k, temperature=logit_scale.exp().reciprocal(), symmetric=True).loss.backward()
    assert logit_scale.grad is not None and torch.isfinite(logit_scale.grad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"query": torch.randn(3, 2), "key": torch.randn(4, 2)}, "same shape"),
        ({"query": torch.randn(3), "key": torch.randn(3)}, r"\[B, D\]"),
        ({"query": torch.full((2, 2), float("nan")), "key": torch.randn(2, 2)}, "finite"),
        ({"query": torch.randn(2, 2), "key": torch.randn(2, 2), "temperature": 0.0}, "temperature"),
        ({"query": torch.randn(2, 2), "key": torch.randn(2, 2), "hard_negatives": torch.randn(2, 3)}, "hard_negatives"),
        ({"query": torch.randn(2, 2), "key": torch.randn(2, 2), "hard_negatives": torch.randn(3, 2),
          "shared_negatives": False}, "per-query"),
        ({"query": torch.randn(2, 2), "key": torch.randn(2, 2), "hard_negatives": torch.randn(2, 1, 2),
          "hard_negative_ids": torch.zeros(2, 1)}, "key_ids"),
    ],
)
def test_info_nce_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        info_nce(**kwargs)


# ------------------------------------------------------------------------------------------- 2 ranks
CASES = {
    # name: (kwargs, rank sizes)
    "in_batch": ({}, (4, 4)),
    "shared_hard_negatives": ({"hn": 2}, (4, 4)),
    "per_query_hard_negatives_symmetric": ({"hn": 3, "shared_negatives": False, "symmetric": True}, (4, 4)),
    "symmetric_shared_uneven": ({"hn": 1, "symmetric": True}, (3, 5)),
    "masked_ids": ({"hn": 2, "ids": True, "symmetric": True}, (4, 4)),
}


def _data(sizes, hn):
    g = torch.Generator().manual_seed(3)
    b = sum(sizes)
    x_q, x_k = torch.randn(b, 6, generator=g), torch.randn(b, 6, generator=g)
    x_n = torch.randn(b, hn, 6, generator=g) if hn else None
    weight = torch.randn(6, 5, generator=g)  # a shared "encoder" parameter, as replicated by DDP
    key_ids = torch.arange(b) % (b - 2)  # two duplicate positives
    hn_ids = (torch.arange(b * hn).reshape(b, hn) * 3) % b if hn else None
    return x_q, x_k, x_n, weight, key_ids, hn_ids


def _run_case(kwargs, sizes, rank=None):
    """Loss, gradient w.r.t. the shared weight, gradient w.r.t. the local query inputs."""
    kw = dict(kwargs)
    hn = kw.pop("hn", 0)
    ids = kw.pop("ids", False)
    x_q, x_k, x_n, weight, key_ids, hn_ids = _data(sizes, hn)
    if rank is not None:
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        x_q, x_k, key_ids = x_q[lo:hi], x_k[lo:hi], key_ids[lo:hi]
        x_n = x_n[lo:hi] if x_n is not None else None
        hn_ids = hn_ids[lo:hi] if hn_ids is not None else None
    weight = weight.clone().requires_grad_(True)
    x_q = x_q.clone().requires_grad_(True)
    enc = lambda x: torch.nn.functional.normalize(x @ weight, dim=-1)  # noqa: E731
    out = info_nce(enc(x_q), enc(x_k), enc(x_n) if x_n is not None else None, temperature=0.1,
                   key_ids=key_ids if ids else None, hard_negative_ids=hn_ids if ids else None, **kw)
    out.loss.backward()
    return out.loss.detach(), weight.grad, x_q.grad


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, (kwargs, sizes) in CASES.items():
            loss, w_grad, q_grad = _run_case(kwargs, sizes, rank)
            dist.all_reduce(loss)
            dist.all_reduce(w_grad)  # DDP: gradients are averaged over ranks
            results[name] = (loss / world, w_grad / world, q_grad)
        x = torch.arange(3.0 + rank).requires_grad_(True)  # uneven sizes: 3 and 4 rows
        gathered, offset, sizes = gather_with_grad(x[:, None])
        (gathered.squeeze(1) * torch.arange(7.0)).sum().backward()
        results["gather"] = (gathered.detach(), offset, sizes, x.grad)
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_info_nce_two_ranks_equal_one_rank():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for name, (kwargs, sizes) in CASES.items():
        loss, w_grad, q_grad = _run_case(kwargs, sizes)
        for r, res in enumerate(ranks):
            loss_r, w_grad_r, q_grad_r = res[name]
            torch.testing.assert_close(loss_r, loss, msg=f"{name}: loss")
            torch.testing.assert_close(w_grad_r, w_grad, msg=f"{name}: shared-parameter gradient")
            lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
            # each rank's input gradient is that of the sum of rank losses = world × global mean loss
            torch.testing.assert_close(q_grad_r / 2, q_grad[lo:hi], msg=f"{name}: input gradient, rank {r}")
    g0, g1 = ranks[0]["gather"], ranks[1]["gather"]
    assert g0[0].squeeze(1).tolist() == [0, 1, 2, 0, 1, 2, 3] == g1[0].squeeze(1).tolist()
    assert (g0[1], g1[1], g0[2]) == (0, 3, [3, 4])
    # d/dx of Σ_ranks Σ_j gathered_j · j: each owner gets its rows' coefficient summed over both ranks
    assert g0[3].tolist() == [0, 2, 4] and g1[3].tolist() == [6, 8, 10, 12]
