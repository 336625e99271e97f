"""Sequence-level deferral scores from per-token log-probabilities.

Reference: Gupta et al., "Language Model Cascades: Token-level Uncertainty and Beyond", ICLR 2024
(arXiv:2404.10136), §3–4.

The small model of a cascade generates ``ŷ_1..ŷ_T`` for an input ``x``; ``ℓ_t = log q(ŷ_t | x, ŷ_<t)`` are its
per-token log-probabilities of its own output. A batch of such sequences of different lengths is given as a
padded ``[B, T]`` tensor ``logprobs`` with a ``[B, T]`` ``mask`` (1/True = a real token, 0/False = padding).
Every score below is a *confidence*: higher means "keep the small model's answer", and the cascade defers
the lowest-scored inputs (the convention of :mod:`lit_cascades.functional.deferral`).

* Chow-Sum          ``Σ_t ℓ_t``, the log-probability of the whole output (biased to defer long outputs).
* Chow-Average      ``(1/T) Σ_t ℓ_t``, the log of the geometric mean of the token probabilities.
* Chow-Quantile(α)  the α-quantile of ``{ℓ_t}``; α = 0 is the least confident token, α = 1 the most.
* quantile features the vector of Chow-Quantile scores at several α — the input of the learned post-hoc
  deferral rule (Post-Hoc-Quantile).

Quantiles use linear interpolation between order statistics, exactly like ``torch.quantile`` (its default
``interpolation="linear"``) applied to each row's unpadded values. All functions are batched: one masked sort
per call, no Python loop over examples. Which tokens enter ``ℓ`` (e.g. whether the end-of-output token is
included) is decided by whoever builds ``mask``; the paper leaves it open.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_cascades.functional._checks import check_range

#: Default quantile levels of the post-hoc feature vector (the paper's exact set is not verified).
DEFAULT_QUANTILES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _validate(logprobs: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Check ``[B, T]`` log-probs and mask; return ``(logprobs, bool mask, lengths [B])``."""
    if not isinstance(logprobs, Tensor):
        raise TypeError(f"`logprobs` must be a torch.Tensor; got {type(logprobs).__name__}")
    if logprobs.ndim != 2:
        raise ValueError(f"`logprobs` must have shape [B, T]; got shape {tuple(logprobs.shape)}")
    if not logprobs.is_floating_point():
        raise TypeError(f"`logprobs` must be a floating-point tensor; got dtype {logprobs.dtype}")
    if mask is None:
        mask = torch.ones_like(logprobs, dtype=torch.bool)
    if not isinstance(mask, Tensor):
        raise TypeError(f"`mask` must be a torch.Tensor or None; got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(logprobs.shape):
        raise ValueError(
            f"`mask` must have the shape of `logprobs` {tuple(logprobs.shape)}; got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("`mask` must be boolean or hold only 0/1 integers")
        mask = mask.bool()
    lengths = mask.sum(-1)
    if logprobs.shape[0] == 0:
        raise ValueError("`logprobs` is empty (batch size 0); expected at least one sequence")
    empty = torch.nonzero(lengths == 0).squeeze(-1)
    if empty.numel() > 0:
        rows = empty[:5].tolist()
        raise ValueError(
            f"{empty.numel()} row(s) of `mask` have no valid token (all padding), e.g. rows {rows}; "
            "every sequence needs at least one token to be scored"
        )
    # fast path: the masked sum is finite iff every valid value is (NaN/inf propagate)
    if bool(torch.isfinite(torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum())):
        return logprobs, mask, lengths
    bad = mask & ~torch.isfinite(logprobs)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(-1)).squeeze(-1)[:5].tolist()
        n_nan = int((mask & torch.isnan(logprobs)).sum())
        raise ValueError(
            f"`logprobs` must be finite at unmasked positions; got {int(bad.sum())} non-finite values "
            f"({n_nan} NaN) in rows {rows}"
        )
    return logprobs, mask, lengths


def sequence_lengths(mask: Tensor) -> Tensor:
    """Number of valid tokens per row of a ``[B, T]`` mask, shape ``[B]`` (int64)."""
    return mask.bool().sum(-1)


def chow_sum(logprobs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Chow-Sum: ``Σ_t ℓ_t`` over the valid tokens, the log-probability of the whole output.

    Args:
        logprobs: ``[B, T]`` per-token log-probabilities (padding may hold anything, even NaN).
        mask: ``[B, T]`` bool/0-1, True at real tokens; ``None`` = all valid.

    Returns:
        ``[B]`` scores in the dtype of ``logprobs``.
    """
    logprobs, mask, _ = _validate(logprobs, mask)
    return torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum(-1)


def chow_average(logprobs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Chow-Average: ``(1/T) Σ_t ℓ_t``, the length-normalised Chow-Sum. Shapes as :func:`chow_sum`."""
    logprobs, mask, lengths = _validate(logprobs, mask)
    total = torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum(-1)
    return total / lengths.to(logprobs.dtype)


def _masked_quantiles(logprobs: Tensor, mask: Tensor, lengths: Tensor, q: Tensor) -> Tensor:
    """``[B, K]`` linear-interpolation quantiles of each row's valid values at levels ``q [K]``."""
    filled = torch.where(mask, logprobs, torch.full_like(logprobs, float("inf")))
    sorted_vals = torch.sort(filled, dim=-1).values  # valid values first, ascending
    pos = q.to(logprobs.dtype)[None, :] * (lengths.to(logprobs.dtype)[:, None] - 1)  # [B, K]
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (lengths - 1)[:, None])
    frac = pos - lo.to(pos.dtype)
    v_lo = sorted_vals.gather(-1, lo)
    v_hi = sorted_vals.gather(-1, hi)
    return v_lo + frac * (v_hi - v_lo)


def _as_levels(alphas: float | Sequence[float] | Tensor, device: torch.device) -> Tensor:
    q = torch.as_tensor(alphas, dtype=torch.float64, device=device).reshape(-1)
    if q.numel() == 0:
        raise ValueError("`alphas` is empty; expected at least one quantile level in [0, 1]")
    if bool(((q < 0) | (q > 1) | torch.isnan(q)).any()):
        raise ValueError(f"quantile levels `alphas` must be in [0, 1]; got {q.tolist()}")
    return q


def chow_quantile(logprobs: Tensor, mask: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """Chow-Quantile(α): the α-quantile of each row's valid log-probs (α = 0 → the least likely token).

    Equal to ``torch.quantile(logprobs[i, mask[i]], alpha)`` for every row ``i``.

    Args:
        logprobs: ``[B, T]`` per-token log-probabilities.
        mask: ``[B, T]`` bool/0-1 validity mask; ``None`` = all valid.
        alpha: quantile level in ``[0, 1]``.

    Returns:
        ``[B]`` scores.
    """
    check_range("alpha", float(alpha), 0.0, 1.0)
    return quantile_features(logprobs, mask, (float(alpha),))[:, 0]


def quantile_features(
    logprobs: Tensor, mask: Tensor | None = None, alphas: Sequence[float] | Tensor = DEFAULT_QUANTILES
) -> Tensor:
    """The Post-Hoc-Quantile feature vector: Chow-Quantile at every level of ``alphas``.

    Args:
        logprobs: ``[B, T]`` per-token log-probabilities.
        mask: ``[B, T]`` bool/0-1 validity mask; ``None`` = all valid.
        alphas: ``K`` quantile levels in ``[0, 1]``.

    Returns:
        ``[B, K]`` features; column ``k`` equals :func:`chow_quantile` at ``alphas[k]``.
    """
    logprobs, mask, lengths = _validate(logprobs, mask)
    q = _as_levels(alphas, logprobs.device)
    return _masked_quantiles(logprobs, mask, lengths, q)


def sequence_scores(
    logprobs: Tensor, mask: Tensor | None = None, alphas: Sequence[float] | Tensor = DEFAULT_QUANTILES
) -> dict[str, Tensor]:
    """Chow-Sum, Chow-Average and Chow-Quantile at every level of ``alphas`` from one validation and one sort.

    Args:
        logprobs: ``[B, T]`` per-token log-probabilities.
        mask: ``[B, T]`` bool/0-1 validity mask; ``None`` = all valid.
        alphas: ``K`` quantile levels.

    Returns:
        ``{"chow_sum": [B], "chow_average": [B], "quantiles": [B, K], "lengths": [B]}``.
    """
    logprobs, mask, lengths = _validate(logprobs, mask)
    total = torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum(-1)
    q = _as_levels(alphas, logprobs.device)
    return {
        "chow_sum": total,
        "chow_average": total / lengths.to(logprobs.dtype),
        "quantiles": _masked_quantiles(logprobs, mask, lengths, q),
        "lengths": lengths,
    }
