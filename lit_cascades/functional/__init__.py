"""Pure-torch functional core of lit_cascades (never imports Lightning)."""

from lit_cascades.functional.confidence import CONFIDENCE_KINDS, confidence_from_logits
from lit_cascades.functional.deferral import (
    DeferralCurve,
    DeferralReport,
    area_under_deferral_curve,
    calibrate_threshold,
    deferral_auroc,
    deferral_curve,
    deferral_metrics,
    deferral_performance,
    distributional_overlap,
    ideal_deferral_curve,
    quality_at_rate,
    random_deferral_curve,
)
from lit_cascades.functional.gatekeeper import GatekeeperLossOutput, gatekeeper_loss, kl_to_uniform

__all__ = [
    "CONFIDENCE_KINDS",
    "DeferralCurve",
    "DeferralReport",
    "GatekeeperLossOutput",
    "area_under_deferral_curve",
    "calibrate_threshold",
    "confidence_from_logits",
    "deferral_auroc",
    "deferral_curve",
    "deferral_metrics",
    "deferral_performance",
    "distributional_overlap",
    "gatekeeper_loss",
    "ideal_deferral_curve",
    "kl_to_uniform",
    "quality_at_rate",
    "random_deferral_curve",
]
