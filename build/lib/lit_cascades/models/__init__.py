"""Backbones: plain-torch vision classifiers and offline-safe Hugging Face loading."""

from lit_cascades.models.hf import hub_offline, load_pretrained, resolve_pretrained
from lit_cascades.models.speculative import SpeculativeOutput, speculative_generate
from lit_cascades.models.vision import ARCHITECTURES, CNN, MLP, build_classifier, count_parameters

__all__ = [
    "ARCHITECTURES",
    "CNN",
    "MLP",
    "SpeculativeOutput",
    "build_classifier",
    "count_parameters",
    "hub_offline",
    "load_pretrained",
    "resolve_pretrained",
    "speculative_generate",
]
