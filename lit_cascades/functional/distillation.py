"""Token-level knowledge distillation from a small teacher LM, chunked over the sequence (SALT).

Reference: Rawat et al., "A Little Help Goes a Long Way: Efficient LLM Training by Leveraging Small LMs",
arXiv:2410.18779. The paper's loss as reported by reviewers:
``(1 − ω)·NTP + ω·KD`` for the first ``n_KD`` steps, then NTP only; the exact ω, τ and transition are
UNVERIFIED and exposed as arguments here.

KD term (per counted position ``t``, teacher logits ``a``, student logits ``z``, temperature ``τ``):

.. math::

    q^τ = softmax(a / τ),\\quad p^τ = softmax(z / τ),\\qquad
    KD_t = τ^2 · KL(q^τ ‖ p^τ) = τ^2 Σ_v q^τ_v (\\log q^τ_v − \\log p^τ_v)

* Direction: **forward KL, teacher → student** (``KL(teacher ‖ student)``), i.e. the cross-entropy of the
  student against the teacher's soft labels minus the teacher's entropy (a constant for the student, so the
  gradient equals that of the soft-label cross-entropy the paper writes). ``F.kl_div(log_p, log_q,
  log_target=True)`` computes this direction.
* ``τ²`` scaling (Hinton et al., 2015): the gradient of ``KL`` w.r.t. ``z`` is ``(p^τ − q^τ)/τ``; multiplying
  by ``τ²`` keeps its magnitude comparable to the NTP gradient's as τ changes, so ``ω`` means the same thing
  at every temperature. At τ = 1 it is the plain KL.
* NTP is the usual next-token cross-entropy at temperature 1. Both terms are **means over the counted
  positions** (targets ≠ ``ignore_index``; padding/prompt positions count in neither).

Memory: the naive form (:func:`naive_kd_loss`) materialises, per position, the fp32 student log-softmax,
the teacher log-softmax and teacher probabilities (and saves some of them for backward): several extra
``[B, T, V]`` fp32 tensors beside the logits. :func:`salt_loss` / :func:`kd_loss` instead run a custom
autograd function that processes ``chunk_size`` positions at a time in fp32 in the forward pass, keeps only
references to the inputs, and recomputes each chunk's softmaxes in the backward pass, writing straight into
the one gradient tensor (the logits' shape and dtype, which any loss needs). Extra memory beyond the inputs
and that gradient: a few ``[chunk_size, V]`` fp32 buffers.

Schedule (:func:`kd_weight_at`): ``"constant"`` uses ω until ``kd_steps`` then 0 (the paper's step
transition); ``"linear_decay"`` decays ω linearly from ω at step 0 to 0 at ``kd_steps`` (one of the
paper's ablated transitions; the exact variant is UNVERIFIED). Steps are optimizer steps, counted from 0:
step ``s`` uses KD iff ``s < kd_steps``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_cascades.functional._checks import check_choice, check_range

Schedule = Literal["constant", "linear_decay"]
SCHEDULES: tuple[str, ...] = ("constant", "linear_decay")


class SALTLossOutput(NamedTuple):
    """Result of :func:`salt_loss`; scalar tensors.

    ``loss = (1 − kd_weight)·ntp + kd_weight·kd`` carries the gradient; ``ntp`` and ``kd`` are the unweighted
    components (``kd`` is 0 when no teacher logits were given); ``num_tokens`` counts the positions.
    """

    loss: Tensor
    ntp: Tensor
    kd: Tensor
    num_tokens: Tensor


def kd_weight_at(step: int, kd_steps: int, kd_weight: float, schedule: Schedule = "constant") -> float:
    """The KD weight ω at optimizer step ``step`` (0-based): 0 from ``kd_steps`` on.

    ``"constant"``: ω for ``step < kd_steps``. ``"linear_decay"``: ``ω·(1 − step/kd_steps)`` for
    ``step < kd_steps`` (ω at step 0, reaching 0 at ``kd_steps``).
    """
    check_choice("schedule", schedule, SCHEDULES)
    check_range("kd_weight", kd_weight, 0.0, 1.0)
    if kd_steps < 0:
        raise ValueError(f"`kd_steps` must be >= 0; got {kd_steps}")
    if step >= kd_steps:
        return 0.0
    if schedule == "constant":
        return float(kd_weight)
    return float(kd_weight) * (1.0 - step / kd_steps)


CHUNK_ELEMENTS = 1 << 20  # automatic chunk: about 2^20 logits (4 MiB in fp32) per buffer


def auto_chunk_size(vocab_size: int, chunk_size: int | None = None) -> int:
    """Positions per chunk: ``chunk_size`` if given, else ``max(1, 2^20 // vocab_size)`` (256 at V = 4096,
    21 at V = 49,152), so each fp32 chunk buffer stays near 4 MiB whatever the vocabulary."""
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(1, vocab_size))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int or None; got {chunk_size!r}")
    return chunk_size


def _chunks(shape: torch.Size, chunk_size: int) -> Iterator[tuple[int, slice]]:
    """``(row, positions)`` pieces of a ``[B, T, V]`` tensor: at most ``chunk_size`` positions of one row."""
    batch, length = shape[0], shape[1]
    for b in range(batch):
        for start in range(0, length, chunk_size):
            yield b, slice(start, min(start + chunk_size, length))


def _chunk_terms(z: Tensor, a: Tensor | None, y: Tensor, valid: Tensor, tau: float, need_grad: bool,
                 g_ce: Tensor | None = None, g_kd: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sums of CE and ``τ²·KL`` over one chunk ``z [n, V]`` (and their gradient w.r.t. ``z`` if asked).

    The gradient of ``g_ce·Σ CE + g_kd·Σ τ² KL`` is ``g_ce (softmax(z) − e_y) + g_kd τ (p^τ − q^τ)`` on valid
    rows, 0 elsewhere.
    """
    dtype = _compute_dtype(z)
    z = z.to(dtype)
    w = valid.to(z.dtype)
    log_p1 = torch.log_softmax(z, -1)
    ce = -(log_p1.gather(-1, y[:, None]).squeeze(-1) * w).sum()
    kd = z.new_zeros(())
    grad = None
    if need_grad:
        grad = log_p1.exp_().mul_(g_ce)
        grad[torch.arange(z.shape[0], device=z.device), y] -= g_ce
    del log_p1
    if a is not None:
        log_p = torch.log_softmax(z / tau, -1)
        log_q = torch.log_softmax(a.to(dtype) / tau, -1)
        q = log_q.exp()
        kd = tau * tau * ((q * (log_q - log_p)).sum(-1) * w).sum()
        if need_grad:
            grad.add_(log_p.exp_().sub_(q).mul_(g_kd * tau))
    if grad is not None:
        grad.mul_(w[:, None])
    return ce, kd, grad


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 at least (bf16/fp16 logits are upcast chunk by chunk; fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


class _ChunkedSALTLoss(torch.autograd.Function):
    """Sums ``(Σ CE, Σ τ²·KL(q^τ ‖ p^τ))`` over valid positions, computed and differentiated chunk by chunk.

    Saves nothing but references to its inputs (the teacher logits are kept on ``ctx`` so that tensors made
    under ``torch.inference_mode`` work); the backward pass recomputes each chunk's softmaxes.
    """

    @staticmethod
    def forward(ctx, z: Tensor, a: Tensor | None, y: Tensor, valid: Tensor, tau: float,  # type: ignore[override]
                chunk_size: int) -> tuple[Tensor, Tensor]:
        ce = z.new_zeros((), dtype=_compute_dtype(z))
        kd = z.new_zeros((), dtype=_compute_dtype(z))
        for b, t in _chunks(z.shape, chunk_size):
            c, k, _ = _chunk_terms(z[b, t], None if a is None else a[b, t], y[b, t], valid[b, t], tau, False)
            ce += c
            kd += k
        ctx.save_for_backward(z, y, valid)
        ctx.teacher = a
        ctx.tau, ctx.chunk_size = tau, chunk_size
        return ce, kd

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_kd: Tensor):  # type: ignore[override]
        z, y, valid = ctx.saved_tensors
        a = ctx.teacher
        grad = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        g_ce, g_kd = g_ce.to(_compute_dtype(z)), g_kd.to(_compute_dtype(z))
        for b, t in _chunks(z.shape, ctx.chunk_size):
            _, _, g = _chunk_terms(z[b, t], None if a is None else a[b, t], y[b, t], valid[b, t], ctx.tau, True,
                                   g_ce, g_kd)
            grad[b, t] = g
        return grad, None, None, None, None, None


def _validate(student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor, temperature: float,
              chunk_size: int | None) -> None:
    if student_logits.ndim != 3:
        raise ValueError(f"`student_logits` must have shape [B, T, V]; got {tuple(student_logits.shape)}")
    if not student_logits.is_floating_point():
        raise TypeError(f"`student_logits` must be floating point; got dtype {student_logits.dtype}")
    if teacher_logits is not None and tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(
            f"`teacher_logits` must have the student's shape {tuple(student_logits.shape)} (same vocabulary); "
            f"got {tuple(teacher_logits.shape)}"
        )
    if tuple(target.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(f"`target` must have shape {tuple(student_logits.shape[:2])} ([B, T]); "
                         f"got {tuple(target.shape)}")
    if target.is_floating_point():
        raise TypeError(f"`target` must hold integer token ids; got dtype {target.dtype}")
    check_range("temperature", temperature, 0.0, float("inf"), low_open=True)
    auto_chunk_size(student_logits.shape[-1], chunk_size)


def salt_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    target: Tensor,
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> SALTLossOutput:
    """``(1 − ω)·NTP + ω·τ²·KL(teacher ‖ student)`` over the counted positions, chunked (module docstring).

    Args:
        student_logits: ``[B, T, V]`` (any float dtype; computed in fp32 chunk by chunk). Position ``t``
            predicts ``target[:, t]``: pass *aligned* logits and targets (e.g. the full logits with the labels
            shifted left and ``ignore_index`` in the last column, which avoids copying a ``logits[:, :-1]``).
        teacher_logits: ``[B, T, V]`` teacher logits on the same inputs (no gradient flows into them), or
            ``None`` for NTP only (then ω must be 0).
        target: ``[B, T]`` next-token ids; ``ignore_index`` marks positions without a loss (neither NTP nor KD).
        kd_weight: ω ∈ [0, 1].
        temperature: τ > 0, applied to both distributions of the KD term.
        ignore_index: target value of positions to skip.
        chunk_size: positions per chunk (memory ∝ ``chunk_size · V`` fp32 values); ``None``:
            :func:`auto_chunk_size` (about 2^20 values per chunk).

    Returns:
        :class:`SALTLossOutput`.

    Raises:
        ValueError/TypeError: on shapes, dtypes, ω outside [0, 1], τ ≤ 0, target ids out of range, teacher
            logits missing while ω > 0, or when every position is ignored.
    """
    _validate(student_logits, teacher_logits, target, temperature, chunk_size)
    check_range("kd_weight", kd_weight, 0.0, 1.0)
    if teacher_logits is None and kd_weight > 0:
        raise ValueError(f"`kd_weight`={kd_weight} > 0 needs `teacher_logits`; got None")
    vocab = student_logits.shape[-1]
    valid = target != ignore_index
    n_valid, n_bad = torch.stack([valid.sum(), (valid & ((target < 0) | (target >= vocab))).sum()]).tolist()
    if n_bad:
        raise ValueError(f"`target` values must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"got {n_bad} out-of-range values")
    if n_valid == 0:
        raise ValueError("every position of `target` equals `ignore_index`; nothing to compute the loss on")
    safe = target.masked_fill(~valid, 0)
    teacher = None if teacher_logits is None else teacher_logits.detach()
    ce_sum, kd_sum = _ChunkedSALTLoss.apply(student_logits, teacher, safe, valid, float(temperature),
                                            auto_chunk_size(vocab, chunk_size))
    ntp, kd = ce_sum / n_valid, kd_sum / n_valid
    loss = ntp if kd_weight == 0 else (1.0 - kd_weight) * ntp + kd_weight * kd
    return SALTLossOutput(loss, ntp, kd, valid.sum())


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor:
    """Mean ``τ²·KL(softmax(a/τ) ‖ softmax(z/τ))`` over the counted positions, chunked (module docstring).

    Args:
        student_logits, teacher_logits: ``[B, T, V]``.
        target: optional ``[B, T]`` ids; positions equal to ``ignore_index`` are skipped.
        mask: optional ``[B, T]`` bool/0-1 mask of the positions to count (combined with ``target``).
        temperature: τ > 0.
        chunk_size: positions per chunk.
    """
    if target is None:
        target = torch.zeros(student_logits.shape[:2], dtype=torch.long, device=student_logits.device)
    if mask is not None:
        if tuple(mask.shape) != tuple(student_logits.shape[:2]):
            raise ValueError(f"`mask` must have shape {tuple(student_logits.shape[:2])}; got {tuple(mask.shape)}")
        target = target.masked_fill(mask == 0, ignore_index)
    if teacher_logits is None:
        raise ValueError("`teacher_logits` is required for the KD term; got None")
    return salt_loss(student_logits, teacher_logits, target, kd_weight=1.0, temperature=temperature,
                     ignore_index=ignore_index, chunk_size=chunk_size).kd


def naive_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """The unchunked reference of :func:`kd_loss` (full ``[B, T, V]`` fp32 softmaxes; tests and benchmarks)."""
    valid = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device) \
        if target is None else target != ignore_index
    dtype = _compute_dtype(student_logits)
    log_p = F.log_softmax(student_logits.to(dtype) / temperature, -1)
    log_q = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, -1)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    return temperature**2 * (kl * valid).sum() / valid.sum()


def naive_salt_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    target: Tensor,
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """The unchunked reference of :func:`salt_loss` (``F.cross_entropy`` + :func:`naive_kd_loss`)."""
    ntp = F.cross_entropy(student_logits.to(_compute_dtype(student_logits)).flatten(0, 1), target.flatten(), ignore_index=ignore_index)
    if teacher_logits is None or kd_weight == 0:
        return ntp
    kd = naive_kd_loss(student_logits, teacher_logits, target, temperature, ignore_index)
    return (1 - kd_weight) * ntp + kd_weight * kd


# ----------------------------------------------------------------------------------------------------------
# SALT_DS: scoring training sequences with the small model
# ----------------------------------------------------------------------------------------------------------
def learnable_token_losses(
    logits: Tensor, target: Tensor, k: int = 10, ignore_index: int = -100, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token losses of a (small) model and which tokens are "learnable" (true token in its top-k).

    SALT_DS (arXiv:2410.18779, Eq. 10 as described by reviewers): a token is kept when the
    ground-truth token lies among the model's ``k`` most likely tokens. Rank = the number of vocabulary
    entries with a *strictly* larger logit, kept iff rank < k (ties count in the true token's favour).

    Args:
        logits: ``[B, T, V]`` aligned with ``target`` (position ``t`` predicts ``target[:, t]``).
        target: ``[B, T]`` token ids; ``ignore_index`` positions are never kept.
        k: top-k size (paper: 10).
        chunk_size: positions per chunk (no ``[B, T, V]`` fp32 copy is made).

    Returns:
        ``(losses [B, T], kept [B, T] bool)``; losses are ``−log p(target)`` (0 at ignored positions).
    """
    if logits.ndim != 3 or tuple(target.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"`logits` must be [B, T, V] and `target` [B, T]; got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int; got {k!r}")
    valid = target != ignore_index
    safe = target.masked_fill(~valid, 0)
    dtype = _compute_dtype(logits)
    losses = torch.zeros(target.shape, dtype=dtype, device=logits.device)
    kept = torch.zeros(target.shape, dtype=torch.bool, device=logits.device)
    for b, t in _chunks(logits.shape, auto_chunk_size(logits.shape[-1], chunk_size)):
        z = logits[b, t].to(dtype)
        y = safe[b, t]
        z_y = z.gather(-1, y[:, None])
        losses[b, t] = torch.logsumexp(z, -1) - z_y.squeeze(-1)
        kept[b, t] = (z > z_y).sum(-1) < k
    return losses.masked_fill(~valid, 0.0), kept & valid


def topk_median_score(
    logits: Tensor, target: Tensor, k: int = 10, ignore_index: int = -100, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """SALT_DS sequence score: median of the learnable tokens' losses (:func:`learnable_token_losses`).

    High score = "challenging yet learnable". The median of an even number of values is the **lower** of
    the two middle values (``torch.nanmedian``). A sequence with **no** kept token gets ``NaN`` (it has no
    learnable token; :func:`select_top_fraction` ranks it below every scored sequence).

    Returns:
        ``(scores [B], num_kept [B])``.
    """
    losses, kept = learnable_token_losses(logits, target, k, ignore_index, chunk_size)
    scores = losses.masked_fill(~kept, float("nan")).nanmedian(dim=-1).values
    return scores, kept.sum(-1)


def select_top_fraction(scores: Tensor, fraction: float, highest: bool = True) -> Tensor:
    """Indices (ascending) of the ``round(fraction·N)`` (at least 1) best-scored sequences.

    ``highest=True`` keeps the highest scores (SALT_DS prefers hard-but-learnable sequences). NaN scores rank
    below every finite score on either end. Ties are broken by index (stable sort).
    """
    check_range("fraction", fraction, 0.0, 1.0, low_open=True)
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"`scores` must be a non-empty 1-D tensor; got shape {tuple(scores.shape)}")
    count = max(1, round(fraction * scores.numel()))
    key = scores.double() if highest else -scores.double()
    key = key.nan_to_num(nan=-float("inf"), neginf=-float("inf"))
    order = torch.sort(key, descending=True, stable=True).indices
    return order[:count].sort().values
