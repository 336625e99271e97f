"""Late fusion of query embeddings (TASK-former, Sangkloy et al., ECCV 2022; arXiv:2208.03354).

The official code fuses the L2-normalised text and sketch embeddings by their mean, ``q = (t + s) / 2``
(``feature_fusion='avg'``). A query that lacks one modality uses the other alone (``q = t`` or ``q = s``): the
mean over the modalities *present*. With ``renormalize=True`` (default; the Tmq244 reimplementation) ``q`` is
L2-normalised again, so that the contrastive logits of fused and single-modality queries share one scale; the
official code does not, which changes nothing for cosine retrieval but scales the training logits of fused
queries by ``‖q‖ ≤ 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def late_fusion(
    embeddings: list[Tensor] | tuple[Tensor, ...],
    present: list[Tensor | None] | tuple[Tensor | None, ...] | None = None,
    *,
    renormalize: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """Mean of the L2-normalised embeddings of the modalities present in each query.

    Args:
        embeddings: ``M`` tensors ``[B, D]`` (e.g. ``[text, sketch]``); each is L2-normalised here.
        present: optional ``M`` masks ``[B]`` (bool); ``None`` entries mean "present in every row". Every row
            must have at least one modality present.
        renormalize: L2-normalise the mean (see the module docstring).
        eps: numerical floor of the norms.

    Returns:
        ``[B, D]`` fused query embeddings.
    """
    if len(embeddings) == 0:
        raise ValueError("`embeddings` is empty; expected at least one [B, D] tensor")
    shape = embeddings[0].shape
    if len(shape) != 2:
        raise ValueError(f"embeddings must be [B, D]; got shape {tuple(shape)}")
    for i, e in enumerate(embeddings):
        if e.shape != shape:
            raise ValueError(f"embedding {i} has shape {tuple(e.shape)}; expected {tuple(shape)} like embedding 0")
    present = [None] * len(embeddings) if present is None else list(present)
    if len(present) != len(embeddings):
        raise ValueError(f"`present` has {len(present)} masks for {len(embeddings)} embeddings")
    total = torch.zeros(shape, dtype=embeddings[0].dtype, device=embeddings[0].device)
    count = torch.zeros(shape[0], 1, dtype=total.dtype, device=total.device)
    for i, (e, m) in enumerate(zip(embeddings, present)):
        e = F.normalize(e, dim=-1, eps=eps)
        if m is None:
            total = total + e
            count = count + 1
            continue
        if m.shape != (shape[0],):
            raise ValueError(f"`present[{i}]` must be [B]=[{shape[0]}]; got {tuple(m.shape)}")
        w = m.to(total.dtype)[:, None]
        total = total + w * e
        count = count + w
    if bool((count == 0).any()):
        raise ValueError(f"{int((count == 0).sum())} queries have no modality present; each query needs at least "
                         "one of its embeddings")
    fused = total / count
    return F.normalize(fused, dim=-1, eps=eps) if renormalize else fused
