"""LightningDataModules: embedded offline sources plus local-file and hub sources for real runs."""

from lit_cascades.data.image import (
    SOURCES,
    EpochSeededSampler,
    ImageClassificationDataModule,
    load_cifar,
    load_idx_dataset,
    read_idx,
)

__all__ = [
    "SOURCES",
    "EpochSeededSampler",
    "ImageClassificationDataModule",
    "load_cifar",
    "load_idx_dataset",
    "read_idx",
]
