"""The base of the metric-logging callbacks: validation/test step outputs in, one report per epoch end out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl


class StageMetricsCallback(pl.Callback):
    """Routes each validation/test step output to :meth:`_update` and each epoch end to :meth:`_finish`.

    The sanity-check validation Lightning runs before training is skipped (its batches are not the
    validation set). Subclasses set ``self.key`` (the step-output key they read) and implement both methods;
    :meth:`_batch` fetches and checks their part of a step output.
    """

    key: str

    def _update(self, pl_module: pl.LightningModule, outputs: Any, stage: str) -> None:
        raise NotImplementedError

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        raise NotImplementedError

    def _batch(self, outputs: Any, required: Sequence[str]) -> Mapping[str, Any] | None:
        """``outputs[self.key]``, or ``None`` when the step returned no such entry.

        Raises:
            KeyError: when the entry lacks one of ``required``, naming the missing keys.
        """
        if not isinstance(outputs, Mapping) or self.key not in outputs:
            return None
        batch = outputs[self.key]
        missing = set(required) - set(batch)
        if missing:
            names = ", ".join(required[:-1]) + " and " + required[-1] if len(required) > 1 else required[0]
            raise KeyError(f"the `{self.key}` step output must hold {names}; missing {sorted(missing)}")
        return batch

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._update(pl_module, outputs, "val")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(pl_module, outputs, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")
