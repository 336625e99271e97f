"""LightningModules, one file per paper; thin wrappers over :mod:`lit_cascades.functional`."""

from lit_cascades.modules.gatekeeper import Classifier, GatekeeperClassifier
from lit_cascades.modules.ranking import MultiLabelRanker
from lit_cascades.modules.speculative_cascade import SpeculativeCascade
from lit_cascades.modules.taskformer import TaskFormer

__all__ = [
    "Classifier",
    "GatekeeperClassifier",
    "MultiLabelRanker",
    "SpeculativeCascade",
    "TaskFormer",
]
