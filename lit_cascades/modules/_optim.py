"""Learning-rate schedules shared by the modules (one place, so no module carries its own lambda).

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
