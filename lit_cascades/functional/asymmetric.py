"""Asymmetric loss (ASL) for multi-label classification (Ridnik et al., "Asymmetric Loss For Multi-Label
Classification", ICCV 2021), used by TASK-former's auxiliary object-classification loss (Sangkloy et al.,
ECCV 2022, arXiv:2208.03354; ``γ⁻ = 4, γ⁺ = 1, clip = 0.05`` from the reimplementations).

For logits ``z`` with ``p = σ(z)`` and binary targets ``y``, per class:

.. math::

    L^+ = (1 - p)^{γ^+} \\log p, \\qquad
    L^- = p_m^{γ^-} \\log(1 - p_m), \\quad p_m = \\max(p - m, 0),

    \\text{ASL}(z, y) = -\\sum_c \\big[y_c L^+_c + (1 - y_c) L^-_c\\big]

The probability margin ``m`` (``clip``) discards easy negatives (``p < m``) entirely; ``γ⁻ > γ⁺`` focuses
less on the many negatives than on the few positives. ``γ⁺ = γ⁻ = 0, m = 0`` gives binary cross-entropy.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_cascades.functional._checks import check_choice, check_finite, check_nonempty

Reduction = Literal["mean", "sum", "none"]


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    reduction: Reduction = "mean",
    detach_focal: bool = False,
) -> Tensor:
    """Asymmetric multi-label loss.

    Args:
        logits: ``[B, C]`` raw scores.
        targets: ``[B, C]`` in ``{0, 1}`` (bool, int or float).
        gamma_neg: ``γ⁻ ≥ 0``, focusing exponent of negatives.
        gamma_pos: ``γ⁺ ≥ 0``, focusing exponent of positives.
        clip: probability margin ``m ∈ [0, 1)`` shifting negatives (0 disables it).
        eps: clamp of the probabilities inside the logarithms (the official implementation's ``1e-8``).
        reduction: ``"mean"`` (default; the Tmq244 reimplementation): the sum over classes, averaged over the
            batch, so the value does not grow with the batch size; ``"sum"``: summed over batch and classes (the
            official ``AsymmetricLoss`` module, used as is by zzmshinnosuke); ``"none"``: ``[B]`` per-example sums.
        detach_focal: treat the focusing weights as constants (the official ``disable_torch_grad_focal_loss``).

    Returns:
        A scalar (or ``[B]`` for ``reduction="none"``).
    """
    if logits.ndim != 2:
        raise ValueError(f"`logits` must be [B, C]; got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(f"`targets` must have the shape of `logits` {tuple(logits.shape)}; got {tuple(targets.shape)}")
    check_nonempty("logits", logits)
    check_finite("logits", logits)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    if gamma_neg < 0 or gamma_pos < 0:
        raise ValueError(f"`gamma_neg` and `gamma_pos` must be >= 0; got {gamma_neg}, {gamma_pos}")
    if not 0 <= clip < 1:
        raise ValueError(f"`clip` must be in [0, 1); got {clip}")
    y = targets.to(logits.dtype)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("`targets` must be binary (0/1) multi-hot labels")
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    loss_pos = y * torch.log(p.clamp(min=eps))
    loss_neg = (1 - y) * torch.log((1 - p_neg).clamp(min=eps))
    if gamma_pos > 0:
        w_pos = (1 - p) ** gamma_pos
        loss_pos = loss_pos * (w_pos.detach() if detach_focal else w_pos)
    if gamma_neg > 0:
        w_neg = p_neg**gamma_neg
        loss_neg = loss_neg * (w_neg.detach() if detach_focal else w_neg)
    per_example = -(loss_pos + loss_neg).sum(dim=1)
    if reduction == "none":
        return per_example
    return per_example.sum() if reduction == "sum" else per_example.mean()
