"""Classification cascades: a cross-entropy ``Classifier`` and the Gatekeeper fine-tuning module.

Reference: Rabanser et al., "Gatekeeper: Improving Model Cascades Through Confidence Tuning",
arXiv:2502.19335. The small model ``M_S`` is first trained with cross-entropy (:class:`Classifier`), then
fine-tuned with the Gatekeeper loss (:class:`GatekeeperClassifier`); the large model ``M_L`` stays fixed and
its per-example correctness is cached on the evaluation splits (batch key ``"large_quality"``), so every
validation/test step can feed the deferral curve (:class:`~lit_cascades.callbacks.DeferralCurveLogger`).

Subclass hooks: :meth:`Classifier.compute_loss` (the training objective) and :meth:`Classifier.confidence`
(the deferral score; higher = keep the small model's answer).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lit_cascades.callbacks.deferral import deferral_batch
from lit_cascades.functional._checks import check_choice, check_range
from lit_cascades.functional.confidence import CONFIDENCE_KINDS, ConfidenceKind, confidence_from_logits
from lit_cascades.functional.gatekeeper import Normalize, gatekeeper_loss, use_native_kernel
from lit_cascades.modules._optim import adamw, cosine_warmup_decay, per_step, total_steps


class Classifier(pl.LightningModule):
    """A classifier trained with cross-entropy; also the base class of cascade classification modules.

    Args:
        model: any ``nn.Module`` mapping ``x [B, ...]`` to logits ``[B, C]``.
        num_classes: ``C``.
        lr: learning rate (AdamW).
        weight_decay: AdamW weight decay.
        scheduler: ``"cosine"`` (to 0 over the run) or ``"none"``.
        confidence: the default deferral score (see :func:`~lit_cascades.functional.confidence_from_logits`).

    Batches are dicts with ``"x"``, ``"y"`` and, on evaluation splits of a cascade, ``"large_quality"``
    (``[B]`` quality of the large model's answer). Then ``validation_step``/``test_step`` return the
    ``{"deferral": ...}`` output consumed by the deferral callback.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        confidence: ConfidenceKind = "max_prob",
    ) -> None:
        super().__init__()
        check_choice("scheduler", scheduler, ("cosine", "none"))
        check_choice("confidence", confidence, CONFIDENCE_KINDS)
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0; got {lr}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    # -- hooks to override -------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, C]`` logits."""
        return self.model(x)

    def compute_loss(self, logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Training objective: ``(loss, extra scalars to log under train/)``. Cross-entropy here."""
        return F.cross_entropy(logits, target), {}

    def confidence(self, logits: Tensor) -> Tensor:
        """Deferral score ``[B]`` from logits ``[B, C]`` (higher = keep the small model's answer)."""
        return confidence_from_logits(logits, self.hparams.confidence)

    # -- steps -------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["x"])
        loss, extras = self.compute_loss(logits, batch["y"])
        self.train_acc(logits.argmax(-1), batch["y"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        for k, v in extras.items():
            self.log(f"train/{k}", v)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Any]:
        logits = self(batch["x"])
        pred = logits.argmax(-1)
        acc = self.val_acc if stage == "val" else self.test_acc
        acc(pred, batch["y"])
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["y"]), prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        if "large_quality" not in batch:
            return {}
        return deferral_batch(self.confidence(logits), (pred == batch["y"]).float(), batch["large_quality"].float(),
                              batch.get("index"))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """``{"pred", "confidence", "correct", "index"}`` per example (for caching a model's answers)."""
        logits = self(batch["x"])
        pred = logits.argmax(-1)
        return {"pred": pred, "confidence": self.confidence(logits), "correct": (pred == batch["y"]).float(),
                "index": batch["index"]}

    def configure_optimizers(self) -> Any:
        opt = adamw(self, self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "none":
            return opt
        return per_step(opt, cosine_warmup_decay(opt, total_steps(self)))  # cosine annealing to 0, no warm-up


class GatekeeperClassifier(Classifier):
    """Fine-tunes a trained small classifier with the Gatekeeper loss (arXiv:2502.19335, §3).

    ``L = α·L_corr + (1−α)·L_incorr``: cross-entropy on the examples the model currently classifies
    correctly, ``KL(p ‖ Uniform)`` on its mistakes (see :func:`~lit_cascades.functional.gatekeeper_loss`).
    Smaller ``alpha`` → a stronger deferral signal at some cost in small-model accuracy.

    Args:
        model: the CE-trained small model (its weights are fine-tuned in place).
        num_classes: ``C``.
        alpha: ``α ∈ [0, 1]``.
        normalize: ``"batch"`` (the paper's ``1/N``) or ``"subset"`` (per-subset means).
        lr, weight_decay, scheduler, confidence: as in :class:`Classifier` (fine-tuning uses a lower lr).
        native_kernel: how the loss of CPU batches is computed
            (:func:`~lit_cascades.functional.gatekeeper.use_native_kernel`; same values and gradients to
            rounding). None (default): the process's setting, by default the compiled C++ kernel where a build is
            cached (``python -m lit_cascades.functional._native``, once per machine), else the Python paths; True:
            build the kernel if needed (about 40 s, needs a C++ compiler and ``ninja``) and use it; False: always
            the Python paths. True and False are set for the process here and again in :meth:`setup` of each
            worker process (``ddp_spawn`` workers included). The kernel matters for small models, whose steps the
            loss dominates.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        alpha: float = 0.5,
        normalize: Normalize = "batch",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        confidence: ConfidenceKind = "max_prob",
        native_kernel: bool | None = None,
    ) -> None:
        check_range("alpha", alpha, 0.0, 1.0)
        check_choice("normalize", normalize, ("batch", "subset"))
        if not (native_kernel is None or isinstance(native_kernel, bool)):
            raise ValueError(f"`native_kernel` must be None, True or False; got {native_kernel!r}")
        super().__init__(model, num_classes, lr=lr, weight_decay=weight_decay, scheduler=scheduler,
                         confidence=confidence)
        self.save_hyperparameters(ignore=["model"])
        if native_kernel is not None:
            use_native_kernel(native_kernel)  # True fails here, before any training, when the kernel cannot be built

    def setup(self, stage: str) -> None:
        if self.hparams.get("native_kernel") is not None:
            use_native_kernel(self.hparams.native_kernel)  # a spawned worker process starts in the default state

    def compute_loss(self, logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out = gatekeeper_loss(logits, target, alpha=self.hparams.alpha, normalize=self.hparams.normalize)
        return out.loss, {"loss_correct": out.loss_correct, "loss_incorrect": out.loss_incorrect,
                          "error_rate": out.error_rate}
