"""Training-order helpers shared by the datamodules: an epoch-seeded shuffling sampler, global batch sizes and
the per-split loader methods.

**Global batch sizes.** A datamodule's ``batch_size`` is the batch of one optimisation step, whatever the number
of processes: under DDP with ``W`` processes each loads ``batch_size / W`` rows (:func:`process_batch_size`).
With :class:`EpochSeededSampler` every process draws the same permutation, and Lightning's distributed wrapper
hands process ``r`` the rows ``r, r + W, ...`` of it, so step ``k`` sees the same rows in total as one process
with the full batch, and DDP's averaged gradient equals the single-process gradient (up to float summation
order; use ``trainer.sync_batchnorm=true`` for models with BatchNorm). This is what lets a recipe give the same
results on 1 and on ``W`` processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` every epoch (under DDP the runner passes it through Lightning's
    distributed wrapper), so a run resumed from a checkpoint sees exactly the same batches as an uninterrupted
    one, and every process draws the same permutation.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def process_batch_size(batch_size: int, trainer: Any = None) -> int:
    """The rows one process loads per step so that the step's global batch is ``batch_size``.

    Raises:
        ValueError: ``batch_size`` is not divisible by the number of processes (named in the message).
    """
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world > 1 and batch_size % world:
        raise ValueError(f"batch_size: {batch_size} is the global batch of a step and must be divisible by the "
                         f"{world} processes; choose a multiple of {world}")
    return batch_size // world


class SplitLoaders:
    """The split loaders of a datamodule that builds each one with ``_loader(split, shuffle)``.

    ``train_dataloader`` shuffles; ``val_dataloader``, ``test_dataloader`` and ``predict_dataloader(split)``
    (default ``"test"``) keep the order. Put it before ``LightningDataModule`` in the bases.
    """

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self, split: str = "test") -> DataLoader:
        return self._loader(split, shuffle=False)
