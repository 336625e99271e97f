"""LightningDataModules: embedded offline sources plus local-file and hub sources for real runs."""

from lit_cascades.data.image import (
    SOURCES,
    EpochSeededSampler,
    ImageClassificationDataModule,
    load_cifar,
    load_idx_dataset,
    read_idx,
)
from lit_cascades.data.multilabel import (
    DigitsRankingDataModule,
    MultiLabelDataModule,
    RankingData,
    SyntheticRankingDataModule,
    TabularRankingDataModule,
    load_digits_ranking,
    load_table,
    make_synthetic_ranking,
)

__all__ = [
    "SOURCES",
    "DigitsRankingDataModule",
    "EpochSeededSampler",
    "ImageClassificationDataModule",
    "MultiLabelDataModule",
    "RankingData",
    "SyntheticRankingDataModule",
    "TabularRankingDataModule",
    "load_cifar",
    "load_digits_ranking",
    "load_idx_dataset",
    "load_table",
    "make_synthetic_ranking",
    "read_idx",
]
