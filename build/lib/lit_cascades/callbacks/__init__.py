"""Lightning callbacks that log curves and tables (files always; W&B/TensorBoard media when attached)."""

from lit_cascades.callbacks.deferral import (
    DeferralCurveLogger,
    deferral_batch,
    deferral_table,
    save_deferral_curves,
)
from lit_cascades.callbacks.ranking import RankingAUCLogger, pareto_mask, plot_auc_pareto, ranking_batch

__all__ = [
    "DeferralCurveLogger",
    "RankingAUCLogger",
    "deferral_batch",
    "deferral_table",
    "pareto_mask",
    "plot_auc_pareto",
    "ranking_batch",
    "save_deferral_curves",
]
