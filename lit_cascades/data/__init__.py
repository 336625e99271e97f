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
from lit_cascades.data.scenes import SceneRetrievalDataModule
from lit_cascades.data.text_sketch import TextSketchImageDataModule, WordVocab

__all__ = [
    "SOURCES",
    "CocoCaptionsDataModule",
    "EpochSeededSampler",
    "ImageClassificationDataModule",
    "SceneRetrievalDataModule",
    "TextSketchImageDataModule",
    "WordVocab",
    "load_cifar",
    "load_idx_dataset",
    "read_idx",
]
