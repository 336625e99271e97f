"""``MultiLabelRanker``: one scorer trained to rank well for several binary labels at once.

Lukasik et al., "Bipartite Ranking From Multiple Labels: On Loss Versus Label Aggregation", ICML 2025
(arXiv:2504.11284). Two ways to turn ``K`` labels into one pairwise objective
(:mod:`lit_cascades.functional.ranking` has the math and the Bayes-optimal scorers):

* ``aggregation="loss"`` (LoA): ``Σ_k a_k`` · (label ``k``'s pairwise loss over its positive–negative pairs).
  Optimal ranking ``Σ_k a_k η_k / (π_k (1 − π_k))``: skewed labels get a larger effective weight, and with
  deterministic labels one label can dictate the order (Prop. 6.1).
* ``aggregation="label"`` (LaA): aggregate ``Ȳ = Σ_k w_k Y_k`` first, then one multipartite pairwise loss
  with the ``"difference"`` cost (optimal ranking ``Σ_k w_k η_k``, prior-free) or the ``"uniform"`` cost.

Batches are dicts ``{"x": [B, D], "labels": [B, K], "index": [B]}`` (optionally ``"group": [B]``: pairs only
within a group). ``validation_step``/``test_step`` return ``{"ranking": {"scores", "labels", "ids"}}``,
the contract of :class:`~lit_cascades.callbacks.RankingAUCLogger`, which logs ``rank/auc_<label>``,
``rank/auc_min``... Under DDP the training loss gathers the scores of all processes (with gradients), so
``2 × B/2`` pairs exactly as ``1 × B``.

Subclass hooks: :meth:`build_scorer` (the network), :meth:`forward` (batch features → ``[B]`` scores),
:meth:`aggregate_labels` (LaA's ``Ȳ``), :meth:`ranking_loss` (the whole aggregation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lit_cascades.functional._checks import check_choice
from lit_cascades.functional.auroc import PAIR_COSTS
from lit_cascades.functional.ranking import (
    LABEL_AGGS,
    SURROGATES,
    RankingLossOutput,
    aggregate_labels,
    check_weights,
    effective_loss_weights,
    loss_aggregation_loss,
    multipartite_pairwise_loss,
)
from lit_cascades.models.vision import MLP

AGGREGATIONS = ("loss", "label")


class MultiLabelRanker(pl.LightningModule):
    """A scorer ``f: x → ℝ`` trained with loss aggregation or label aggregation of ``K`` binary labels.

    Args:
        scorer: any ``nn.Module`` mapping features ``[B, D]`` to ``[B]`` or ``[B, 1]`` scores; built by
            :meth:`build_scorer` (an MLP over ``num_features``) when ``None``.
        num_features: input width ``D`` for the default scorer.
        label_names: names of the ``K`` labels (log keys ``rank/auc_<name>``).
        aggregation: ``"loss"`` (LoA) or ``"label"`` (LaA).
        weights: ``[K]`` label weights (LoA's ``a``; LaA's weights of the sum). Default equal. Must be
            non-negative with a positive sum; they are normalised.
        cost: LaA pair cost, ``"difference"`` (Prop. 5.4) or ``"uniform"`` (Prop. 5.3).
        label_agg: LaA aggregation, ``"sum"`` or ``"product"``.
        surrogate: ``"logistic"`` (default; the paper's exact surrogate is unverified), ``"hinge"``,
            ``"squared"``.
        num_pairs, pair_fraction: sample pairs instead of using all in-batch pairs (large batches).
        hidden: hidden widths of the default MLP scorer (``[]`` = a linear scorer).
        lr, weight_decay: AdamW settings.
        gather_distributed: under DDP, form pairs over the global batch (scores gathered with gradients).
    """

    def __init__(
        self,
        scorer: nn.Module | None = None,
        num_features: int | None = None,
        label_names: Sequence[str] = ("label0", "label1"),
        aggregation: str = "label",
        weights: Sequence[float] | None = None,
        cost: str = "difference",
        label_agg: str = "sum",
        surrogate: str = "logistic",
        num_pairs: int | None = None,
        pair_fraction: float | None = None,
        hidden: Sequence[int] = (64,),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        check_choice("aggregation", aggregation, AGGREGATIONS)
        check_choice("cost", cost, PAIR_COSTS)
        check_choice("label_agg", label_agg, LABEL_AGGS)
        check_choice("surrogate", surrogate, SURROGATES)
        label_names = [str(n) for n in label_names]
        if not label_names:
            raise ValueError("`label_names` is empty; expected one name per label")
        if weights is not None:
            weights = [float(w) for w in weights]
            check_weights(weights, len(label_names))
            if aggregation == "label" and label_agg == "product":
                raise ValueError("`weights` have no effect with label_agg='product'; pass weights=None")
        if num_pairs is not None and pair_fraction is not None:
            raise ValueError("give at most one of `num_pairs` and `pair_fraction`; got both")
        self.save_hyperparameters(ignore=["scorer"])
        self.label_names = label_names
        self.scorer = scorer if scorer is not None else self.build_scorer()

    # -- hooks --------------------------------------------------------------------------------------------
    def build_scorer(self) -> nn.Module:
        """The default scorer: an MLP ``[B, D] → [B, 1]`` with ``hidden`` ReLU layers."""
        if self.hparams.num_features is None:
            raise ValueError("pass `scorer=` or `num_features=` (the input width of the default MLP scorer)")
        return MLP((int(self.hparams.num_features),), 1, list(self.hparams.hidden))

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``[B]`` (higher = ranked first) for features ``x`` ``[B, D]``."""
        s = self.scorer(x)
        return s.squeeze(-1) if s.ndim == 2 and s.shape[-1] == 1 else s

    def aggregate_labels(self, labels: Tensor) -> Tensor:
        """LaA's multi-level label ``Ȳ`` ``[B]`` from binary ``labels`` ``[B, K]``."""
        h = self.hparams
        return aggregate_labels(labels, h.label_agg, h.weights if h.label_agg == "sum" else None)

    def ranking_loss(self, scores: Tensor, labels: Tensor, groups: Tensor | None = None) -> RankingLossOutput:
        """The aggregated pairwise loss of a batch: ``scores [B]``, ``labels [B, K]``, ``groups [B]``."""
        h = self.hparams
        pairs = {"groups": groups, "num_pairs": h.num_pairs, "pair_fraction": h.pair_fraction}
        if h.aggregation == "loss":
            return loss_aggregation_loss(scores, labels, h.weights, h.surrogate, **pairs)
        levels = self.aggregate_labels(labels)
        return multipartite_pairwise_loss(scores, levels, h.cost, h.surrogate, **pairs)

    # -- steps --------------------------------------------------------------------------------------------
    def _check_batch(self, batch: Mapping[str, Tensor]) -> None:
        missing = {"x", "labels"} - set(batch)
        if missing:
            raise KeyError(f"a ranking batch needs keys 'x' and 'labels'; missing {sorted(missing)}")
        k = len(self.label_names)
        if batch["labels"].ndim != 2 or batch["labels"].shape[1] != k:
            raise ValueError(f"batch['labels'] must be [B, {k}] for labels {self.label_names}; got "
                             f"{tuple(batch['labels'].shape)}")

    def _gather(self, scores: Tensor, labels: Tensor, groups: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Concatenate the batch of every process (scores keep their gradient) under DDP."""
        if not self.hparams.gather_distributed or self._trainer is None or self.trainer.world_size <= 1:
            return scores, labels, groups
        scores = self.all_gather(scores, sync_grads=True).reshape(-1)
        labels = self.all_gather(labels).reshape(-1, labels.shape[-1])
        if groups is not None:
            groups = self.all_gather(groups).reshape(-1)
        return scores, labels, groups

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        self._check_batch(batch)
        scores = self(batch["x"])
        scores, labels, groups = self._gather(scores, batch["labels"], batch.get("group"))
        out = self.ranking_loss(scores, labels, groups)
        size = scores.shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
        if self.hparams.aggregation == "loss":
            for name, value in zip(self.label_names, out.per_label):
                self.log(f"train/loss_{name}", value, batch_size=size)
        return out.loss

    def _eval_step(self, batch: Mapping[str, Tensor], stage: str) -> dict[str, Any]:
        self._check_batch(batch)
        scores = self(batch["x"])
        out = self.ranking_loss(scores, batch["labels"], batch.get("group"))
        self.log(f"{stage}/loss", out.loss, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=scores.shape[0])
        ranking = {"scores": scores.detach(), "labels": batch["labels"]}
        if "index" in batch:
            ranking["ids"] = batch["index"]
        return {"ranking": ranking}

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        out = {"scores": self(batch["x"])}
        for key in ("index", "labels", "eta"):
            if key in batch:
                out[key] = batch[key]
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # -- diagnostics --------------------------------------------------------------------------------------
    def effective_label_weights(self, priors: Sequence[float] | Tensor) -> dict[str, float]:
        """The weight each label gets in the Bayes-optimal ranking of this objective, normalised to sum 1.

        LoA: ``a_k / (π_k (1 − π_k))`` (the one above the others dictates with deterministic labels);
        LaA with the sum and the difference cost: the weights of the sum (``w_k``), whatever the priors.
        NaN for LaA's uniform cost or product aggregation (no per-label weights).
        """
        h = self.hparams
        if h.aggregation == "loss":
            w = effective_loss_weights(h.weights, priors)
        elif h.cost == "difference" and h.label_agg == "sum":
            w = check_weights(h.weights, len(self.label_names))
        else:
            w = torch.full((len(self.label_names),), float("nan"), dtype=torch.float64)
        return dict(zip(self.label_names, w.tolist()))


__all__ = ["AGGREGATIONS", "MultiLabelRanker"]
