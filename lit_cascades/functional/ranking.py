"""Bipartite ranking from several binary labels: loss aggregation vs label aggregation.

Reference: Lukasik, Chen, Narasimhan, Menon, Jitkrittum, Yu, Reddi, Fu, Bateni, Kumar, "Bipartite Ranking
From Multiple Labels: On Loss Versus Label Aggregation", ICML 2025 (arXiv:2504.11284), §4–§6 (equations as
reported by secondary sources).

One scorer ``f`` ranks instances ``x`` that carry ``K`` binary labels ``Y ∈ {0, 1}^K``, with
``η_k(x) = P(Y_k = 1 | x)`` and priors ``π_k = P(Y_k = 1)``. The per-label AUC is
``AUC_k(f) = P(f(X) > f(X') | Y_k = 1, Y'_k = 0) + ½ P(f(X) = f(X') | ...)``.

* **Loss aggregation (LoA)** maximises ``Σ_k a_k AUC_k``; empirically a weighted sum of per-label
  pairwise surrogate losses, each normalised by its number of positive–negative pairs::

      L_LoA = Σ_k a_k · Σ_ij Y_ik (1 − Y_jk) φ(f_i − f_j) / Σ_ij Y_ik (1 − Y_jk)

  Its Bayes-optimal scorer (Prop. 5.2) ranks by ``Σ_k a_k η_k(x) / (π_k (1 − π_k))``: the normalisation
  gives skewed labels a larger *effective* weight ``α_k = a_k / (π_k (1 − π_k))``.
* **Label aggregation (LaA)** first combines the labels into one multi-level label ``Ȳ = Σ_k Y_k`` (or a
  weighted sum, or the product) and minimises a multipartite pairwise loss::

      L_LaA = Σ_ij 1(Ȳ_i > Ȳ_j) c(Ȳ_i, Ȳ_j) φ(f_i − f_j) / Σ_ij 1(Ȳ_i > Ȳ_j)

  with the *difference* cost ``c = Ȳ_i − Ȳ_j`` (the digest's "linear" cost, Prop. 5.4) or the *uniform*
  cost ``c = 1`` (Prop. 5.3). With the difference cost the Bayes-optimal scorer is ``E[Ȳ | x]``, i.e.
  ``Σ_k η_k(x)`` for the sum: prior-free and Pareto-optimal.

Surrogates ``φ`` of the Heaviside misranking indicator on the margin ``z = f_i − f_j`` (the paper's exact
surrogate is not verified; pairwise logistic is the default): ``"logistic"`` ``log(1 + e^{−z})``,
``"hinge"`` ``max(0, 1 − z)``, ``"squared"`` ``(1 − z)²``.

Two pair modes, both without Python loops over pairs or labels:

* all pairs (default): the ``[B, B]`` margin matrix; LoA's ``K`` label sums are one ``[B, B] @ [B, K]``
  matmul. ``O(B²)`` time and memory.
* sampled pairs (``num_pairs`` per label, or ``pair_fraction`` of each label's valid pairs): ordered pairs
  are drawn uniformly *with replacement* among the valid pairs, so the sampled loss is an unbiased estimate
  of the all-pairs loss. ``O(B log B + K · m)``.

Optional ``groups`` (e.g. a query id in learning to rank) restrict pairs to instances of the same group.
Functions here are plain torch and never import Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_cascades.functional._checks import check_choice, check_finite, check_nonempty, check_range
from lit_cascades.functional.auroc import PAIR_COSTS, PairCost, binary_auroc, check_binary

Surrogate = Literal["logistic", "hinge", "squared"]
SURROGATES: tuple[str, ...] = ("logistic", "hinge", "squared")
LabelAgg = Literal["sum", "product"]
LABEL_AGGS: tuple[str, ...] = ("sum", "product")


class RankingLossOutput(NamedTuple):
    """Result of :func:`loss_aggregation_loss` / :func:`label_aggregation_loss`.

    ``loss`` (scalar) carries the gradient. ``per_label`` is ``[K]`` for loss aggregation (each label's
    normalised pairwise loss, 0 where the batch has no pair for that label) and ``[1]`` for label
    aggregation; ``num_pairs`` holds the matching numbers of valid ordered pairs in the batch (float).
    """

    loss: Tensor
    per_label: Tensor
    num_pairs: Tensor


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


def check_weights(weights: Sequence[float] | Tensor | None, num_labels: int, name: str = "weights") -> Tensor:
    """Validate non-negative label weights of length ``num_labels`` with a positive sum.

    Returns them as a float64 tensor normalised to sum to 1 (``None`` means equal weights).
    """
    if weights is None:
        return torch.full((num_labels,), 1.0 / num_labels, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.shape[0] != num_labels:
        raise ValueError(f"`{name}` must have one entry per label ({num_labels}); got {w.shape[0]}: {w.tolist()}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"`{name}` must be finite and non-negative; got {w.tolist()}")
    if float(w.sum()) <= 0:
        raise ValueError(f"`{name}` must sum to a positive number; got {w.tolist()} (sum {float(w.sum())})")
    return w / w.sum()


def _check_scores(scores: Tensor, groups: Tensor | None) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"`scores` must be a torch.Tensor; got {type(scores).__name__}")
    if scores.ndim != 1:
        raise ValueError(f"`scores` must be 1-D of shape [B]; got shape {tuple(scores.shape)}")
    check_nonempty("scores", scores)
    check_finite("scores", scores)
    if groups is not None and (groups.ndim != 1 or groups.shape[0] != scores.shape[0]):
        raise ValueError(f"`groups` must have shape [B] with B={scores.shape[0]}; got {tuple(groups.shape)}")


def _check_scores_labels(scores: Tensor, labels: Tensor, groups: Tensor | None) -> None:
    _check_scores(scores, groups)
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor; got {type(labels).__name__}")
    if labels.ndim != 2 or labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"`labels` must have shape [B, K] with B={scores.shape[0]} (the length of `scores`); "
            f"got shape {tuple(labels.shape)}"
        )
    check_binary("labels", labels)


def _check_sampling(num_pairs: int | None, pair_fraction: float | None) -> None:
    if num_pairs is not None and pair_fraction is not None:
        raise ValueError("give at most one of `num_pairs` and `pair_fraction`; got both")
    if num_pairs is not None and (not isinstance(num_pairs, int) or num_pairs < 1):
        raise ValueError(f"`num_pairs` must be a positive int; got {num_pairs!r}")
    if pair_fraction is not None:
        check_range("pair_fraction", pair_fraction, 0.0, 1.0, low_open=True)


# ----------------------------------------------------------------------------------------------------------
# surrogates and pair construction
# ----------------------------------------------------------------------------------------------------------


def pairwise_surrogate(margins: Tensor, surrogate: Surrogate = "logistic") -> Tensor:
    """Elementwise surrogate ``φ(z)`` of the misranking indicator ``1(z < 0)`` for margins ``z = f_i − f_j``.

    Args:
        margins: any shape.
        surrogate: ``"logistic"`` ``log(1 + e^{−z})``, ``"hinge"`` ``max(0, 1 − z)`` or ``"squared"``
            ``(1 − z)²``.
    """
    check_choice("surrogate", surrogate, SURROGATES)
    if surrogate == "logistic":
        return F.softplus(-margins)
    if surrogate == "hinge":
        return F.relu(1.0 - margins)
    return (1.0 - margins) ** 2


def _same_group(groups: Tensor | None, like: Tensor) -> Tensor | None:
    if groups is None:
        return None
    return (groups[:, None] == groups[None, :]).to(like.dtype)


def _sample_ordered_pairs(
    levels: Tensor,
    groups: Tensor | None,
    num_pairs: int | None,
    pair_fraction: float | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uniform ordered pairs ``(i, j)`` with ``level_i > level_j`` (same group), independently per column.

    Args:
        levels: ``[C, B]``; column ``c`` is sampled on its own (a binary label, or the aggregated label).
        groups: optional ``[B]`` group ids.

    Returns:
        ``(i [C, M], j [C, M], valid [C, M], total [C])``: sampled pair indices, which of the ``M`` slots are
        used (``pair_fraction`` gives columns different counts; a column without valid pairs has none), and
        each column's number of valid ordered pairs.
    """
    n_col, b = levels.shape
    device = levels.device
    # rank the distinct level values per column (0 = lowest), then sort by (group, level rank)
    _, level_rank = torch.unique(levels, return_inverse=True)
    n_ranks = int(level_rank.max()) + 1
    group_idx = torch.zeros(b, dtype=torch.long, device=device)
    if groups is not None:
        _, group_idx = torch.unique(groups, return_inverse=True)
    key = group_idx[None, :] * n_ranks + level_rank  # [C, B]
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    start = torch.searchsorted(sorted_key, (group_idx * n_ranks)[None, :].expand(n_col, b).contiguous())
    below = torch.searchsorted(sorted_key, key) - start  # same group, strictly lower level
    total = below.sum(1).double()
    if num_pairs is not None:
        counts = torch.where(total > 0, num_pairs, 0)
    else:
        counts = torch.ceil(total * float(pair_fraction)).long()  # type: ignore[arg-type]
    m = max(int(counts.max()), 1)
    probs = below.double()
    empty = total == 0
    probs[empty] = 1.0  # placeholder rows; their slots are marked invalid
    i = torch.multinomial(probs, m, replacement=True, generator=generator)  # [C, M]
    u = torch.rand(n_col, m, generator=generator, device=device, dtype=torch.float64)
    below_i = torch.gather(below, 1, i)
    offset = torch.minimum((u * below_i).long(), (below_i - 1).clamp(min=0))
    j = torch.gather(order, 1, torch.gather(start, 1, i) + offset)
    valid = torch.arange(m, device=device)[None, :] < counts[:, None]
    return i, j, valid, total


# ----------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------


def bipartite_pairwise_losses(
    scores: Tensor,
    labels: Tensor,
    surrogate: Surrogate = "logistic",
    groups: Tensor | None = None,
    num_pairs: int | None = None,
    pair_fraction: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Each label's normalised pairwise loss ``Σ_ij Y_ik (1 − Y_jk) φ(f_i − f_j) / Σ_ij Y_ik (1 − Y_jk)``.

    Args:
        scores: ``[B]`` scores ``f(x_i)`` (higher = ranked first).
        labels: ``[B, K]`` binary labels.
        surrogate: see :func:`pairwise_surrogate`.
        groups: optional ``[B]`` group ids; only pairs within a group count.
        num_pairs: sample this many positive–negative pairs per label instead of using all.
        pair_fraction: sample ``⌈fraction · #pairs⌉`` pairs per label instead of using all.
        generator: random generator for the sampled modes.

    Returns:
        ``(losses [K], num_pairs [K])`` (dtype of ``scores``; ``num_pairs`` are the batch's valid pair counts).
        A label without any positive–negative pair in the batch has loss 0.
    """
    _check_scores_labels(scores, labels, groups)
    _check_sampling(num_pairs, pair_fraction)
    check_choice("surrogate", surrogate, SURROGATES)
    y = labels.to(scores.dtype)
    if num_pairs is None and pair_fraction is None:
        phi = pairwise_surrogate(scores[:, None] - scores[None, :], surrogate)  # [B, B], row i ranked above j
        same = _same_group(groups, scores)
        if same is not None:
            phi = phi * same
            count = (y * (same @ (1.0 - y))).sum(0)
        else:
            n_pos = y.sum(0)
            count = n_pos * (y.shape[0] - n_pos)
        total = (y * (phi @ (1.0 - y))).sum(0)  # [K]
        return total / count.clamp(min=1), count
    i, j, valid, count = _sample_ordered_pairs(labels.T.long(), groups, num_pairs, pair_fraction, generator)
    phi = pairwise_surrogate(scores[i] - scores[j], surrogate) * valid
    loss = phi.sum(1) / valid.sum(1).clamp(min=1)
    return loss, count.to(scores.dtype)


def loss_aggregation_loss(
    scores: Tensor,
    labels: Tensor,
    weights: Sequence[float] | Tensor | None = None,
    surrogate: Surrogate = "logistic",
    groups: Tensor | None = None,
    num_pairs: int | None = None,
    pair_fraction: float | None = None,
    generator: torch.Generator | None = None,
) -> RankingLossOutput:
    """Loss aggregation (LoA, Lukasik et al. §4.3): ``Σ_k a_k L_k`` of per-label normalised pairwise losses.

    Args:
        scores: ``[B]`` scores.
        labels: ``[B, K]`` binary labels.
        weights: ``[K]`` non-negative label weights ``a`` with a positive sum; normalised to sum to 1
            (default: equal). The scale does not change the minimiser.
        surrogate, groups, num_pairs, pair_fraction, generator: see :func:`bipartite_pairwise_losses`.

    Returns:
        :class:`RankingLossOutput` with ``per_label [K]``.
    """
    per_label, count = bipartite_pairwise_losses(
        scores, labels, surrogate, groups, num_pairs, pair_fraction, generator
    )
    w = check_weights(weights, labels.shape[1]).to(device=scores.device, dtype=scores.dtype)
    return RankingLossOutput((w * per_label).sum(), per_label, count)


def aggregate_labels(
    labels: Tensor, label_agg: LabelAgg = "sum", weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Combine ``[B, K]`` binary labels into one multi-level label ``Ȳ`` ``[B]`` (label aggregation).

    * ``"sum"``: ``Ȳ = Σ_k w_k Y_k`` with ``w`` = ``weights`` *unnormalised* (default all 1, so ``Ȳ`` counts
      the positive labels, ``0..K``; the paper's aggregation).
    * ``"product"``: ``Ȳ = Π_k Y_k`` (all labels positive; the paper's figure (d)). ``weights`` must be None.

    Returns:
        float ``[B]`` levels (float64 for weighted sums, else the dtype of ``labels`` cast to float).
    """
    check_choice("label_agg", label_agg, LABEL_AGGS)
    check_binary("labels", labels)
    if labels.ndim != 2:
        raise ValueError(f"`labels` must have shape [B, K]; got {tuple(labels.shape)}")
    y = labels.double()
    if label_agg == "product":
        if weights is not None:
            raise ValueError("`weights` are not used by label_agg='product'; pass weights=None")
        return y.prod(1)
    if weights is None:
        return y.sum(1)
    w = check_weights(weights, labels.shape[1]) * labels.shape[1]  # mean weight 1: levels stay on a 0..K scale
    return y @ w.to(y.device)


def multipartite_pairwise_loss(
    scores: Tensor,
    levels: Tensor,
    cost: PairCost = "difference",
    surrogate: Surrogate = "logistic",
    groups: Tensor | None = None,
    num_pairs: int | None = None,
    pair_fraction: float | None = None,
    generator: torch.Generator | None = None,
) -> RankingLossOutput:
    """Multipartite pairwise loss on a multi-level label (the second step of label aggregation).

    ``Σ_ij 1(Ȳ_i > Ȳ_j) c(Ȳ_i, Ȳ_j) φ(f_i − f_j) / Σ_ij 1(Ȳ_i > Ȳ_j)``, normalised by the number of ordered
    pairs (the digest's empirical form; it rescales the loss per batch and leaves the minimiser unchanged).

    Args:
        scores: ``[B]`` scores.
        levels: ``[B]`` real-valued levels ``Ȳ`` (e.g. from :func:`aggregate_labels`).
        cost: ``"difference"`` ``c = Ȳ_i − Ȳ_j`` or ``"uniform"`` ``c = 1``.
        surrogate, groups, num_pairs, pair_fraction, generator: see :func:`bipartite_pairwise_losses`.

    Returns:
        :class:`RankingLossOutput` with ``per_label`` and ``num_pairs`` of shape ``[1]``.
    """
    if not isinstance(levels, Tensor) or levels.shape != scores.shape:
        raise ValueError(f"`levels` must be a tensor of shape {tuple(scores.shape)} like `scores`; got "
                         f"{tuple(levels.shape) if isinstance(levels, Tensor) else type(levels).__name__}")
    _check_scores(scores, groups)
    check_finite("levels", levels.double())
    _check_sampling(num_pairs, pair_fraction)
    check_choice("cost", cost, PAIR_COSTS)
    check_choice("surrogate", surrogate, SURROGATES)
    level = levels.to(device=scores.device, dtype=torch.float64)
    if num_pairs is None and pair_fraction is None:
        diff = level[:, None] - level[None, :]
        ordered = diff > 0
        same = _same_group(groups, scores)
        if same is not None:
            ordered = ordered & same.bool()
        c = diff if cost == "difference" else torch.ones_like(diff)
        weight = (c * ordered).to(scores.dtype)
        phi = pairwise_surrogate(scores[:, None] - scores[None, :], surrogate)
        count = ordered.sum().to(scores.dtype)
        loss = (weight * phi).sum() / count.clamp(min=1)
        return RankingLossOutput(loss, loss[None], count[None])
    i, j, valid, count = _sample_ordered_pairs(level[None, :], groups, num_pairs, pair_fraction, generator)
    c = (level[i] - level[j]) if cost == "difference" else torch.ones_like(level[i])
    phi = pairwise_surrogate(scores[i] - scores[j], surrogate) * c.to(scores.dtype) * valid
    loss = phi.sum(1) / valid.sum(1).clamp(min=1)
    return RankingLossOutput(loss[0], loss, count.to(scores.dtype))


def label_aggregation_loss(
    scores: Tensor,
    labels: Tensor,
    cost: PairCost = "difference",
    label_agg: LabelAgg = "sum",
    weights: Sequence[float] | Tensor | None = None,
    surrogate: Surrogate = "logistic",
    groups: Tensor | None = None,
    num_pairs: int | None = None,
    pair_fraction: float | None = None,
    generator: torch.Generator | None = None,
) -> RankingLossOutput:
    """Label aggregation (LaA, Lukasik et al. §4.4): :func:`multipartite_pairwise_loss` on ``Ȳ = agg(Y)``.

    Args:
        scores: ``[B]`` scores.
        labels: ``[B, K]`` binary labels.
        cost: ``"difference"`` ``c = Ȳ_i − Ȳ_j`` (Prop. 5.4: Bayes-optimal scorer ``E[Ȳ | x]``) or
            ``"uniform"`` ``c = 1`` (Prop. 5.3: not Pareto-optimal in general).
        label_agg: ``"sum"`` (optionally weighted by ``weights``, rescaled to mean 1) or ``"product"``.
        weights: optional ``[K]`` label weights of the sum.
        surrogate, groups, num_pairs, pair_fraction, generator: see :func:`bipartite_pairwise_losses`.

    Returns:
        :class:`RankingLossOutput` with ``per_label`` and ``num_pairs`` of shape ``[1]``.
    """
    _check_scores_labels(scores, labels, groups)
    levels = aggregate_labels(labels, label_agg, weights).to(scores.device)
    return multipartite_pairwise_loss(scores, levels, cost, surrogate, groups, num_pairs, pair_fraction, generator)


# ----------------------------------------------------------------------------------------------------------
# Bayes-optimal scorers and population objectives (for a known data distribution)
# ----------------------------------------------------------------------------------------------------------


def _check_eta(eta: Tensor) -> None:
    if not isinstance(eta, Tensor) or eta.ndim != 2:
        raise ValueError(f"`eta` must be a [N, K] tensor of P(Y_k = 1 | x); got {getattr(eta, 'shape', eta)}")
    check_finite("eta", eta.double())
    if bool((eta < 0).any()) or bool((eta > 1).any()):
        raise ValueError("`eta` must hold probabilities in [0, 1]")


def effective_loss_weights(weights: Sequence[float] | Tensor | None, priors: Sequence[float] | Tensor) -> Tensor:
    """LoA's effective label weights ``α_k = a_k / (π_k (1 − π_k))`` (Prop. 5.2), normalised to sum to 1.

    The ratio of these weights, not of ``a``, decides which label dictates the ranking (Prop. 6.1).

    Args:
        weights: ``[K]`` LoA weights ``a`` (default equal).
        priors: ``[K]`` label priors ``π_k`` in ``(0, 1)``.
    """
    pi = torch.as_tensor(priors, dtype=torch.float64).flatten()
    if bool((pi <= 0).any()) or bool((pi >= 1).any()):
        raise ValueError(f"`priors` must lie in (0, 1) (each label needs both classes); got {pi.tolist()}")
    a = check_weights(weights, pi.shape[0])
    alpha = a / (pi * (1 - pi))
    return alpha / alpha.sum()


def bayes_optimal_loss_aggregation(
    eta: Tensor, priors: Sequence[float] | Tensor, weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Bayes-optimal LoA scorer (Prop. 5.2): ``Σ_k a_k η_k(x) / (π_k (1 − π_k))`` (up to a positive scale).

    Any strictly increasing transform ranks identically. Derivation: for a pair ``(x, x')`` the LoA objective
    gains ``Σ_k α_k [η_k(x)(1 − η_k(x')) − η_k(x')(1 − η_k(x))] = Σ_k α_k (η_k(x) − η_k(x'))`` by ranking ``x``
    first, with ``α_k = a_k / (π_k (1 − π_k))``.

    Args:
        eta: ``[N, K]`` ``P(Y_k = 1 | x)``.
        priors: ``[K]`` ``π_k = E[η_k(X)]`` (population priors, not batch estimates).
        weights: ``[K]`` LoA weights ``a`` (default equal).

    Returns:
        ``[N]`` float64 scores.
    """
    _check_eta(eta)
    alpha = effective_loss_weights(weights, priors).to(eta.device)
    return eta.double() @ alpha


def bayes_optimal_label_aggregation(
    eta: Tensor, weights: Sequence[float] | Tensor | None = None, label_agg: LabelAgg = "sum"
) -> Tensor:
    """Bayes-optimal LaA scorer with the difference cost (Prop. 5.4): ``E[Ȳ | x]``.

    For a pair ``(x, x')`` the difference-cost objective gains ``E[(Ȳ − Ȳ')₊] − E[(Ȳ' − Ȳ)₊] = E[Ȳ | x] −
    E[Ȳ' | x']`` by ranking ``x`` first, so ``E[Ȳ | x]`` is optimal for any aggregation:

    * ``"sum"``: ``Σ_k w_k η_k(x)`` (``w = 1`` by default): independent of the priors.
    * ``"product"``: ``Π_k η_k(x)``, assuming the labels are independent given ``x`` (true for
      deterministic labels and for :mod:`lit_cascades.data.synthetic`).

    The uniform cost has no such closed form (its pairwise preference need not be transitive, Prop. 5.3).

    Args:
        eta: ``[N, K]`` ``P(Y_k = 1 | x)``.
        weights: optional ``[K]`` weights of the sum.
        label_agg: ``"sum"`` or ``"product"``.

    Returns:
        ``[N]`` float64 scores.
    """
    _check_eta(eta)
    check_choice("label_agg", label_agg, LABEL_AGGS)
    if label_agg == "product":
        return eta.double().prod(1)
    w = check_weights(weights, eta.shape[1]).to(eta.device)
    return eta.double() @ w


def _heaviside_matrix(scores: Tensor) -> Tensor:
    s = scores.double()
    d = s[:, None] - s[None, :]
    return (d > 0).double() + 0.5 * (d == 0).double()


def _check_support(scores: Tensor, mass: Tensor) -> Tensor:
    if scores.ndim != 1 or mass.shape != scores.shape:
        raise ValueError(f"`scores` and `mass` must both be [M]; got {tuple(scores.shape)}, {tuple(mass.shape)}")
    check_finite("scores", scores.double())
    if bool((mass < 0).any()) or float(mass.sum()) <= 0:
        raise ValueError("`mass` must be non-negative with a positive sum")
    return mass.double() / mass.double().sum()


def population_auroc(scores: Tensor, mass: Tensor, eta: Tensor) -> Tensor:
    """Exact per-label AUC of a scorer on a finite distribution (ties ½).

    ``X`` takes value ``m`` with probability ``mass[m]``; ``P(Y_k = 1 | X = m) = eta[m, k]``. Pairs are
    i.i.d. draws ``(X, X')``, so a support point can pair with itself (a tie). ``O(M²)``.

    Args:
        scores: ``[M]`` the scorer's value at each support point.
        mass: ``[M]`` non-negative probabilities (normalised here).
        eta: ``[M, K]``.

    Returns:
        ``[K]`` float64 AUCs.
    """
    p = _check_support(scores, mass)
    _check_eta(eta)
    e = eta.double()
    pos, neg = p[:, None] * e, p[:, None] * (1 - e)  # [M, K] joint masses of (x, Y_k=1) / (x, Y_k=0)
    num = (pos * (_heaviside_matrix(scores) @ neg)).sum(0)
    return num / (pos.sum(0) * neg.sum(0))


def population_multipartite_auroc(
    scores: Tensor, mass: Tensor, level_probs: Tensor, level_values: Tensor, cost: PairCost = "difference"
) -> Tensor:
    """Exact LaA objective ``E[c(Ȳ, Ȳ') H(f(X) − f(X')) | Ȳ > Ȳ']`` on a finite distribution.

    Args:
        scores: ``[M]`` the scorer on the support.
        mass: ``[M]`` probabilities.
        level_probs: ``[M, L]`` ``P(Ȳ = level_values[l] | X = m)``.
        level_values: ``[L]`` the level values.
        cost: ``"difference"`` or ``"uniform"``.
    """
    check_choice("cost", cost, PAIR_COSTS)
    p = _check_support(scores, mass)
    v = level_values.double()
    diff = v[:, None] - v[None, :]
    c = diff.clamp(min=0) if cost == "difference" else (diff > 0).double()
    joint = p[:, None] * level_probs.double()  # [M, L]
    # Σ_{m,n} Σ_{l,l'} joint[m,l] joint[n,l'] c[l,l'] H[m,n]  /  Σ ... 1(l > l')
    num = (joint @ c * (_heaviside_matrix(scores) @ joint)).sum()
    marg = joint.sum(0)
    den = marg @ (diff > 0).double() @ marg
    return num / den


def independent_level_probs(eta: Tensor, label_agg: LabelAgg = "sum") -> tuple[Tensor, Tensor]:
    """Distribution of ``Ȳ`` given ``x`` when the labels are independent given ``x``.

    Args:
        eta: ``[M, K]``.
        label_agg: ``"sum"`` (levels ``0..K``) or ``"product"`` (levels 0, 1).

    Returns:
        ``(level_probs [M, L], level_values [L])``.
    """
    _check_eta(eta)
    check_choice("label_agg", label_agg, LABEL_AGGS)
    e = eta.double()
    if label_agg == "product":
        p1 = e.prod(1)
        return torch.stack([1 - p1, p1], 1), torch.tensor([0.0, 1.0], dtype=torch.float64)
    probs = torch.ones(e.shape[0], 1, dtype=torch.float64, device=e.device)
    for k in range(e.shape[1]):  # convolution of Bernoullis, K steps
        probs = F.pad(probs * (1 - e[:, k : k + 1]), (0, 1)) + F.pad(probs * e[:, k : k + 1], (1, 0))
    return probs, torch.arange(e.shape[1] + 1, dtype=torch.float64)


def cross_cell_order(scores: Tensor, labels: Tensor, first: int = 0, second: int = 1) -> Tensor:
    """How a ranking orders the two "disagreement" cells of labels ``first`` and ``second`` (Prop. 6.1).

    ``P(f(x) > f(x') | x ∈ (1, 0), x' ∈ (0, 1)) + ½ P(f(x) = f(x') | ...)``, where ``(1, 0)`` means label
    ``first`` positive and label ``second`` negative: 1 when label ``first`` dictates the order of the two
    cells, 0 when label ``second`` does, in between when neither does.

    Args:
        scores: ``[N]`` scores.
        labels: ``[N, K]`` binary labels.
        first, second: the two label columns.

    Returns:
        float64 scalar; NaN when either cell is empty.
    """
    _check_scores_labels(scores, labels, None)
    a, b = labels[:, first].bool(), labels[:, second].bool()
    cell10, cell01 = a & ~b, ~a & b
    keep = cell10 | cell01
    if not bool(cell10.any()) or not bool(cell01.any()):
        return torch.tensor(float("nan"), dtype=torch.float64, device=scores.device)
    return binary_auroc(scores[keep], cell10[keep])


def lexicographic_loa_auc(prior_dictator: float) -> float:
    """Per-label AUC of the *dictated* label under LoA label dictatorship (Prop. 6.1), in closed form.

    With two deterministic labels that are independent, the LoA-optimal ranking is lexicographic: every
    ``(1, 0)`` above every ``(0, 1)`` when label 1 dictates. The dictating label's AUC is 1 and the other
    label's is ``π_d + (1 − π_d)²`` where ``π_d`` is the dictator's prior: its positives in ``(0, 1)`` lose to
    its negatives in ``(1, 0)``. (Minimal, 0.75, at ``π_d = ½``.)
    """
    check_range("prior_dictator", prior_dictator, 0.0, 1.0)
    return prior_dictator + (1 - prior_dictator) ** 2


def tied_laa_auc(prior_other: float) -> float:
    """Per-label AUC under the LaA-sum ranking ``(1,1) ≻ {(1,0) ~ (0,1)} ≻ (0,0)`` with ``(1,0)``/``(0,1)`` tied.

    For two independent deterministic labels, label ``k``'s AUC is ``π_o + (1 − π_o)(1 − π_o / 2)`` where
    ``π_o`` is the *other* label's prior (a tie counts ½).
    """
    check_range("prior_other", prior_other, 0.0, 1.0)
    return prior_other + (1 - prior_other) * (1 - prior_other / 2)


__all__ = [
    "LABEL_AGGS",
    "SURROGATES",
    "LabelAgg",
    "RankingLossOutput",
    "Surrogate",
    "aggregate_labels",
    "bayes_optimal_label_aggregation",
    "bayes_optimal_loss_aggregation",
    "bipartite_pairwise_losses",
    "check_weights",
    "cross_cell_order",
    "effective_loss_weights",
    "independent_level_probs",
    "label_aggregation_loss",
    "lexicographic_loa_auc",
    "loss_aggregation_loss",
    "multipartite_pairwise_loss",
    "pairwise_surrogate",
    "population_auroc",
    "population_multipartite_auroc",
    "tied_laa_auc",
]
