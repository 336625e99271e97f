"""LightningModules, one file per paper; thin wrappers over :mod:`lit_cascades.functional`."""

from lit_cascades.modules.gatekeeper import Classifier, GatekeeperClassifier
from lit_cascades.modules.ranking import MultiLabelRanker
from lit_cascades.modules.salt import SALT
from lit_cascades.modules.speculative_cascade import SpeculativeCascade
from lit_cascades.modules.taskformer import TaskFormer
from lit_cascades.modules.ustad import USTAD, USTADStudent

__all__ = [
    "SALT",
    "USTAD",
    "Classifier",
    "GatekeeperClassifier",
    "MultiLabelRanker",
    "SpeculativeCascade",
    "TaskFormer",
    "USTADStudent",
]
