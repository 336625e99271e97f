"""The modules' optimizer (:func:`adamw`) and learning-rate schedules (one place, so no module carries its own).

The schedules are transformers' (``get_linear_schedule_with_warmup``, ``get_cosine_with_min_lr_schedule_
with_warmup``), stepped once per optimizer step. Their warm-up is linear from 0: the factor at step ``s <
warmup`` is ``s / warmup`` (step 0 runs at lr 0), then

* linear: ``(total − s) / (total − warmup)``, reaching 0 at ``total``;
* cosine: ``r + (1 − r) · ½(1 + cos(π · (s − warmup) / (total − warmup)))``, from 1 down to the floor ``r =
  min_lr_ratio`` at ``total`` (``r = 0``: plain cosine annealing to 0, as ``CosineAnnealingLR``).

Each module keeps its own clamp of the warm-up (e.g. ``min(warmup_steps, total // 2)``) and passes the
clamped value here.
"""

from __future__ import annotations

from typing import Any

import torch

#: Lightning precisions under which the fused AdamW is used: mixed precision unscales gradients for clipping
#: before the step, which a fused optimizer does inside it, so Lightning refuses clipping with one there
FUSED_PRECISIONS = ("32-true", "64-true", "32", "64")


def adamw(module: Any, params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, with torch's fused implementation where it applies.

    The fused update is one kernel over all parameters instead of a dozen element-wise operations per parameter
    tensor. Where a model has many small tensors that loop is much of a CPU step: ``python -m
    benchmarks.optimizer_step`` times whole training steps both ways. Used when the run's precision is full
    (:data:`FUSED_PRECISIONS`; no trainer attached counts as full) and this torch supports it for the parameters'
    device and dtype (CUDA; CPU from torch 2.4); otherwise the default implementation. Both compute the same
    update up to floating-point rounding. Pass ``fused`` in ``kwargs`` to choose yourself.

    Args:
        module: the LightningModule whose trainer's precision decides (``module._trainer`` may be None).
        params: parameters or parameter groups, as for :class:`torch.optim.AdamW`.
    """
    if "fused" not in kwargs:
        trainer = getattr(module, "_trainer", None)
        precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
        if precision in FUSED_PRECISIONS:
            groups = list(params)
            try:
                return torch.optim.AdamW(groups, fused=True, **kwargs)
            except (RuntimeError, ValueError):  # a device, dtype or torch version without the fused kernel
                params = groups
    return torch.optim.AdamW(params, **kwargs)


def fused_adamw_on_cpu() -> bool:
    """Whether this torch has the fused AdamW for CPU tensors (torch >= 2.4), i.e. whether :func:`adamw` is fused
    for a CPU run at full precision."""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except RuntimeError:
        return False
    return True


def total_steps(module: Any) -> int:
    """Optimizer steps of the run (Lightning's ``estimated_stepping_batches``), at least 1."""
    return max(int(module.trainer.estimated_stepping_batches), 1)


def linear_warmup_decay(opt: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total`` (transformers' schedule)."""
    from transformers.optimization import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)


def cosine_warmup_decay(opt: torch.optim.Optimizer, total: int, warmup: int = 0, min_lr_ratio: float = 0.0
                        ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then half-cosine decay to ``lr · min_lr_ratio`` at ``total``."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"`min_lr_ratio` must be in [0, 1]; got {min_lr_ratio}")
    return get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total,
                                                       min_lr_rate=float(min_lr_ratio))


def per_step(opt: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """The ``configure_optimizers`` return value of a scheduler stepped after every optimizer step."""
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
