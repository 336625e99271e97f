"""Training of an EAGLE feature drafter against a frozen verifier (Li et al., arXiv:2401.15077).

The functional core (the drafter and its loss) is :mod:`lit_cascades.models.feature_drafter`; this module runs it
in Lightning on the token blocks of :class:`~lit_cascades.data.lm.LMCorpusDataModule`. Each step runs the verifier
once, without gradients, for its last hidden states and logits on the block, then the drafter on the shifted
features (teacher forcing with feature noise). Validation and test log ``<stage>/loss`` (the objective without
noise), ``<stage>/regression``, ``<stage>/classification`` and ``<stage>/agreement``: the share of positions at
which the drafter's top-1 token equals the verifier's when it reads the verifier's real feature of the previous
token (the first draft step's acceptance, greedy), and with ``unroll > 1`` ``<stage>/agreement_<k>``, the same when
it reads its own predictions ``k − 1`` times in a row (draft step ``k``'s condition). Under DDP the metrics are
synced; the verifier is replicated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_cascades.models.feature_drafter import (
    FeatureDrafter,
    capture_head_input,
    check_unroll,
    feature_drafter_loss,
)
from lit_cascades.models.generation import position_ids_from_mask
from lit_cascades.modules.causal_lm import CausalLM

#: ``teacher_dtype`` values -> the autocast dtype of the verifier's target pass (None: its own dtype, no autocast)
TEACHER_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FeatureDrafterLM(CausalLM):
    """Fit a :class:`~lit_cascades.models.feature_drafter.FeatureDrafter` to ``teacher`` (the verifier).

    Args:
        model: the drafter, or ``None`` to build a fresh one on ``teacher`` with ``num_layers`` layers.
        teacher: the frozen verifier (kept out of the module tree: not trained, not in checkpoints).
        num_layers: decoder layers of a freshly built drafter.
        cls_weight: weight of the token term (EAGLE: 0.1).
        noise: half-width of the uniform noise on input features during training (EAGLE: 0.1).
        unroll: drafter passes per batch, pass ``k`` reading pass ``k − 1``'s predicted features (1 = EAGLE;
            :func:`~lit_cascades.models.feature_drafter.feature_drafter_loss`); each pass costs about one more
            drafter forward and backward. ``<stage>/agreement_<k>`` logs pass ``k``'s agreement.
        teacher_dtype: ``None`` (the verifier's forward runs in its own dtype) or ``"bfloat16"`` / ``"float16"``:
            the verifier's forward for the targets runs under ``torch.autocast`` in that dtype (features and logits
            are returned in float32). A speed setting: on a CPU with bfloat16 matrix units (AMX) the verifier's
            forward, the larger part of a step, runs markedly faster (``benchmarks.feature_drafter_step``); the
            rounding (the largest feature moves by about 1% of its size) is far below the training noise.
            Decoding always reads the verifier's features in its own dtype.
        lr, weight_decay, warmup_steps, min_lr_ratio: as in :class:`~lit_cascades.modules.causal_lm.CausalLM`.
    """

    def __init__(self, model: nn.Module | None = None, teacher: nn.Module | None = None, num_layers: int = 1,
                 cls_weight: float = 0.1, noise: float = 0.1, unroll: int = 1, teacher_dtype: str | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 20,
                 min_lr_ratio: float = 0.1) -> None:
        if teacher is None:
            raise ValueError("`teacher` (the verifier the drafter drafts for) is required; got None")
        if cls_weight < 0 or noise < 0:
            raise ValueError(f"`cls_weight` and `noise` must be >= 0; got {cls_weight} and {noise}")
        check_unroll(unroll)
        if teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"`teacher_dtype` must be one of {sorted(TEACHER_DTYPES, key=str)}; got {teacher_dtype!r}")
        drafter = model if model is not None else FeatureDrafter(teacher, num_layers=num_layers)
        if not isinstance(drafter, FeatureDrafter):
            raise TypeError(f"`model` must be a FeatureDrafter (or None to build one); got {type(drafter).__name__}")
        super().__init__(drafter, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio)
        self.save_hyperparameters(ignore=["model", "teacher"])
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    on_validation_epoch_start = on_test_epoch_start = on_fit_start

    @torch.no_grad()
    def verifier_targets(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The verifier's last hidden states ``[B, T, d]`` and logits ``[B, T, V]`` on a block."""
        kwargs = {} if attention_mask is None else {
            "attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
        dtype = TEACHER_DTYPES[self.hparams.teacher_dtype]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None), \
                capture_head_input(self.teacher) as hidden:
            logits = self.teacher(input_ids=input_ids, **kwargs).logits
        if dtype is None:
            return hidden[-1], logits
        return hidden[-1].float(), logits.float()

    def _losses(self, batch: dict[str, Tensor], noise: float) -> dict[str, Tensor]:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        feats, logits = self.verifier_targets(ids, mask)
        return feature_drafter_loss(self.model, ids, mask, feats, logits, cls_weight=self.hparams.cls_weight,
                                    noise=noise, unroll=self.hparams.unroll)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        parts = self._losses(batch, self.hparams.noise)
        self.log("train/loss", parts["loss"], prog_bar=True)
        for key in [k for k in parts if k != "loss"]:
            self.log(f"train/{key}", parts[key])
        return parts["loss"]

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Any]:
        parts = self._losses(batch, 0.0)
        n = int(batch["input_ids"].numel() if batch.get("attention_mask") is None else batch["attention_mask"].sum())
        for key in parts:
            self.log(f"{stage}/{key}", parts[key], sync_dist=True, batch_size=n)
        return {}
