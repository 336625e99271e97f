"""Confidence scores from logits: the deferral scores of a classifier (higher = more confident)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_cascades.functional._checks import check_choice

ConfidenceKind = Literal["max_prob", "margin", "neg_entropy"]
CONFIDENCE_KINDS: tuple[str, ...] = ("max_prob", "margin", "neg_entropy")


def confidence_from_logits(logits: Tensor, kind: ConfidenceKind = "max_prob") -> Tensor:
    """Per-row confidence of ``[..., C]`` logits, shape ``[...]``.

    * ``"max_prob"``: ``max_c softmax(z)_c`` (Chow's rule; the Gatekeeper paper's gate),
    * ``"margin"``: top-1 minus top-2 probability,
    * ``"neg_entropy"``: ``−H(softmax(z))`` (the entropy gate).
    """
    check_choice("kind", kind, CONFIDENCE_KINDS)
    log_p = torch.log_softmax(logits.float(), dim=-1)
    if kind == "max_prob":
        return log_p.max(-1).values.exp()
    if kind == "margin":
        top2 = log_p.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    return (log_p.exp() * log_p).sum(-1)
