"""Argument validation shared by the functional core.

Every public function in :mod:`lit_cascades.functional` validates its inputs with these helpers so that bad
input fails early with a message naming the argument, what was expected and what was received.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_finite(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or ±inf (a finite sum proves all values finite: fast path)."""
    if not x.is_floating_point() or bool(torch.isfinite(x.double().sum())):
        return
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"`{name}` must be finite; got {n_nan} NaN and {n_inf} inf values in shape {tuple(x.shape)}")


def check_nonempty(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` if ``x`` has no elements."""
    if x.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)}); expected at least one element")


def check_same_length(**tensors: Tensor) -> int:
    """Check that all 1-D tensors have the same length and return it."""
    lengths = {name: (t.shape[0] if t.ndim > 0 else -1) for name, t in tensors.items()}
    for name, t in tensors.items():
        if t.ndim != 1:
            raise ValueError(f"`{name}` must be 1-D of shape [N]; got shape {tuple(t.shape)}")
    if len(set(lengths.values())) > 1:
        got = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise ValueError(f"length mismatch: expected equal lengths, got {got}")
    return next(iter(lengths.values()))


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``low (<|<=) value (<|<=) high``."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"`{name}` must be in {lb}{low}, {high}{hb}; got {value}")


def check_choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}; got {value!r}")


def check_ints(**values: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless each ``name=(value, low)`` is an integer (not a bool) >= ``low``."""
    for name, (n, low) in values.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < low:
            raise ValueError(f"`{name}` must be an integer >= {low}; got {n!r}")


def check_optimizer_args(recall_ks: Sequence[int], weight_decay: float, **rates: float) -> None:
    """Constructor checks of the retrieval modules: learning rates > 0, ``weight_decay`` >= 0, ``recall_ks`` a
    non-empty list of integers >= 1."""
    for name, x in rates.items():
        if not x > 0:
            raise ValueError(f"`{name}` must be > 0; got {x}")
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0; got {weight_decay}")
    if not recall_ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in recall_ks):
        raise ValueError(f"`recall_ks` must be a non-empty list of integers >= 1; got {list(recall_ks)}")
