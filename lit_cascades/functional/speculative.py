"""Speculative cascades: deferral rules executed through speculative sampling (pure torch).

Reference: Narasimhan et al., "Faster Cascades via Speculative Decoding", ICLR 2025 (arXiv 2405.19261), and
the official colab ``google-research/speculative_cascades`` . Notation as in
the paper and in Hugging Face's ``_speculative_sampling``: ``q`` is the drafter's (small model's) next-token
distribution, ``p`` the verifier's (large model's), ``π`` the *target* distribution that a rule builds from
them. Generic speculative sampling with target ``π`` (the paper's ``GenSpecSample``): a draft ``x ~ q`` is
accepted with probability ``min(1, π(x)/q(x))``; on rejection the emitted token is drawn from the residual
``norm(max(0, π − q))``. Every emitted token is then distributed exactly as ``π``, and the rejection
(deferral) probability is ``D_TV(q, π) = Σ_v max(0, q(v) − π(v))``.

Rules (``alpha`` is the colab's ``lenience``; ``q̃, p̃`` are temperature-1 probabilities, ``q, p`` the
temperature-scaled ones; the *decision* uses ``q̃, p̃``, the *target* is built from ``q, p``, as in the colab):

=================  ======================================================================  ===============
rule               target ``π``                                                            ``alpha`` range
=================  ======================================================================  ===============
``spec_decode``    ``p`` (exact speculative decoding; always defer)                         ignored
``drafter_only``   ``q`` (never defer)                                                      ignored
``chow``           ``q`` if ``max q̃ ≥ 1 − α`` else ``p`` (eq. 2)                             [0, 1]
``diff``           ``q`` if ``max q̃ ≥ max p̃ − α`` else ``p`` (eq. 5)                         [-1, 1]
``opt``            ``q`` if ``max q̃ ≥ max p̃ − α·D_TV(q, p)`` else ``p`` (eq. 10)             any real
``token_v1``       ``q·a + (1 − Σ q·a)·p``, ``a(v) = 1{q̃(v) ≥ max p̃ − α}`` (eq. 13)           [-1, 1]
``token_v2``       same with ``a(v) = 1{p̃(v) ≥ max p̃ − α}`` (eq. 14)                         [-1, 1]
``token_v3``       same with ``a(v) = 1{p̃(v) ≥ (1 − α)·max p̃}`` (eq. 15)                     [0, 1]
``lossy``          lossy speculative decoding (Leviathan et al. 2023, App. A.5): accept       [0, 1]
                   with ``min(1, p(x) / ((1 − α)·q(x)))``, residual ``norm(max(0, p − q))``
=================  ======================================================================  ===============

``lossy`` is not of the ``min(1, π/q)`` form; :func:`rule_acceptance` returns its own acceptance and residual,
and :func:`target_distribution` its *implied* output distribution. ``α = 0`` is exact only for ``lossy``;
``diff``/``token_v1``/``token_v2`` at ``α = −1`` also always defer, but
use ``spec_decode`` for exact speculative decoding.

Temperature 0 (greedy) follows the colab: the scaled distributions are one-hot at the argmax, so every target
is a one-hot (or a mixture of one-hots that, with a one-hot ``q``, is again one of them) and the step is
deterministic; for ``spec_decode`` it reduces to Hugging Face's greedy assisted generation (accept while the
draft equals the verifier's argmax, then emit the verifier's argmax).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RULES: tuple[str, ...] = ("spec_decode", "drafter_only", "chow", "diff", "opt", "token_v1", "token_v2", "token_v3",
                          "lossy")
#: the documented ``alpha`` range of each rule (inclusive; ``None`` = alpha is ignored).
ALPHA_RANGES: dict[str, tuple[float, float] | None] = {
    "spec_decode": None, "drafter_only": None, "chow": (0.0, 1.0), "diff": (-1.0, 1.0),
    "opt": (-math.inf, math.inf), "token_v1": (-1.0, 1.0), "token_v2": (-1.0, 1.0), "token_v3": (0.0, 1.0),
    "lossy": (0.0, 1.0),
}
#: the colab's clamp of the acceptance ratio's denominator.
MIN_PROB = 1e-10
BONUS_CHOICES: tuple[str, ...] = ("verifier", "target")


def check_rule(rule: str, alpha: float | None) -> float:
    """Validate ``rule`` and ``alpha`` (see :data:`ALPHA_RANGES`); returns ``alpha`` as a float (0 if ignored)."""
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {list(RULES)}; got {rule!r}")
    bounds = ALPHA_RANGES[rule]
    if bounds is None:
        return 0.0
    if alpha is None or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"rule {rule!r} needs a numeric `alpha` in [{bounds[0]}, {bounds[1]}]; got {alpha!r}")
    alpha = float(alpha)
    if math.isnan(alpha) or not bounds[0] <= alpha <= bounds[1]:
        raise ValueError(f"`alpha` for rule {rule!r} must be in [{bounds[0]}, {bounds[1]}]; got {alpha}")
    return alpha


def scaled_probs(logits: Tensor, temperature: float) -> Tensor:
    """Next-token distribution at ``temperature`` ``[..., V]`` (float32); ``T = 0`` gives the argmax one-hot.

    Ties at ``T = 0`` go to the lowest index (``torch.argmax``), like Hugging Face's greedy decoding.
    """
    if temperature < 0 or math.isnan(temperature):
        raise ValueError(f"`temperature` must be >= 0; got {temperature}")
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def total_variation(a: Tensor, b: Tensor) -> Tensor:
    """``D_TV(a, b) = Σ_v max(0, a(v) − b(v))`` over the last dimension (``[...]``)."""
    return (a - b).clamp(min=0).sum(-1)


def _mix(q: Tensor, p: Tensor, accept_region: Tensor) -> Tensor:
    """Token-specific target ``π(v) = q(v)·a(v) + (1 − Σ_u q(u)·a(u))·p(v)`` (eq. 11 family)."""
    qa = q * accept_region
    return qa + (1.0 - qa.sum(-1, keepdim=True)).clamp(min=0) * p


def keep_small(rule: str, q_raw: Tensor, p_raw: Tensor, alpha: float, q: Tensor | None = None,
               p: Tensor | None = None) -> Tensor:
    """The position-level decision ``[...]`` (True = keep the drafter, ``π = q``) of ``chow``/``diff``/``opt``.

    ``q_raw``/``p_raw`` are temperature-1 distributions; ``opt`` measures ``D_TV`` on the scaled ``q, p``
    (as the colab does; default: the raw ones).
    """
    max_q = q_raw.max(-1).values
    if rule == "chow":
        return max_q >= 1.0 - alpha
    max_p = p_raw.max(-1).values
    if rule == "diff":
        return max_q >= max_p - alpha
    if rule == "opt":
        tv = total_variation(q if q is not None else q_raw, p if p is not None else p_raw)
        return max_q >= max_p - alpha * tv
    raise ValueError(f"`rule` must be one of ['chow', 'diff', 'opt'] for a position-level decision; got {rule!r}")


def accept_region(rule: str, q_raw: Tensor, p_raw: Tensor, alpha: float) -> Tensor:
    """The token-specific accepted region ``a(v)`` ``[..., V]`` (float 0/1) of ``token_v1/v2/v3``."""
    max_p = p_raw.max(-1, keepdim=True).values
    if rule == "token_v1":
        return (q_raw >= max_p - alpha).float()
    if rule == "token_v2":
        return (p_raw >= max_p - alpha).float()
    if rule == "token_v3":
        return (p_raw >= (1.0 - alpha) * max_p).float()
    raise ValueError(f"`rule` must be one of ['token_v1', 'token_v2', 'token_v3']; got {rule!r}")


def _check_dists(q: Tensor, p: Tensor, q_raw: Tensor | None, p_raw: Tensor | None) -> tuple[Tensor, Tensor]:
    if q.shape != p.shape:
        raise ValueError(f"`q` and `p` must have the same shape [..., V]; got {tuple(q.shape)} and {tuple(p.shape)}")
    q_raw = q if q_raw is None else q_raw
    p_raw = p if p_raw is None else p_raw
    if q_raw.shape != q.shape or p_raw.shape != p.shape:
        raise ValueError(f"`q_raw`/`p_raw` must have the shape of `q` {tuple(q.shape)}; got "
                         f"{tuple(q_raw.shape)} and {tuple(p_raw.shape)}")
    return q_raw, p_raw


def target_distribution(rule: str, q: Tensor, p: Tensor, alpha: float | None = None, q_raw: Tensor | None = None,
                        p_raw: Tensor | None = None) -> Tensor:
    """The target ``π`` ``[..., V]`` of ``rule`` (module table) from drafter ``q`` and verifier ``p``.

    Args:
        rule: one of :data:`RULES`.
        q, p: ``[..., V]`` temperature-scaled distributions (see :func:`scaled_probs`).
        alpha: the rule's trade-off (``lenience``); range in :data:`ALPHA_RANGES`.
        q_raw, p_raw: temperature-1 distributions for the deferral decision; default ``q``/``p``.

    For ``lossy`` the returned ``π`` is the distribution its accept/reject step emits,
    ``q·a + (Σ_u q(u)(1 − a(u)))·norm(max(0, p − q))`` with ``a = min(1, p / ((1 − α) q))``.
    """
    alpha = check_rule(rule, alpha)
    q_raw, p_raw = _check_dists(q, p, q_raw, p_raw)
    if rule == "spec_decode":
        return p.clone()
    if rule == "drafter_only":
        return q.clone()
    if rule in ("chow", "diff", "opt"):
        keep = keep_small(rule, q_raw, p_raw, alpha, q, p)
        return torch.where(keep[..., None], q, p)
    if rule.startswith("token_"):
        return _mix(q, p, accept_region(rule, q_raw, p_raw, alpha))
    accept = _lossy_accept(q, p, alpha)
    residual = residual_distribution(q, p)
    return q * accept + (q * (1.0 - accept)).sum(-1, keepdim=True) * residual


def defers(rule: str, q: Tensor, p: Tensor, alpha: float | None = None, q_raw: Tensor | None = None,
           p_raw: Tensor | None = None) -> Tensor:
    """The rule's deferral decision ``[...]`` (bool): True where its target ``π`` puts weight on the verifier.

    ``spec_decode``: always; ``drafter_only``: never; ``chow``/``diff``/``opt``: where the position-level rule
    picks ``p``; ``token_v1/v2/v3``: where ``1 − Σ_v q(v)·a(v) > 0`` (the mass of ``q`` outside the accepted
    region goes to ``p``); ``lossy``: where its output distribution differs from ``q``. This is the rule's
    deferral rate (Narasimhan et al., arXiv:2405.19261, §3), not the rejection rate of the accept/reject step
    (``D_TV(q, π)`` in expectation), which is smaller: a deferred position still accepts a draft that ``p``
    likes.
    """
    alpha = check_rule(rule, alpha)
    q_raw, p_raw = _check_dists(q, p, q_raw, p_raw)
    if rule == "spec_decode":
        return torch.ones(q.shape[:-1], dtype=torch.bool, device=q.device)
    if rule == "drafter_only":
        return torch.zeros(q.shape[:-1], dtype=torch.bool, device=q.device)
    if rule in ("chow", "diff", "opt"):
        return ~keep_small(rule, q_raw, p_raw, alpha, q, p)
    if rule.startswith("token_"):
        return (q * accept_region(rule, q_raw, p_raw, alpha)).sum(-1) < 1.0 - 1e-6
    return (target_distribution(rule, q, p, alpha) - q).abs().sum(-1) > 1e-6


def _lossy_accept(q: Tensor, p: Tensor, lenience: float) -> Tensor:
    """Lossy acceptance ``min(1, p / max((1 − l)·q, MIN_PROB))`` for every token (the colab's SPEED)."""
    return (p / ((1.0 - lenience) * q).clamp(min=MIN_PROB)).clamp(max=1.0)


def residual_distribution(q: Tensor, target: Tensor) -> Tensor:
    """``norm(max(0, target − q))`` ``[..., V]``; rows where it is all zero (``target = q``: nothing is ever
    rejected there) fall back to ``target``."""
    res = (target - q).clamp(min=0)
    total = res.sum(-1, keepdim=True)
    return torch.where(total > 0, res / total.clamp(min=torch.finfo(res.dtype).tiny), target)


def acceptance_probability(draft: Tensor, q: Tensor, target: Tensor) -> Tensor:
    """``min(1, π(x)/q(x))`` of the drafted tokens ``x`` (``draft [...]`` ids, ``q``/``target [..., V]``)."""
    qx = q.gather(-1, draft[..., None]).squeeze(-1)
    px = target.gather(-1, draft[..., None]).squeeze(-1)
    return (px / qx.clamp(min=MIN_PROB)).clamp(max=1.0)


def rule_acceptance(rule: str, draft: Tensor, q: Tensor, p: Tensor, alpha: float | None = None,
                    q_raw: Tensor | None = None, p_raw: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Acceptance probability of each draft and the residual of ``rule`` at each drafted position.

    Args:
        draft: ``[B, γ]`` drafted ids (sampled from ``q``).
        q, p: ``[B, γ, V]`` scaled distributions at the drafted positions (``p`` from the verifier's block
            forward); ``q_raw``/``p_raw`` the temperature-1 ones (decision); ``alpha`` as in
            :func:`target_distribution`.

    Returns:
        ``(accept [B, γ], residual [B, γ, V], target [B, γ, V])``.
    """
    alpha = check_rule(rule, alpha)
    if rule == "lossy":
        _check_dists(q, p, q_raw, p_raw)
        accept = _lossy_accept(q, p, alpha).gather(-1, draft[..., None]).squeeze(-1)
        return accept, residual_distribution(q, p), target_distribution(rule, q, p, alpha)
    target = target_distribution(rule, q, p, alpha, q_raw, p_raw)
    return acceptance_probability(draft, q, target), residual_distribution(q, target), target


def _sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of ``probs [B, V]`` (exact argmax for one-hot rows)."""
    return torch.multinomial(probs.float(), 1, generator=generator).squeeze(-1)


def verify_block(draft: Tensor, accept: Tensor, residual: Tensor, bonus: Tensor,
                 generator: torch.Generator | None = None, uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Accept/reject a block of ``γ`` drafts per row (vectorised over the batch).

    Draft ``j`` of row ``b`` is accepted iff ``u[b, j] < accept[b, j]`` (``u ~ U[0, 1)``); each row keeps its
    longest accepted prefix ``n_b``; the next token is drawn from ``residual[b, n_b]`` when ``n_b < γ`` and
    from ``bonus[b]`` when all ``γ`` drafts were accepted.

    Args:
        draft: ``[B, γ]`` drafted ids.
        accept: ``[B, γ]`` acceptance probabilities (:func:`rule_acceptance`).
        residual: ``[B, γ, V]`` residual distributions.
        bonus: ``[B, V]`` distribution of the token after a fully accepted block (see ``bonus`` in
            :class:`~lit_cascades.models.speculative.SpeculativeDecoder`).
        generator: RNG of the coins and draws.
        uniforms: ``[B, γ]`` coins to use instead of drawing them (tests).

    Returns:
        ``(n_accepted [B] long in [0, γ], next_token [B] long)``.
    """
    if draft.ndim != 2 or accept.shape != draft.shape:
        raise ValueError(f"`draft` and `accept` must both be [B, γ]; got {tuple(draft.shape)} and {tuple(accept.shape)}")
    b, gamma = draft.shape
    if residual.shape[:2] != (b, gamma) or bonus.shape != (b, residual.shape[-1]):
        raise ValueError(f"`residual` must be [B, γ, V] and `bonus` [B, V] with B={b}, γ={gamma}; got "
                         f"{tuple(residual.shape)} and {tuple(bonus.shape)}")
    if uniforms is None:
        uniforms = torch.rand(draft.shape, generator=generator, device=draft.device)
    accepted = uniforms < accept
    n = accepted.long().cumprod(-1).sum(-1)
    rows = torch.arange(b, device=draft.device)
    dist = torch.cat([residual, bonus[:, None]], dim=1)[rows, n]  # [B, V]
    return n, _sample(dist, generator)
