"""Training a Hugging Face causal LM: plain next-token prediction and token-level Gatekeeper fine-tuning.

:class:`CausalLM` trains any ``AutoModelForCausalLM`` with next-token cross-entropy; it trains both models of
an LM pair and is the "plain fine-tuning" baseline. :class:`GatekeeperLM` swaps the loss for the Gatekeeper
loss applied token by token (Rabanser et al., arXiv:2502.19335, its LM variant): under
teacher forcing each target position is one classification over the vocabulary; the positions the model
currently predicts right get cross-entropy, the ones it gets wrong get ``KL(p ‖ Uniform)``; both sums are
normalised by the number of counted (non-ignored) positions.

Both modules optionally hold a frozen ``large_model`` (kept out of the optimizer and the checkpoint). With it,
``validation_step``/``test_step`` also return a *token-level* deferral view for
:class:`~lit_cascades.callbacks.DeferralCurveLogger`: score = the small model's max next-token probability,
small/large quality = whether each model's argmax equals the true next token.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch.nn.functional as F
from torch import Tensor, nn

from lit_cascades.functional.gatekeeper import gatekeeper_loss
from lit_cascades.models.generation import position_ids_from_mask
from lit_cascades.models.lm_pair import context_length
from lit_cascades.modules._optim import adamw, cosine_warmup_decay, per_step, total_steps


def shifted_logits_and_labels(
    model: nn.Module, batch: dict[str, Tensor], ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Run ``model`` on ``batch`` and return next-token ``logits [B, L-1, V]`` and ``labels [B, L-1]``.

    ``batch["labels"]`` (``[B, L]``, ``ignore_index`` for prompt/padding) is used when present, otherwise the
    inputs themselves; positions where ``attention_mask`` is 0 are ignored.
    """
    input_ids = batch["input_ids"]
    if input_ids.ndim != 2:
        raise ValueError(f"`input_ids` must have shape [B, L]; got {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 tokens for next-token prediction; got length {input_ids.shape[1]}")
    ctx = context_length(model)
    if ctx is not None and input_ids.shape[1] > ctx:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's context window of {ctx} tokens")
    mask = batch.get("attention_mask")
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs = {"attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    logits = model(input_ids=input_ids, **kwargs).logits
    labels = batch.get("labels", input_ids).clone()
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    return logits[:, :-1], labels[:, 1:]


class CausalLM(L.LightningModule):
    """Next-token training of a Hugging Face causal LM (``model``) with AdamW and warmup + cosine decay.

    Subclass and override :meth:`compute_loss` to change the objective.

    Args:
        model: an ``AutoModelForCausalLM`` (its logits are ``[B, L, V]``); put in train mode here (dropout as
            configured), since ``from_pretrained`` returns it in eval mode.
        lr: peak learning rate.
        weight_decay: AdamW weight decay (applied to matrices only).
        warmup_steps: linear warmup steps.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at the last step.
        large_model: optional frozen large model for the token-level deferral view (not trained, not saved).
        ignore_index: label value of positions without a loss.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        large_model: nn.Module | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        # (Lightning reads the arguments of every subclass's __init__ too: a subclass's frozen `teacher` is not a
        # hyperparameter either, and must not be copied into hparams)
        self.save_hyperparameters(ignore=["model", "large_model", "teacher"])
        # ``from_pretrained`` returns a model in eval mode and Lightning keeps each submodule's mode, so a loaded
        # model would be fine-tuned without dropout; a training module trains in train mode
        self.model = model.train()
        # kept out of the module tree: never in the optimizer, the state dict or the checkpoint
        self.__dict__["large_model"] = large_model.eval().requires_grad_(False) if large_model is not None else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, L, V]``."""
        kwargs = {} if attention_mask is None else {
            "attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
        return self.model(input_ids=input_ids, **kwargs).logits

    def compute_loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean next-token cross-entropy over non-ignored positions. Returns ``(loss, extra logs)``."""
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=self.hparams.ignore_index)
        return loss, {}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits, labels = shifted_logits_and_labels(self.model, batch, self.hparams.ignore_index)
        loss, extra = self.compute_loss(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        for key, value in extra.items():
            self.log(f"train/{key}", value)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Any]:
        logits, labels = shifted_logits_and_labels(self.model, batch, self.hparams.ignore_index)
        valid = labels != self.hparams.ignore_index
        n = valid.sum()
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                             ignore_index=self.hparams.ignore_index, reduction="sum")
        log_p = F.log_softmax(logits.float(), -1)
        conf, pred = log_p.max(-1)
        correct = (pred == labels) & valid
        self.log(f"{stage}/loss", ce / n, sync_dist=True, batch_size=int(n))
        self.log(f"{stage}/token_acc", correct.sum() / n, sync_dist=True, batch_size=int(n))
        out: dict[str, Any] = {}
        if self.large_model is not None:
            large_logits, _ = shifted_logits_and_labels(self.large_model, batch, self.hparams.ignore_index)
            large_correct = (large_logits.argmax(-1) == labels) & valid
            out["deferral"] = {
                "scores": {"max_prob": conf.exp()[valid]},
                "small_quality": correct[valid].float(),
                "large_quality": large_correct[valid].float(),
            }
        return out

    def on_validation_epoch_start(self) -> None:
        if self.large_model is not None:
            self.large_model.to(self.device)

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        opt = adamw(
            self, [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.95),
        )
        total = total_steps(self)
        # linear warm-up (at most the whole run), then cosine decay to lr * min_lr_ratio
        sched = cosine_warmup_decay(opt, total, min(self.hparams.warmup_steps, total), self.hparams.min_lr_ratio)
        return per_step(opt, sched)


class GatekeeperLM(CausalLM):
    """Token-level Gatekeeper fine-tuning of a small causal LM (see the module docstring).

    Args:
        model: the (already trained) small causal LM.
        alpha: weight of the cross-entropy on correctly predicted tokens; ``1 − alpha`` weights
            ``KL(p ‖ U_V)`` on mispredicted ones. Smaller α = stronger deferral signal.
        normalize: ``"batch"`` (the paper's ``1/N`` over all counted tokens) or ``"subset"``.
        **kwargs: :class:`CausalLM` arguments (``lr``, ``large_model``, ...).
    """

    def __init__(self, model: nn.Module, alpha: float = 0.5, normalize: str = "batch", **kwargs: Any) -> None:
        if normalize not in ("batch", "subset"):
            raise ValueError(f"`normalize` must be one of ['batch', 'subset']; got {normalize!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1]; got {alpha}")
        super().__init__(model, **kwargs)
        self.save_hyperparameters(ignore=["model", "large_model"])

    def compute_loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out = gatekeeper_loss(logits, labels, alpha=self.hparams.alpha, normalize=self.hparams.normalize,
                              ignore_index=self.hparams.ignore_index)
        return out.loss, {"loss_correct": out.loss_correct, "loss_incorrect": out.loss_incorrect,
                          "error_rate": out.error_rate}
