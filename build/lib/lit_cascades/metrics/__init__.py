"""torchmetrics ``Metric`` classes over :mod:`lit_cascades.functional` (epoch-level, DDP-synced)."""

from lit_cascades.metrics.deferral import DeferralMetrics
from lit_cascades.metrics.ranking import MultiLabelAUROC, RankingAUCReport, ranking_auc_report

__all__ = [
    "DeferralMetrics",
    "MultiLabelAUROC",
    "RankingAUCReport",
    "ranking_auc_report",
]
