"""The Gatekeeper confidence-tuning loss.

Reference: Rabanser et al., "Gatekeeper: Improving Model Cascades Through Confidence Tuning",
arXiv:2502.19335 (NeurIPS 2025), §3 (the loss as reported).

.. math::

    L = α · L_{corr} + (1 − α) · L_{incorr}
    L_{corr}   = \\frac{1}{N} Σ_i 1[ŷ_i = y_i] · CE(p_θ(x_i), y_i)
    L_{incorr} = \\frac{1}{N} Σ_i 1[ŷ_i ≠ y_i] · KL(p_θ(x_i) ‖ U)

with ``ŷ_i = argmax p_θ(x_i)`` the model's *current* prediction (recomputed every step, no gradient) and
``KL(p ‖ U) = Σ_c p_c log(p_c C) = log C − H(p)``: on its own mistakes the model is pushed towards maximum
entropy. Note the direction: ``F.kl_div(log_p, U)`` computes ``KL(U ‖ p)``, which is a different loss.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lit_cascades.functional._checks import check_choice, check_finite, check_range

Normalize = Literal["batch", "subset"]


class GatekeeperLossOutput(NamedTuple):
    """Result of :func:`gatekeeper_loss`; all fields are scalar tensors.

    ``loss`` carries the gradient. ``loss_correct`` and ``loss_incorrect`` are the *unweighted*
    components ``L_corr`` and ``L_incorr`` (so ``loss == α·loss_correct + (1−α)·loss_incorrect``);
    ``error_rate`` is the fraction of counted positions the model currently gets wrong.
    """

    loss: Tensor
    loss_correct: Tensor
    loss_incorrect: Tensor
    error_rate: Tensor


def kl_to_uniform(log_probs: Tensor) -> Tensor:
    """``KL(p ‖ Uniform) = log C − H(p)`` along the last dimension.

    Args:
        log_probs: ``[..., C]`` log-probabilities (e.g. ``log_softmax(logits, -1)``).

    Returns:
        ``[...]`` non-negative divergences (0 for the uniform distribution, ``log C`` for a one-hot).
    """
    num_classes = log_probs.shape[-1]
    return (log_probs.exp() * (log_probs + math.log(num_classes))).sum(-1)


class _CrossEntropyAndKL(torch.autograd.Function):
    """Per-row ``CE(p, y)``, ``KL(p ‖ U)`` and ``argmax p`` of logits ``z [N, C]`` with a fused backward.

    With ``p = softmax(z)`` and ``lse = logsumexp(z) = z_k − log p_k`` (``k`` = argmax, where ``p_k ≥ 1/C``):
    ``CE = lse − z_y`` and ``KL = Σ p log p + log C = p·z − lse + log C``. The gradient of
    ``g_ce·CE + g_kl·KL`` is ``p ⊙ (g_ce + g_kl (z − p·z)) − g_ce e_y``. One max (value and index), one
    softmax and one row-wise dot product forward, two passes backward; autograd through ``log_softmax``, ``exp``
    and the products took twice as long at LM vocabulary sizes (loss-only timings:
    ``python -m benchmarks.gatekeeper_step``). Saves ``z`` and ``p``
    (cross-entropy saves its input copy and ``log p``).
    """

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        z_max, pred = z.max(-1)  # first index of the maximum, as argmax; half the time of argmax on CPU
        p = torch.softmax(z, dim=-1)
        ctx.mark_non_differentiable(pred)
        lse = z_max - p.gather(-1, pred[:, None]).squeeze(-1).log()
        pz = _rowwise_dot(p, z)
        ce = lse - z.gather(-1, y[:, None]).squeeze(-1)
        kl = pz - lse + math.log(z.shape[-1])
        ctx.save_for_backward(z, y, p, pz)
        return ce, kl, pred

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_kl: Tensor, _g_pred: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        z, y, p, pz = ctx.saved_tensors
        grad = torch.addcmul((g_ce - g_kl * pz)[:, None], g_kl[:, None], z).mul_(p)
        grad.scatter_add_(-1, y[:, None], -g_ce[:, None])
        return grad, None


#: rows of a CPU row-wise dot product computed at once (:func:`_rowwise_dot`): ~1 MiB of float32 products
_DOT_BLOCK_ELEMENTS = 1 << 18


def _rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` of ``[N, C]`` tensors, ``[N]``. On CPU, large inputs go in blocks of rows: the full
    product is a fresh ``N x C`` buffer whose first touch (page faults) cost as much as the arithmetic (2048 x
    4096 float32: 23 ms at once, 10 ms in 1 MiB blocks, one thread)."""
    if not a.is_cpu or a.numel() <= _DOT_BLOCK_ELEMENTS:
        return torch.linalg.vecdot(a, b)
    out = a.new_empty(a.shape[0])
    rows = max(1, _DOT_BLOCK_ELEMENTS // a.shape[1])
    for i in range(0, a.shape[0], rows):
        torch.linalg.vecdot(a[i:i + rows], b[i:i + rows], out=out[i:i + rows])
    return out


#: :func:`use_native_kernel`'s default: the kernel is used where a cached build exists (resolved at first use)
_AUTO = "auto"
_KERNEL_DTYPES = (torch.float32, torch.float64)
_NORMALIZE = ("batch", "subset")
#: The compiled kernel used for CPU inputs, None for the Python paths, or ``_AUTO``.
_NATIVE: Any = _AUTO


def use_native_kernel(enabled: bool | None = True, verbose: bool = False) -> None:
    """Compute the loss of CPU inputs with the compiled C++ kernel, or with the Python paths.

    The kernel (``lit_cascades/functional/_native/gatekeeper.cpp``) is one native autograd node with the same math
    and outputs as the NumPy and fused torch paths (values and gradients agree to rounding; every Gatekeeper loss
    test runs on all three). It reads each row once forward (maximum, sum of exponentials, the KL term's sum, in
    vector registers) and writes the gradient in one pass backward. A training step of a small classifier pays for
    the NumPy path's Python: on the 460-parameter digits MLP it costs about 1.6x a cross-entropy step, the kernel
    about 1.0x; about half of the NumPy path's cost is the rest of the step running slower around it. At LM
    vocabulary sizes the kernel takes less time than ``F.cross_entropy`` (``python -m benchmarks.gatekeeper_step``,
    ``loss_only_1024x1000``: 0.8x), where the fused torch path takes about 2x. Without the kernel, inputs up to
    :data:`SMALL_MAX_ELEMENTS` logits take the NumPy path and larger ones the torch path.

    By default (``enabled=None``, the state a process starts in) the kernel is used when a build of its current
    source for this torch and CPU is cached, and the Python paths otherwise: nothing is compiled implicitly. Build
    it once per machine with ``python -m lit_cascades.functional._native`` (about 40 s; needs a C++ compiler,
    ``ninja`` and the Python headers, see :mod:`lit_cascades.functional._native`). The setting is per process; spawned
    workers start in the default state (``GatekeeperClassifier(native_kernel=...)`` sets it in each worker).

    Args:
        enabled: True: build the kernel if needed and use it; False: always the Python paths (bitwise the same
            on every machine); None: the default, the cached kernel if there is one.
        verbose: print the compiler's output (``enabled=True``).

    Raises:
        RuntimeError: ``enabled=True`` and the kernel could not be built (what is missing is in the message).
    """
    global _NATIVE
    if enabled is None or not enabled:
        _NATIVE = _AUTO if enabled is None else None
        return
    from lit_cascades.functional._native import load_kernel

    _NATIVE = load_kernel("gatekeeper", verbose=verbose)


def cpu_kernel() -> Any:
    """The kernel CPU inputs use now (resolving the default state: the cached build or None)."""
    global _NATIVE
    if _NATIVE is _AUTO:
        from lit_cascades.functional._native import cached_kernel

        _NATIVE = cached_kernel("gatekeeper")
    return _NATIVE


#: Without the C++ kernel, CPU inputs with at most this many logits take the NumPy path (:class:`_SmallGatekeeper`);
#: above it, and on accelerators, the torch path (:class:`_CrossEntropyAndKL`). At classification sizes a step's
#: cost is the per-op dispatch overhead, not arithmetic: the NumPy path is one autograd node around ~20 small array
#: ops of ~1 µs each, where the torch composition dispatched ~50 ops and measured 4.6x ``F.cross_entropy`` (loss +
#: backward, 64 x 10 logits). The crossover is measured by ``python -m benchmarks.gatekeeper_step``
#: (``loss_only_*``). With the kernel, every CPU input takes the kernel.
SMALL_MAX_ELEMENTS = 1 << 16


class _SmallGatekeeper(torch.autograd.Function):
    """Gatekeeper loss of ``z [N, C]`` on CPU computed in NumPy, gradients precomputed in the forward.

    Outputs ``(loss, loss_correct, loss_incorrect, error_rate)`` as 0-dim tensors (made from NumPy scalars:
    ``torch.tensor`` or ``unbind`` cost several times more); the first three are differentiable. With
    ``p = softmax(z)``, ``s = p·log p``: ``∇ CE_i = p_i − e_{y_i}`` and ``∇ KL_i = p_i ⊙ (log p_i − s_i)`` (the same formulas as :class:`_CrossEntropyAndKL`); the backward scales each
    row's gradient by ``a / d_corr`` (correct rows) or ``b / d_incorr`` (incorrect rows), with
    ``a = α g_loss + g_corr``, ``b = (1 − α) g_loss + g_incorr``. Targets must already be in ``[0, C)`` and
    ``ignore_index`` rows given by ``valid`` (None = all). Non-finite logits raise ``ValueError``.
    """

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor, valid: Tensor | None, alpha: float,  # type: ignore[override]
                subset: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        zn, yn = z.detach().numpy(), y.numpy()
        n, c = zn.shape
        rows = _arange(n)
        pred = zn.argmax(1)
        sh = zn - zn[rows, pred][:, None]  # shifted logits (row max 0): log p = sh − lse
        e = np.exp(sh)
        se = e.sum(1)
        lse = np.log(se)
        p = e / se[:, None]
        correct = pred == yn
        if valid is None:
            incorrect = ~correct
            n_valid = n
        else:
            vn = valid.numpy()
            correct &= vn
            incorrect = vn & ~correct
            n_valid = int(np.count_nonzero(vn))
        n_inc = int(np.count_nonzero(incorrect))
        psh = np.einsum("ij,ij->i", p, sh)  # Σ_c p_c sh_c = s + lse
        # unweighted per-row gradients: p ⊙ (log p − s) = p ⊙ (sh − psh), and p − e_y on correct rows
        grad = p * (sh - psh[:, None])
        np.copyto(grad, p, where=correct[:, None])
        grad[rows, yn] -= correct
        # sums of CE_i = lse − sh_y over correct rows and KL_i = psh − lse + log C over incorrect rows
        sum_c = float((lse - sh[rows, yn]) @ correct)
        sum_i = float((psh - lse) @ incorrect) + math.log(c) * n_inc
        if not math.isfinite(sum_c + sum_i):
            check_finite("logits", z)  # raises (a NaN/inf logit makes a term non-finite)
        d_corr, d_inc = (max(n_valid - n_inc, 1), max(n_inc, 1)) if subset else (n_valid, n_valid)
        lc, li = sum_c / d_corr, sum_i / d_inc
        ctx.np_saved = (grad, correct, incorrect if valid is not None else None, d_corr, d_inc, alpha)
        ctx.set_materialize_grads(False)  # unused outputs send None, not zero tensors
        t = zn.dtype.type
        out = [torch.from_numpy(np.array(t(v))) for v in (alpha * lc + (1.0 - alpha) * li, lc, li, n_inc / n_valid)]
        ctx.mark_non_differentiable(out[3])
        return tuple(out)

    @staticmethod
    def backward(ctx, g_loss: Tensor | None, g_corr: Tensor | None, g_inc: Tensor | None,  # type: ignore[override]
                 _g_err: Tensor | None) -> tuple[Tensor | None, None, None, None, None]:
        grad, correct, incorrect, d_corr, d_inc, alpha = ctx.np_saved
        gl, gc, gi = (0.0 if g is None else float(g) for g in (g_loss, g_corr, g_inc))
        t = grad.dtype.type
        a, b = t((alpha * gl + gc) / d_corr), t(((1.0 - alpha) * gl + gi) / d_inc)
        row = np.where(correct, a, b) if incorrect is None else np.where(correct, a, np.where(incorrect, b, t(0)))
        return torch.from_numpy(grad * row[:, None]), None, None, None, None


_ARANGE: dict[int, np.ndarray] = {}


def _arange(n: int) -> np.ndarray:
    """``np.arange(n)``, cached (row indices of the gathers)."""
    out = _ARANGE.get(n)
    if out is None:
        out = _ARANGE[n] = np.arange(n)
        out.flags.writeable = False
    return out


def gatekeeper_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    normalize: Normalize = "batch",
    ignore_index: int = -100,
) -> GatekeeperLossOutput:
    """Gatekeeper loss for classification ``[N, C]`` or token-level LM logits ``[B, T, V]``.

    Args:
        logits: ``[N, C]`` or ``[B, T, V]`` (any ``[..., C]``) unnormalised scores. For causal LMs pass
            already-shifted logits and labels (``logits[:, :-1]``, ``labels[:, 1:]``).
        target: ``[N]`` / ``[B, T]`` integer class ids in ``[0, C)``; positions equal to ``ignore_index``
            (padding, prompt tokens) are excluded from both terms and from the normaliser.
        alpha: weight ``α ∈ [0, 1]`` of the correct-example cross-entropy; ``1 − α`` weights the
            KL-to-uniform term on mistakes. Smaller α = stronger deferral signal, lower accuracy.
        normalize: ``"batch"`` (default, the paper's form) divides both sums by the number of counted
            positions ``N``; ``"subset"`` divides each sum by the size of its own subset (the per-subset
            mean used by some reimplementations; this re-weights the terms with the batch error rate).
        ignore_index: target value marking positions to skip.

    Returns:
        :class:`GatekeeperLossOutput` with the total loss and its components.

    Raises:
        ValueError: on shape mismatch, no classes (``C = 0``), targets outside ``[0, C)``, α outside ``[0, 1]``,
            non-finite logits, an unknown ``normalize`` or when every position is ignored.
    """
    kernel = _NATIVE
    if (kernel is not None and kernel is not _AUTO and logits.ndim == 2 and target.ndim == 1
            and logits.dtype in _KERNEL_DTYPES and target.dtype == torch.int64 and 0.0 <= alpha <= 1.0
            and normalize in _NORMALIZE and logits.is_cpu and target.is_cpu
            and 0 < target.shape[0] == logits.shape[0] and logits.shape[1] > 0):
        # the common case first, with the checks it needs inlined: at classification sizes the step is a few
        # hundred microseconds and every Python call around the kernel shows (anything else takes the path below)
        try:
            return GatekeeperLossOutput(*kernel.gatekeeper(logits, target, ignore_index, alpha, normalize == "subset"))
        except ValueError:  # a bad target or logit: the checked paths below raise with the details
            pass
    check_range("alpha", alpha, 0.0, 1.0)
    check_choice("normalize", normalize, _NORMALIZE)
    if logits.ndim >= 2 and logits.shape[-1] == 0:
        raise ValueError(f"`logits` must have at least one class; got shape {tuple(logits.shape)}")
    if logits.ndim != 2 or target.ndim != 1:  # [N, C] logits with [N] targets need no reshaping
        if logits.ndim < 2:
            raise ValueError(f"`logits` must have shape [N, C] or [B, T, V]; got shape {tuple(logits.shape)}")
        if tuple(target.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"`target` shape must equal `logits` shape without the class dim, "
                f"expected {tuple(logits.shape[:-1])}; got {tuple(target.shape)}"
            )
        logits = logits.reshape(-1, logits.shape[-1])
        target = target.reshape(-1)
    elif target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"`target` shape must equal `logits` shape without the class dim, "
            f"expected {tuple(logits.shape[:-1])}; got {tuple(target.shape)}"
        )
    if target.is_floating_point():
        raise TypeError(f"`target` must hold integer class ids; got dtype {target.dtype}")
    num_classes = logits.shape[-1]
    if logits.is_cpu and target.is_cpu and len(target):
        kernel = cpu_kernel()
        if kernel is not None and target.dtype == torch.int64 and logits.is_floating_point():
            z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # fp32 at least
            try:
                return GatekeeperLossOutput(*kernel.gatekeeper(z, target, ignore_index, alpha, normalize == "subset"))
            except ValueError:  # a bad target or logit: the checked paths below raise with the details
                pass
        if logits.numel() <= SMALL_MAX_ELEMENTS and logits.dtype in (torch.float32, torch.float64):
            return _small_path(logits, target, alpha, normalize, ignore_index)
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    safe_target = target.masked_fill(~valid | bad, 0)  # out-of-range targets are reported below
    z = logits if logits.dtype == torch.float64 else logits.float()  # fp32 at least (bf16/fp16 logits)
    ce, kl, pred = _CrossEntropyAndKL.apply(z, safe_target)
    # one host sync for all three checks (a NaN/inf logit makes a CE or KL value non-finite)
    n_valid, n_bad, n_nonfinite = torch.stack(
        [valid.sum(), bad.sum(), (~torch.isfinite((ce + kl).detach().sum())).long()]).tolist()
    if n_valid == 0:
        raise ValueError("every position of `target` equals `ignore_index`; nothing to compute the loss on")
    if n_bad:
        raise ValueError(
            f"`target` values must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"got {n_bad} out-of-range values, e.g. {int(target[bad][0])}"
        )
    if n_nonfinite:
        check_finite("logits", logits)

    correct = (pred == safe_target) & valid
    incorrect = valid & ~correct

    sum_correct = (ce * correct).sum()
    sum_incorrect = (kl * incorrect).sum()
    n_incorrect = incorrect.sum()
    if normalize == "batch":
        loss_correct = sum_correct / n_valid
        loss_incorrect = sum_incorrect / n_valid
    else:
        loss_correct = sum_correct / (n_valid - n_incorrect).clamp(min=1)
        loss_incorrect = sum_incorrect / n_incorrect.clamp(min=1)
    loss = alpha * loss_correct + (1.0 - alpha) * loss_incorrect
    return GatekeeperLossOutput(loss, loss_correct, loss_incorrect, n_incorrect.float() / n_valid)


def _small_path(logits: Tensor, target: Tensor, alpha: float, normalize: str, ignore_index: int
                ) -> GatekeeperLossOutput:
    """:func:`gatekeeper_loss` on small CPU inputs through :class:`_SmallGatekeeper` (same checks, same math)."""
    num_classes = logits.shape[-1]
    yn = target.numpy()
    valid = None
    # one reduction checks both bounds of int64 targets: a negative id is a huge unsigned one
    in_range = (int(yn.view(np.uint64).max()) < num_classes if yn.dtype == np.int64
                else 0 <= int(yn.min()) and int(yn.max()) < num_classes)
    if not in_range or 0 <= ignore_index < num_classes:
        vn = yn != ignore_index
        bad = vn & ((yn < 0) | (yn >= num_classes))
        if bad.any():
            raise ValueError(
                f"`target` values must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
                f"got {int(bad.sum())} out-of-range values, e.g. {int(yn[bad][0])}"
            )
        if not vn.any():
            raise ValueError("every position of `target` equals `ignore_index`; nothing to compute the loss on")
        valid = torch.from_numpy(vn)
        target = torch.from_numpy(np.where(vn, yn, 0))
    return GatekeeperLossOutput(*_SmallGatekeeper.apply(logits, target, valid, alpha, normalize == "subset"))
