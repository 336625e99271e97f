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
the contract of :class:`~lit_cascades.callbacks.RankingAUCLogger`, which logs ``<split>/rank/auc_<label>``,
``<split>/rank/auc_min``... Under DDP the training loss gathers the scores of all processes (with gradients), so
``2 × B/2`` pairs exactly as ``1 × B``.

Subclass hooks: :meth:`build_scorer` (the network), :meth:`forward` (batch features → ``[B]`` scores),
:meth:`aggregate_labels` (LaA's ``Ȳ``), :meth:`ranking_loss` (the whole aggregation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

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
from lit_cascades.modules._optim import adamw

AGGREGATIONS = ("loss", "label")


class MultiLabelRanker(pl.LightningModule):
    """A scorer ``f: x → ℝ`` trained with loss aggregation or label aggregation of ``K`` binary labels.

    Args:
        scorer: any ``nn.Module`` mapping features ``[B, D]`` to ``[B]`` or ``[B, 1]`` scores; built by
            :meth:`build_scorer` (an MLP over ``num_features``) when ``None``.
        num_features: input width ``D`` for the default scorer.
        label_names: names of the ``K`` labels (log keys ``<split>/rank/auc_<name>``).
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
        label_names = self._check_arguments(scorer, num_features, label_names, aggregation, weights, cost,
                                            label_agg, surrogate, num_pairs, pair_fraction, hidden, lr, weight_decay)
        if weights is not None:
            weights = [float(w) for w in weights]
        self.save_hyperparameters(ignore=["scorer"])
        self.label_names = label_names
        self.scorer = scorer if scorer is not None else self.build_scorer()

    @staticmethod
    def _check_arguments(scorer: nn.Module | None, num_features: int | None, label_names: Sequence[str],
                         aggregation: str, weights: Sequence[float] | None, cost: str, label_agg: str,
                         surrogate: str, num_pairs: int | None, pair_fraction: float | None, hidden: Sequence[int],
                         lr: float, weight_decay: float) -> list[str]:
        """Validate the constructor's arguments (messages start with the argument's name); return the names."""
        for name, value, choices in (("aggregation", aggregation, AGGREGATIONS), ("cost", cost, PAIR_COSTS),
                                     ("label_agg", label_agg, LABEL_AGGS), ("surrogate", surrogate, SURROGATES)):
            if value not in choices:
                raise ValueError(f"{name}: expected one of {list(choices)}; got {value!r}")
        if isinstance(label_names, str):
            raise ValueError(f"label_names: expected a list of names; got the string {label_names!r}")
        names = [str(n) for n in label_names]
        if not names:
            raise ValueError("label_names: expected one name per label; got an empty list")
        if len(set(names)) != len(names):
            raise ValueError(f"label_names: expected distinct names; got {names}")
        if weights is not None:
            check_weights([float(w) for w in weights], len(names))
            if aggregation == "label" and label_agg == "product":
                raise ValueError("weights: they have no effect with label_agg='product'; pass weights=None")
        if scorer is not None and not isinstance(scorer, nn.Module):
            raise TypeError(f"scorer: expected an nn.Module; got {type(scorer).__name__}")
        if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)
                                         or num_features < 1):
            raise ValueError(f"num_features: expected an integer >= 1; got {num_features!r}")
        if isinstance(hidden, str) or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden: expected a list of layer widths >= 1 ([] = linear); got {hidden!r}")
        if num_pairs is not None and pair_fraction is not None:
            raise ValueError("num_pairs: give at most one of `num_pairs` and `pair_fraction`; got both")
        if num_pairs is not None and (isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1):
            raise ValueError(f"num_pairs: expected an integer >= 1 or None; got {num_pairs!r}")
        if pair_fraction is not None and not 0.0 < float(pair_fraction) <= 1.0:
            raise ValueError(f"pair_fraction: expected a fraction in (0, 1] or None; got {pair_fraction!r}")
        if not math.isfinite(float(lr)) or float(lr) <= 0:
            raise ValueError(f"lr: expected a positive learning rate; got {lr!r}")
        if not math.isfinite(float(weight_decay)) or float(weight_decay) < 0:
            raise ValueError(f"weight_decay: expected a number >= 0; got {weight_decay!r}")
        return names

    # -- hooks --------------------------------------------------------------------------------------------
    def build_scorer(self) -> nn.Module:
        """The default scorer: an MLP ``[B, D] → [B, 1]`` with ``hidden`` ReLU layers."""
        if self.hparams.num_features is None:
            raise ValueError("num_features: pass `num_features=` (the input width of the default MLP scorer) "
                             "or `scorer=`")
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
        return adamw(self, self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

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
