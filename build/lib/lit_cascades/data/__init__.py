"""LightningDataModules: embedded offline sources plus local-file and hub sources for real runs."""

from lit_cascades.data.coco import CocoCaptionsDataModule
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
from lit_cascades.data.retrieval import (
    RetrievalDataModule,
    RetrievalSplit,
    TripleDataset,
    build_code_search_splits,
    extract_code_search_pairs,
    load_msmarco_split,
)
from lit_cascades.data.scenes import SceneRetrievalDataModule
from lit_cascades.data.selection import (
    SALTDataModule,
    SequenceSelector,
    StagedBatchSampler,
    model_fingerprint,
)
from lit_cascades.data.text_sketch import TextSketchImageDataModule, WordVocab

__all__ = [
    "SOURCES",
    "CocoCaptionsDataModule",
    "DigitsRankingDataModule",
    "EpochSeededSampler",
    "ImageClassificationDataModule",
    "MultiLabelDataModule",
    "RankingData",
    "RetrievalDataModule",
    "RetrievalSplit",
    "SALTDataModule",
    "SceneRetrievalDataModule",
    "SequenceSelector",
    "StagedBatchSampler",
    "SyntheticRankingDataModule",
    "TabularRankingDataModule",
    "TextSketchImageDataModule",
    "TripleDataset",
    "WordVocab",
    "build_code_search_splits",
    "extract_code_search_pairs",
    "load_cifar",
    "load_digits_ranking",
    "load_idx_dataset",
    "load_msmarco_split",
    "load_table",
    "make_synthetic_ranking",
    "model_fingerprint",
    "read_idx",
]
