"""Pure-torch functional core of lit_cascades (never imports Lightning)."""

from lit_cascades.functional.asymmetric import asymmetric_loss
from lit_cascades.functional.auroc import binary_auroc, level_pair_auroc, multipartite_auroc
from lit_cascades.functional.confidence import CONFIDENCE_KINDS, confidence_from_logits
from lit_cascades.functional.contrastive import ContrastiveOutput, gather_with_grad, info_nce
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
from lit_cascades.functional.fusion import late_fusion
from lit_cascades.functional.gatekeeper import GatekeeperLossOutput, gatekeeper_loss, kl_to_uniform
from lit_cascades.functional.ranking import (
    RankingLossOutput,
    aggregate_labels,
    bayes_optimal_label_aggregation,
    bayes_optimal_loss_aggregation,
    bipartite_pairwise_losses,
    effective_loss_weights,
    label_aggregation_loss,
    loss_aggregation_loss,
    multipartite_pairwise_loss,
    pairwise_surrogate,
    population_auroc,
    population_multipartite_auroc,
)
from lit_cascades.functional.retrieval import (
    Qrels,
    chunked_topk,
    dense_topk,
    rerank,
    retrieval_metrics,
)
from lit_cascades.functional.speculative import (
    RULES as SPECULATIVE_RULES,
)
from lit_cascades.functional.speculative import (
    rule_acceptance,
    target_distribution,
    verify_block,
)

__all__ = [
    "CONFIDENCE_KINDS",
    "SPECULATIVE_RULES",
    "ContrastiveOutput",
    "DeferralCurve",
    "DeferralReport",
    "GatekeeperLossOutput",
    "Qrels",
    "RankingLossOutput",
    "aggregate_labels",
    "area_under_deferral_curve",
    "asymmetric_loss",
    "bayes_optimal_label_aggregation",
    "bayes_optimal_loss_aggregation",
    "binary_auroc",
    "bipartite_pairwise_losses",
    "calibrate_threshold",
    "chunked_topk",
    "confidence_from_logits",
    "deferral_auroc",
    "deferral_curve",
    "deferral_metrics",
    "deferral_performance",
    "dense_topk",
    "distributional_overlap",
    "effective_loss_weights",
    "gatekeeper_loss",
    "gather_with_grad",
    "ideal_deferral_curve",
    "info_nce",
    "kl_to_uniform",
    "label_aggregation_loss",
    "late_fusion",
    "level_pair_auroc",
    "loss_aggregation_loss",
    "multipartite_auroc",
    "multipartite_pairwise_loss",
    "pairwise_surrogate",
    "population_auroc",
    "population_multipartite_auroc",
    "quality_at_rate",
    "random_deferral_curve",
    "rerank",
    "retrieval_metrics",
    "rule_acceptance",
    "target_distribution",
    "verify_block",
]
