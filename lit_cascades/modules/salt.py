"""SALT: training a larger causal LM with knowledge distillation from a small LM for the first steps.

Reference: Rawat et al., "A Little Help Goes a Long Way: Efficient LLM Training by Leveraging Small LMs",
arXiv:2410.18779. Two stages over optimizer steps ``s = 0, 1, ...``:

* stage 1 (``s < kd_steps``): ``(1 − ω_s)·NTP + ω_s·KD`` with ``KD = τ²·KL(teacher ‖ student)`` at
  temperature τ (:func:`lit_cascades.functional.distillation.salt_loss`, chunked over the sequence);
* stage 2 (``s ≥ kd_steps``): NTP only; the teacher is not run at all.

``ω_s`` is constant (the paper's step transition) or decays linearly to 0 at ``kd_steps``
(:func:`~lit_cascades.functional.distillation.kd_weight_at`). The data selection of SALT_DS lives in
:mod:`lit_cascades.data.selection`; the module only logs the selected fraction it is told.

The teacher is frozen (``requires_grad_(False)``, ``eval()``), run under ``torch.inference_mode`` and kept
out of the module tree, so it is never in the optimizer, in ``state_dict()`` or in the Lightning checkpoint
(the checkpoint records ``teacher_path`` and a parameter fingerprint under ``checkpoint["salt"]`` instead).
Under DDP/FSDP every process holds its own full copy of the (small) teacher; only the student is wrapped.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from lit_cascades.data.selection import model_fingerprint
from lit_cascades.functional._checks import check_choice, check_range
from lit_cascades.functional.distillation import SCHEDULES, kd_weight_at, salt_loss
from lit_cascades.models.generation import position_ids_from_mask
from lit_cascades.models.lm_pair import check_same_vocab
from lit_cascades.modules.causal_lm import CausalLM


def aligned_targets(batch: dict[str, Tensor], ignore_index: int = -100) -> Tensor:
    """``[B, L]`` next-token targets aligned with the *full* logits: ``target[:, t] = labels[:, t + 1]``.

    The last position and positions whose next token is masked (``attention_mask`` 0) or labelled
    ``ignore_index`` get ``ignore_index``. Using full logits with these targets avoids the copy that
    ``logits[:, :-1]`` would cost in the loss.
    """
    input_ids = batch["input_ids"]
    labels = batch.get("labels", input_ids).clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def full_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits ``[B, L, V]`` of a HF causal LM on ``batch`` (left-padding-safe position ids)."""
    mask = batch.get("attention_mask")
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs = {"attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    return model(input_ids=batch["input_ids"], **kwargs).logits


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside every ``nn.Embedding`` (token and position embeddings; a tied LM head counts once,
    as the embedding it shares). The size measure SALT's teacher/student ratio refers to: for tiny vocab-heavy
    models the total count is dominated by the embeddings."""
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding)


class SALT(CausalLM):
    """Small-model-aided training of ``student`` with KD from ``teacher`` for ``kd_steps`` steps.

    Args:
        student: the causal LM to train (any HF ``AutoModelForCausalLM``).
        teacher: the small causal LM (same vocabulary); frozen, not saved. ``None`` only when
            ``kd_steps == 0`` (plain next-token training: the baseline).
        kd_steps: number of optimizer steps with the KD term (paper: 36K of ~208K, ~17%).
        kd_weight: ω ∈ [0, 1] (UNVERIFIED in the paper; default 0.5).
        schedule: ``"constant"`` (ω until ``kd_steps``) or ``"linear_decay"`` (ω → 0 at ``kd_steps``).
        temperature: τ > 0 of the KD term (UNVERIFIED; default 1.0).
        chunk_size: positions per chunk of the fused loss (``None``: about 2^20 logits per chunk).
        selected_fraction: the SALT_DS selection fraction used by the data (logged as
            ``train/selected_fraction`` during stage 1; 1.0 = no selection).
        teacher_path: where the teacher comes from (recorded in the checkpoint instead of its weights).
        student_tokenizer, teacher_tokenizer: optional tokenizers, compared before training.
        lr, weight_decay, warmup_steps, min_lr_ratio, ignore_index: as in
            :class:`~lit_cascades.modules.causal_lm.CausalLM` (named here so that a config section for ``SALT``
            can be checked against this signature: the student is passed on as ``CausalLM``'s ``model``).

    Raises:
        ValueError: on a vocabulary/tokenizer mismatch, ``kd_steps < 0``, ω outside [0, 1], τ ≤ 0, an unknown
            schedule, or a missing teacher with ``kd_steps > 0``.

    Warns:
        UserWarning: when the teacher has at least as many parameters as the student (that is ordinary KD).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        kd_steps: int = 0,
        kd_weight: float = 0.5,
        schedule: str = "constant",
        temperature: float = 1.0,
        chunk_size: int | None = None,
        selected_fraction: float = 1.0,
        teacher_path: str | None = None,
        student_tokenizer: Any = None,
        teacher_tokenizer: Any = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        ignore_index: int = -100,
    ) -> None:
        if not isinstance(kd_steps, int) or isinstance(kd_steps, bool) or kd_steps < 0:
            raise ValueError(f"`kd_steps` must be an int >= 0; got {kd_steps!r}")
        check_range("kd_weight", kd_weight, 0.0, 1.0)
        check_range("temperature", temperature, 0.0, float("inf"), low_open=True)
        check_range("selected_fraction", selected_fraction, 0.0, 1.0, low_open=True)
        check_choice("schedule", schedule, SCHEDULES)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` must be a positive int or None; got {chunk_size!r}")
        if teacher is None and kd_steps > 0 and kd_weight > 0:
            raise ValueError(f"`kd_steps`={kd_steps} with `kd_weight`={kd_weight} needs a `teacher`; got None")
        if teacher is not None:
            check_same_vocab(teacher, student, teacher_tokenizer, student_tokenizer, names=("teacher", "student"))
            n_t, n_s = _numel(teacher), _numel(student)
            if n_t >= n_s:
                warnings.warn(
                    f"the teacher has {n_t:,} parameters and the student {n_s:,}: a teacher at least as large as "
                    "the student is ordinary knowledge distillation, not SALT (small teacher, larger student)",
                    UserWarning, stacklevel=2,
                )
        with warnings.catch_warnings():  # CausalLM's save_hyperparameters sees `student`/`teacher`; ours wins
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            super().__init__(student, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                             min_lr_ratio=min_lr_ratio, ignore_index=ignore_index)
        self.save_hyperparameters(ignore=["student", "teacher", "student_tokenizer", "teacher_tokenizer",
                                          "large_model", "model"])
        # kept out of the module tree: never in the optimizer, the state dict or the checkpoint
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False) if teacher is not None else None
        self._teacher_fingerprint = model_fingerprint(teacher) if teacher is not None else None
        self.val_nll = MeanMetric()

    @property
    def student(self) -> nn.Module:
        return self.model

    def set_teacher(self, teacher: nn.Module, teacher_path: str | None = None) -> None:
        """Replace the teacher (e.g. by the one an earlier stage trained): frozen, eval mode, fingerprinted anew.

        Raises:
            ValueError: a vocabulary mismatch with the student.
        """
        check_same_vocab(teacher, self.model, names=("teacher", "student"))
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)
        self._teacher_fingerprint = model_fingerprint(teacher)
        if teacher_path is not None:
            self.hparams.teacher_path = teacher_path

    # -- stage -------------------------------------------------------------------------------------------
    def kd_weight_now(self, step: int | None = None) -> float:
        """ω at optimizer step ``step`` (default: the current ``global_step``)."""
        step = self.global_step if step is None else step
        h = self.hparams
        if self.teacher is None:
            return 0.0
        return kd_weight_at(step, h.kd_steps, h.kd_weight, h.schedule)

    def stage(self, step: int | None = None) -> int:
        """1 while KD is on (``step < kd_steps``), 2 afterwards."""
        step = self.global_step if step is None else step
        return 1 if step < self.hparams.kd_steps else 2

    # -- hooks -------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.val_nll.reset()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.__dict__.get("teacher") is not None:
            self.teacher.eval()  # Lightning's train() calls never reach it; keep it in eval mode regardless
        return self

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        h = self.hparams
        step = self.global_step
        weight = self.kd_weight_now(step)
        stage = self.stage(step)
        target = aligned_targets(batch, h.ignore_index)
        logits = full_logits(self.model, batch)
        teacher_logits = None
        if stage == 1 and self.teacher is not None:
            with torch.inference_mode():
                teacher_logits = full_logits(self.teacher, batch)
        out = salt_loss(logits, teacher_logits, target, kd_weight=weight, temperature=h.temperature,
                        ignore_index=h.ignore_index, chunk_size=h.chunk_size)
        n = int(out.num_tokens)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=n)
        self.log("train/ntp", out.ntp, batch_size=n)
        self.log("train/ppl", out.ntp.detach().exp(), batch_size=n)
        # stage 2 runs no teacher: log NaN, not the last stage-1 value Lightning would otherwise repeat
        self.log("train/kd", out.kd if teacher_logits is not None else float("nan"), batch_size=n)
        self.log("train/kd_weight", weight, batch_size=n)
        self.log("train/stage", float(stage), batch_size=n)
        self.log("train/selected_fraction", h.selected_fraction if stage == 1 else 1.0, batch_size=n)
        return out.loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Any]:
        ignore = self.hparams.ignore_index
        target = aligned_targets(batch, ignore)
        logits = full_logits(self.model, batch)
        valid = target != ignore
        n = valid.sum()
        ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=ignore, reduction="sum")
        correct = ((logits.argmax(-1) == target) & valid).sum()
        self.log(f"{stage}/loss", ce / n, sync_dist=True, batch_size=int(n))
        self.log(f"{stage}/token_acc", correct / n, sync_dist=True, batch_size=int(n))
        if stage == "val":
            self.val_nll.update(ce / n, weight=n)
        return {}

    def on_validation_epoch_end(self) -> None:
        if self.val_nll.update_count:
            self.log("val/ppl", self.val_nll.compute().exp())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["salt"] = {"teacher_path": self.hparams.teacher_path,
                              "teacher_fingerprint": self._teacher_fingerprint}


class DistilledLM(SALT):
    """Knowledge distillation of a small causal LM from a larger teacher at every step (e.g. a drafter).

    The classic direction (Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv:1503.02531):
    the student ``model`` learns ``(1 − ω)·NTP + ω·τ²·KL(teacher ‖ student)`` for the whole run — SALT's loss
    (:func:`~lit_cascades.functional.distillation.salt_loss`) with the KD stage never ending. With ω = 1 the
    student matches the teacher's next-token distribution on the corpus, which is what a speculative-decoding
    drafter is judged on (Leviathan et al., "Fast Inference from Transformers via Speculative Decoding",
    arXiv:2211.17192; Zhou et al., "DistillSpec", arXiv:2310.08461). The ``lm_pair`` recipe gives a small
    module that takes ``teacher`` the pair's large model.

    Args:
        model: the student (any HF ``AutoModelForCausalLM``, e.g. the teacher's first layers,
            :func:`~lit_cascades.models.lm_pair.truncated_copy`).
        teacher: the frozen teacher (same vocabulary); not saved.
        kd_weight: ω ∈ [0, 1] (1 = pure distillation).
        temperature: τ > 0 of the KD term.
        freeze_embeddings: keep the student's input embeddings (and an output layer tied to them) fixed: a
            truncated teacher keeps the teacher's token space, and the step skips the vocabulary-sized weight
            gradient.
        chunk_size, lr, weight_decay, warmup_steps, min_lr_ratio, ignore_index: as in :class:`SALT`.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        kd_weight: float = 1.0,
        temperature: float = 1.0,
        freeze_embeddings: bool = False,
        chunk_size: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        ignore_index: int = -100,
    ) -> None:
        if teacher is None:
            raise ValueError("`teacher` is required for distillation; got None")
        if freeze_embeddings:
            model.get_input_embeddings().requires_grad_(False)
        with warnings.catch_warnings():  # a teacher larger than the student is the point here
            warnings.filterwarnings("ignore", message="the teacher has .* parameters and the student")
            super().__init__(model, teacher, kd_steps=sys.maxsize, kd_weight=kd_weight, temperature=temperature,
                             chunk_size=chunk_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                             min_lr_ratio=min_lr_ratio, ignore_index=ignore_index)
