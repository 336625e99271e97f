"""Lightning callbacks that log curves and tables (files always; W&B/TensorBoard media when attached)."""

from lit_cascades.callbacks.deferral import (
    DeferralCurveLogger,
    deferral_batch,
    deferral_table,
    save_deferral_curves,
)

__all__ = ["DeferralCurveLogger", "deferral_batch", "deferral_table", "save_deferral_curves"]
