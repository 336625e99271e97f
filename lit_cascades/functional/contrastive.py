"""InfoNCE / symmetric contrastive loss that gathers embeddings across ranks *with* gradients.

Used by USTAD's dual-encoder loss (Kim et al., ICML 2024) and TASK-former's image–query loss (Sangkloy et al.,
ECCV 2022, arXiv:2208.03354; CLIP-style).

For a local batch of ``B_r`` queries ``q`` and their positive keys ``k`` on rank ``r`` of ``W`` ranks, the
embeddings of every rank are all-gathered (``torch.distributed.nn.functional.all_gather``, whose backward
sums the gradients of all ranks back onto the owner: open_clip's ``gather_with_grad``), and each *local*
query is scored against the *global* candidate set (open_clip's ``local_loss``):

.. math::

    ℓ_i = -\\log \\frac{\\exp(⟨q_i, k_i⟩/τ)}{\\sum_{c ∈ C} \\exp(⟨q_i, c⟩/τ)},\\qquad
    C = \\{k_1..k_N\\} ∪ \\{\\text{hard negatives}\\}

where ``N = Σ_r B_r``. Local row ``i`` of rank ``r`` has label ``i + Σ_{s<r} B_s`` (labels offset by rank).
The loss returned on each rank is ``(Σ_{i local} ℓ_i) · W / N``: its average over ranks (what DDP's gradient
averaging and ``sync_dist`` logging compute) equals the single-process mean over all ``N`` queries, also when
ranks hold different batch sizes. With no process group (or ``gather=False``) it is the plain local mean.

The symmetric variant (CLIP) adds the key→query direction: local keys against the gathered queries
(hard negatives take part only in the query→key direction) and averages the two directions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor

from lit_cascades.functional._checks import check_finite, check_nonempty


class ContrastiveOutput(NamedTuple):
    """Result of :func:`info_nce`.

    Attributes:
        loss: scalar; this rank's share of the global mean loss (see the module docstring).
        logits: ``[B_r, N + M]`` query→candidate logits of the local queries (candidates: the ``N`` gathered
            positive keys, then the ``M`` gathered hard negatives; or ``N + H`` with per-query negatives).
        labels: ``[B_r]`` column of each local query's positive in ``logits`` (offset by rank).
    """

    loss: Tensor
    logits: Tensor
    labels: Tensor


def _dist_ready(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, int, list[int]]:
    """All-gather ``x`` of shape ``[N_r, ...]`` from every rank, keeping the autograd graph.

    Ranks may hold different ``N_r`` (sizes are exchanged first and tensors padded to the largest). The
    backward pass sums every rank's gradient for a slice onto the rank that owns it.

    Args:
        x: ``[N_r, ...]`` local tensor; trailing dims must agree across ranks.
        group: process group (``None``: the default group).

    Returns:
        ``(gathered [Σ N_r, ...], offset of this rank's rows, per-rank sizes)``. Without an initialised
        process group of size > 1 this is ``(x, 0, [N_r])``.
    """
    if not _dist_ready(group):
        return x, 0, [x.shape[0]]
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size, group=group)
    sizes = [int(s) for s in sizes_t]
    max_n = max(sizes)
    padded = F.pad(x, (0, 0) * (x.ndim - 1) + (0, max_n - x.shape[0])) if x.shape[0] < max_n else x
    parts = dist_fn.all_gather(padded, group=group)
    gathered = torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)
    return gathered, sum(sizes[:rank]), sizes


def _gather_plain(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """All-gather without gradients (ids), same padding rules as :func:`gather_with_grad`."""
    if not _dist_ready(group):
        return x
    with torch.no_grad():
        out, _, _ = gather_with_grad(x, group)
    return out


def _mask_false_negatives(logits: Tensor, labels: Tensor, query_pos_ids: Tensor, cand_ids: Tensor) -> Tensor:
    """Set logits of candidates that share the query's positive id (other than the target) to -inf."""
    same = query_pos_ids[:, None] == cand_ids[None, :]
    same[torch.arange(len(labels), device=logits.device), labels] = False
    return logits.masked_fill(same, float("-inf"))


def info_nce(
    query: Tensor,
    key: Tensor,
    hard_negatives: Tensor | None = None,
    *,
    temperature: float | Tensor = 0.05,
    symmetric: bool = False,
    shared_negatives: bool = True,
    key_ids: Tensor | None = None,
    hard_negative_ids: Tensor | None = None,
    gather: bool = True,
    group: dist.ProcessGroup | None = None,
) -> ContrastiveOutput:
    """InfoNCE with in-batch (cross-rank) negatives and optional hard negatives.

    Scores are plain inner products divided by ``temperature``; L2-normalise the inputs first for cosine
    similarity (CLIP: ``temperature = 1 / logit_scale.exp()``, a tensor, so it stays learnable).

    Args:
        query: ``[B, D]`` local query embeddings.
        key: ``[B, D]`` local positive key (document / image) embeddings; row ``i`` is the positive of query ``i``.
        hard_negatives: optional extra negatives, ``[B, H, D]`` (``H`` per query) or ``[M, D]`` (a pool).
            With ``shared_negatives=True`` (default; DPR / sentence-transformers MNRL) every query is scored
            against the gathered pool of all ranks' negatives; with ``False`` query ``i`` sees only its own
            ``H`` negatives (requires ``[B, H, D]``).
        temperature: ``τ > 0`` (float or scalar tensor).
        symmetric: also add the key→query loss and average the two directions (CLIP).
        shared_negatives: see ``hard_negatives``.
        key_ids: optional ``[B]`` integer ids of the positive keys; a candidate whose id equals query ``i``'s
            positive id (a duplicate of its positive, e.g. another caption of the same image) is masked out
            instead of being used as a negative.
        hard_negative_ids: optional ids of ``hard_negatives`` (``[B, H]`` or ``[M]``), masked the same way.
        gather: all-gather across the process group when one is initialised (with gradients).
        group: process group (``None``: default group).

    Returns:
        :class:`ContrastiveOutput` ``(loss, logits, labels)``.
    """
    if query.ndim != 2 or key.ndim != 2:
        raise ValueError(f"`query` and `key` must be [B, D]; got {tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape != key.shape:
        raise ValueError(f"`query` {tuple(query.shape)} and `key` {tuple(key.shape)} must have the same shape [B, D]")
    check_nonempty("query", query)
    check_finite("query", query)
    check_finite("key", key)
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1 or not bool(temperature.detach() > 0):
            raise ValueError(f"`temperature` must be a positive scalar; got {temperature}")
    elif not temperature > 0:
        raise ValueError(f"`temperature` must be > 0; got {temperature}")
    b, d = query.shape
    per_query_neg = hard_negatives is not None and hard_negatives.ndim == 3
    if hard_negatives is not None:
        check_finite("hard_negatives", hard_negatives)
        if hard_negatives.shape[-1] != d or hard_negatives.ndim not in (2, 3):
            raise ValueError(f"`hard_negatives` must be [B, H, {d}] or [M, {d}]; got {tuple(hard_negatives.shape)}")
        if per_query_neg and hard_negatives.shape[0] != b:
            raise ValueError(f"`hard_negatives` [B, H, D] must have B={b} rows; got {tuple(hard_negatives.shape)}")
        if not shared_negatives and not per_query_neg:
            raise ValueError("`shared_negatives=False` needs per-query `hard_negatives` of shape [B, H, D]")
    if hard_negative_ids is not None:
        if hard_negatives is None or key_ids is None:
            raise ValueError("`hard_negative_ids` needs `hard_negatives` and `key_ids` (the ids of the positives)")
        if hard_negative_ids.shape != hard_negatives.shape[:-1]:
            raise ValueError(
                f"`hard_negative_ids` must have shape {tuple(hard_negatives.shape[:-1])} (that of `hard_negatives` "
                f"without D); got {tuple(hard_negative_ids.shape)}"
            )
    if key_ids is not None and key_ids.shape != (b,):
        raise ValueError(f"`key_ids` must be [B]=[{b}]; got {tuple(key_ids.shape)}")

    use_dist = gather and _dist_ready(group)
    world = dist.get_world_size(group) if use_dist else 1
    if use_dist:
        all_keys, offset, sizes = gather_with_grad(key, group)
        all_queries = gather_with_grad(query, group)[0] if symmetric else query
    else:
        all_keys, offset, sizes = key, 0, [b]
        all_queries = query
    n_total = sum(sizes)
    labels = torch.arange(b, device=query.device) + offset

    logits = query @ all_keys.T  # [B, N]
    cand_ids = _gather_plain(key_ids, group) if (key_ids is not None and use_dist) else key_ids
    if key_ids is not None:
        logits = _mask_false_negatives(logits, labels, key_ids, cand_ids)
    if hard_negatives is not None:
        if shared_negatives:
            pool = hard_negatives.reshape(-1, d)
            pool = gather_with_grad(pool, group)[0] if use_dist else pool
            neg_logits = query @ pool.T  # [B, M]
            if hard_negative_ids is not None:
                pool_ids = hard_negative_ids.reshape(-1)
                pool_ids = _gather_plain(pool_ids, group) if use_dist else pool_ids
                neg_logits = neg_logits.masked_fill(key_ids[:, None] == pool_ids[None, :], float("-inf"))
        else:
            neg_logits = torch.einsum("bd,bhd->bh", query, hard_negatives)  # [B, H]
            if hard_negative_ids is not None:
                neg_logits = neg_logits.masked_fill(key_ids[:, None] == hard_negative_ids, float("-inf"))
        logits = torch.cat([logits, neg_logits], dim=1)
    logits = logits / temperature

    loss = F.cross_entropy(logits, labels, reduction="sum")
    if symmetric:
        logits_k = key @ all_queries.T / temperature  # [B, N]
        if key_ids is not None:
            logits_k = _mask_false_negatives(logits_k, labels, key_ids, cand_ids)
        loss = 0.5 * (loss + F.cross_entropy(logits_k, labels, reduction="sum"))
    loss = loss * world / n_total
    return ContrastiveOutput(loss=loss, logits=logits, labels=labels)
