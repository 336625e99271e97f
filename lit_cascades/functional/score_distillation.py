"""Listwise ranking loss, score-distribution distillation and embedding matching (USTAD / EmbedDistill).

Kim et al., "USTAD: Unified Single-model Training Achieving Diverse Scores for Information Retrieval",
ICML 2024, and its predecessor EmbedDistill (arXiv:2301.12005). The paper
body was not read: the forms below are the standard ones the abstracts point to (stated as choices).

* :func:`listwise_softmax_loss` — softmax cross-entropy over each query's candidate list (positive + negatives),
  the cross-encoder's training loss: ``ℓ = -log softmax(s)[y]``, averaged over queries.
* :func:`score_distillation_loss` — ``T² · KL(softmax(s_T / T) ‖ softmax(s_S / T))`` per query (the teacher's
  distribution is the target, as in Hinton et al. 2015; ``T²`` keeps gradient magnitudes comparable across
  temperatures), averaged over queries. Candidates masked with ``-inf`` in the teacher scores are ignored.
* :func:`embedding_matching_loss` — EmbedDistill's embedding matching, ``‖e_S − e_T‖₂`` per row (``"l2"``,
  the paper's metric per the sentence-transformers docstring), ``‖e_S − e_T‖²₂`` (``"mse"``, summed over the
  dimension) or ``1 − cos`` (``"cosine"``), averaged over rows. The teacher side is detached.
* :func:`segment_mean_pool` — mean of the token states of one segment (``token_type_ids``) of a joint
  ``[CLS] q [SEP] d [SEP]`` input: EmbedDistill's *dual pooling* scorer of a cross-encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_cascades.functional._checks import check_choice, check_finite

EMBEDDING_DISTANCES = ("l2", "mse", "cosine")


def _check_scores(name: str, scores: Tensor) -> None:
    if scores.ndim != 2 or scores.shape[1] < 1 or scores.shape[0] < 1:
        raise ValueError(f"`{name}` must be [B, C] with B, C >= 1; got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"`{name}` holds NaN")


def listwise_softmax_loss(scores: Tensor, labels: Tensor | None = None) -> Tensor:
    """Mean softmax cross-entropy of ``scores [B, C]`` (one row per query, one column per candidate) with the
    positive at column ``labels [B]`` (default 0)."""
    _check_scores("scores", scores)
    if labels is None:
        labels = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    elif labels.shape != (scores.shape[0],):
        raise ValueError(f"`labels` must be [B]=[{scores.shape[0]}]; got {tuple(labels.shape)}")
    return F.cross_entropy(scores, labels)


def score_distillation_loss(student_scores: Tensor, teacher_scores: Tensor, temperature: float = 1.0,
                            scale_by_t2: bool = True) -> Tensor:
    """``T² · mean_q KL(softmax(s_T/T) ‖ softmax(s_S/T))`` over candidate lists ``[B, C]`` (teacher detached).

    Args:
        student_scores: ``[B, C]`` student scores (logits) of each query's candidates.
        teacher_scores: ``[B, C]`` teacher scores of the same candidates; ``-inf`` marks a candidate to ignore.
        temperature: ``T > 0``, applied to both sides.
        scale_by_t2: multiply by ``T²`` (Hinton et al.).
    """
    _check_scores("student_scores", student_scores)
    if teacher_scores.shape != student_scores.shape:
        raise ValueError(f"`teacher_scores` {tuple(teacher_scores.shape)} must match `student_scores` "
                         f"{tuple(student_scores.shape)}")
    _check_scores("teacher_scores", teacher_scores)
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0; got {temperature}")
    t = teacher_scores.detach() / temperature
    valid = torch.isfinite(t)
    log_p_t = F.log_softmax(t, dim=1)
    log_p_s = F.log_softmax((student_scores / temperature).masked_fill(~valid, float("-inf")), dim=1)
    p_t = log_p_t.exp()
    terms = torch.where(valid, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
    loss = terms.sum(1).mean()
    return loss * temperature**2 if scale_by_t2 else loss


def embedding_matching_loss(student: Tensor, teacher: Tensor, distance: str = "l2") -> Tensor:
    """Mean distance between ``student [B, D]`` and detached ``teacher [B, D]`` embeddings (see module doc)."""
    check_choice("distance", distance, EMBEDDING_DISTANCES)
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(f"student and teacher embeddings must both be [B, D] with equal D; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)} (use a projection when widths differ)")
    check_finite("student", student)
    teacher = teacher.detach()
    if distance == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()
    sq = (student - teacher).pow(2).sum(1)
    return sq.mean() if distance == "mse" else sq.clamp(min=1e-12).sqrt().mean()


def segment_mean_pool(states: Tensor, attention_mask: Tensor, token_type_ids: Tensor, segment: int) -> Tensor:
    """Mean of ``states [B, L, H]`` over attended positions whose ``token_type_ids [B, L]`` equal ``segment``.

    With a BERT pair input ``[CLS] q [SEP] d [SEP]`` segment 0 is ``[CLS] q [SEP]`` and segment 1 is ``d [SEP]``
    (choice: special tokens stay in, as in sentence-transformers' mean pooling). Returns ``[B, H]``.
    """
    if states.ndim != 3 or attention_mask.shape != states.shape[:2] or token_type_ids.shape != states.shape[:2]:
        raise ValueError(f"`states` must be [B, L, H] and the masks [B, L]; got {tuple(states.shape)}, "
                         f"{tuple(attention_mask.shape)}, {tuple(token_type_ids.shape)}")
    m = ((token_type_ids == segment) & (attention_mask > 0)).to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
