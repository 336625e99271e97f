"""torchmetrics ``Metric`` classes over :mod:`lit_cascades.functional` (epoch-level, DDP-synced)."""

from lit_cascades.metrics.deferral import DeferralMetrics

__all__ = ["DeferralMetrics"]
