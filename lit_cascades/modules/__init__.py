"""LightningModules, one file per paper; thin wrappers over :mod:`lit_cascades.functional`."""

from lit_cascades.modules.gatekeeper import Classifier, GatekeeperClassifier

__all__ = ["Classifier", "GatekeeperClassifier"]
