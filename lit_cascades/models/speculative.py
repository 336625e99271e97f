"""Batched speculative-cascade decoding with two Hugging Face causal LMs (drafter and verifier).

Reference: Narasimhan et al., ICLR 2025 (``shared/papers/cascades.md`` §3.5); the accept/reject rules live in
:mod:`lit_cascades.functional.speculative`. One round, for a left-padded batch of ``B`` rows:

1. **draft**: the drafter samples ``γ`` tokens autoregressively from its (temperature-scaled) ``q``;
2. **verify**: one verifier forward over the pending tokens and the ``γ`` drafts gives ``p_1 … p_{γ+1}``;
3. **accept**: each row keeps its longest accepted prefix ``n_b`` (:func:`~lit_cascades.functional.speculative.
   verify_block`) and emits one more token: the residual draw at the first rejection, or a *bonus* token after
   ``γ`` acceptances;
4. **roll back**: both KV caches are cropped (``DynamicCache.crop``) to the longest accepted prefix of the
   batch, ``max_b n_b``. Rows that accepted fewer drafts keep their rejected columns in the cache with attention
   mask 0 (*holes*), so the batch stays rectangular and no row is re-run; positions are ``cumsum(mask) − 1``, so
   a hole shifts nothing. With ``B = 1`` (or equal acceptances) this is exactly the usual crop, without holes.

Finished rows (stop token or budget reached) stay in the batch with mask-0 columns until every row is done.
Draft columns beyond a row's budget are masked too, so no position exceeds ``prompt + max_new_tokens − 1``.

**Bonus token** (after a fully accepted block; what the paper samples there is UNVERIFIED): ``bonus="verifier"``
(default) draws it from the verifier's ``p_{γ+1}`` as speculative decoding and Hugging Face do, at no extra cost;
``bonus="target"`` draws it from the rule's ``π_{γ+1}``, which needs the drafter's ``q_{γ+1}`` (one more drafter
forward per round) and makes every emitted token follow ``π`` (the token-level cascade; needed for
``drafter_only`` to equal the drafter's own decoding).

Statistics per row: ``accepted`` drafts kept in the output, ``drafted`` tokens proposed, ``verifier_calls`` and
``drafter_calls`` (forwards while the row was unfinished) and ``num_tokens`` emitted.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_cascades.functional.speculative import (
    BONUS_CHOICES,
    check_rule,
    rule_acceptance,
    scaled_probs,
    target_distribution,
    verify_block,
)
from lit_cascades.models.generation import as_stop_counts, check_fits_context
from lit_cascades.models.lm_pair import check_same_vocab, model_vocab_size

#: Settings of transformers' assisted generation that it reads from the *assistant's* ``generation_config``
#: (the same names passed to ``generate()`` are ignored).
HF_DRAFTING_KEYS: tuple[str, ...] = ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                     "assistant_confidence_threshold")


@contextmanager
def hf_constant_drafting(assistant: nn.Module, gamma: int) -> Iterator[None]:
    """Within the block, HF ``generate(assistant_model=assistant)`` drafts exactly ``gamma`` tokens per round.

    Transformers takes its drafting policy from ``assistant.generation_config`` (by default a confidence
    threshold that ends a draft early); this sets a constant ``γ`` and no threshold, the policy of
    :func:`speculative_generate`, and restores the old values afterwards. For comparisons with HF.
    """
    config = assistant.generation_config
    old = {k: getattr(config, k) for k in HF_DRAFTING_KEYS}
    for k, v in zip(HF_DRAFTING_KEYS, (gamma, "constant", 0.0)):
        setattr(config, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(config, k, v)


@dataclass
class SpeculativeOutput:
    """Output of :func:`speculative_generate` for ``B`` prompts (``M = max_new_tokens``).

    Attributes:
        tokens: ``[B, M]`` generated ids (``pad_token_id`` after the end).
        mask: ``[B, M]`` bool, True on the output tokens (the stop token included unless ``include_stop=False``).
        stopped: ``[B]`` bool, a stop token was generated within ``M`` tokens.
        num_tokens: ``[B]`` tokens emitted (stop token included).
        accepted: ``[B]`` drafted tokens that were accepted and kept in the output.
        drafted: ``[B]`` drafted tokens proposed while the row was unfinished.
        verifier_calls, drafter_calls: ``[B]`` forwards of each model while the row was unfinished.
    """

    tokens: Tensor
    mask: Tensor
    stopped: Tensor
    num_tokens: Tensor
    accepted: Tensor
    drafted: Tensor
    verifier_calls: Tensor
    drafter_calls: Tensor

    @property
    def acceptance_rate(self) -> Tensor:
        """``[B]`` accepted / drafted."""
        return self.accepted.float() / self.drafted.clamp(min=1).float()

    @property
    def tokens_per_verifier_call(self) -> Tensor:
        """``[B]`` emitted tokens per verifier forward (accepted drafts + the correction/bonus token)."""
        return self.num_tokens.float() / self.verifier_calls.clamp(min=1).float()


def _new_cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@functools.cache
def _forward_kwargs(model_class: type) -> tuple[str, bool]:
    """Name of the KV-cache argument of ``forward`` (``cache`` in recent transformers, else ``past_key_values``)
    and whether it takes ``logits_to_keep`` (the LM head then runs on the needed columns only)."""
    params = inspect.signature(model_class.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _crop(cache, length: int) -> None:
    """Crop a ``DynamicCache`` to its first ``length`` columns (negative ``crop`` works across versions)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def _forward(model: nn.Module, cache, ids: Tensor, mask: Tensor, start: int, keep: int) -> Tensor:
    """Feed columns ``[start, T)`` (the cache holds ``[0, start)``); float32 logits of the last ``keep`` columns
    ``[B, keep, V]``."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_kwarg, has_keep = _forward_kwargs(type(model))
    kwargs = {cache_kwarg: cache, **({"logits_to_keep": keep} if has_keep else {})}
    out = model(input_ids=ids[:, start:], attention_mask=mask, position_ids=positions[:, start:], use_cache=True,
                **kwargs)
    return out.logits[:, -keep:].float()


def check_generation_inputs(drafter: nn.Module, verifier: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                            max_new_tokens: int, gamma: int, temperature: float) -> None:
    """The bad-input checks of :func:`speculative_generate` (raise ``ValueError``/``TypeError``)."""
    if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
        raise ValueError(f"`gamma` (draft block size) must be an integer >= 1; got {gamma!r}")
    if temperature is None or float(temperature) < 0:
        raise ValueError(f"`temperature` must be >= 0 (0 = greedy); got {temperature}")
    if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"`input_ids` and `attention_mask` must both be [B, L]; got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if input_ids.shape[1] == 0 or bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("every prompt needs at least one token; got an empty (all-padding) prompt")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1; got {max_new_tokens}")
    check_same_vocab(drafter, verifier, names=("drafter", "verifier"))
    for model in (drafter, verifier):
        check_fits_context(model, input_ids.shape[1], max_new_tokens)


@torch.no_grad()
def speculative_generate(
    drafter: nn.Module,
    verifier: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    rule: str = "spec_decode",
    alpha: float | None = None,
    gamma: int = 4,
    temperature: float = 0.0,
    stop_counts: Tensor | Sequence[int] | None = None,
    num_stops: int = 1,
    pad_token_id: int = 0,
    include_stop: bool = True,
    bonus: str = "verifier",
    generator: torch.Generator | None = None,
) -> SpeculativeOutput:
    """Speculative-cascade decoding of a left-padded batch (module docstring).

    Args:
        drafter, verifier: HF causal LMs with one vocabulary (checked up front).
        input_ids: ``[B, L]`` left-padded prompts; ``attention_mask`` ``[B, L]`` 1 on prompt tokens.
        max_new_tokens: budget ``M`` per row (``L + M`` must fit both context windows).
        rule, alpha: a rule of :data:`~lit_cascades.functional.speculative.RULES` and its trade-off.
        gamma: draft block size ``γ >= 1``.
        temperature: ``0`` = greedy (one-hot distributions, deterministic), ``> 0`` = sampling at ``T``.
        stop_counts: ``[V]`` stop events per token or a list of stop ids; ``None`` = no stop token.
        num_stops: stop events that end an output.
        pad_token_id: id written after a row's end.
        include_stop: the stop token is part of ``mask``.
        bonus: ``"verifier"`` or ``"target"`` (module docstring).
        generator: RNG for the drafts, coins and residual draws (default: torch's global RNG).
    """
    alpha = check_rule(rule, alpha)
    if bonus not in BONUS_CHOICES:
        raise ValueError(f"`bonus` must be one of {list(BONUS_CHOICES)}; got {bonus!r}")
    if num_stops < 1:
        raise ValueError(f"`num_stops` must be >= 1; got {num_stops}")
    check_generation_inputs(drafter, verifier, input_ids, attention_mask, max_new_tokens, gamma, temperature)
    temperature = float(temperature)
    device = input_ids.device
    b = input_ids.shape[0]
    counts = (as_stop_counts(stop_counts, model_vocab_size(verifier)).to(device) if stop_counts is not None
              else torch.zeros(model_vocab_size(verifier), device=device))
    m = max_new_tokens
    ids, mask = input_ids.clone(), attention_mask.long().clone()
    d_cache, v_cache = _new_cache(drafter), _new_cache(verifier)
    d_len = v_len = 0
    buffer = torch.full((b, m + gamma + 1), pad_token_id, dtype=torch.long, device=device)
    n_out = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stopped = torch.zeros_like(done)
    stats = {k: torch.zeros(b, dtype=torch.long, device=device)
             for k in ("accepted", "drafted", "verifier_calls", "drafter_calls")}
    rows = torch.arange(b, device=device)

    def dists(logits: Tensor) -> tuple[Tensor, Tensor]:
        return torch.softmax(logits, -1), scaled_probs(logits, temperature)

    def sample(probs: Tensor) -> Tensor:
        if temperature == 0:  # one-hot: the argmax is the draw (and costs no RNG call)
            return probs.argmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    while not bool(done.all()):
        active = ~done
        g = int(min(gamma, int((m - n_out[active]).max())))
        start = ids.shape[1]
        drafts, q_raw, q = [], [], []
        for j in range(g + (bonus == "target")):
            logits = _forward(drafter, d_cache, ids, mask, d_len, keep=1)[:, -1]
            d_len = ids.shape[1]
            stats["drafter_calls"] += active.long()
            raw, scaled = dists(logits)
            q_raw.append(raw)
            q.append(scaled)
            if j == g:  # q_{γ+1} for the bonus token only
                break
            x = sample(scaled)
            drafts.append(x)
            keep = active & (n_out + j < m)
            ids = torch.cat([ids, x[:, None]], 1)
            mask = torch.cat([mask, keep.long()[:, None]], 1)
        draft = torch.stack(drafts, 1)  # [B, g]
        v_logits = _forward(verifier, v_cache, ids, mask, v_len, keep=g + 1)
        v_len = ids.shape[1]
        stats["verifier_calls"] += active.long()
        stats["drafted"] += active.long() * g
        p_raw, p = dists(v_logits)
        q_raw_t, q_t = torch.stack(q_raw[:g], 1), torch.stack(q[:g], 1)
        accept, residual, _ = rule_acceptance(rule, draft, q_t, p[:, :g], alpha, q_raw_t, p_raw[:, :g])
        if bonus == "target":
            bonus_dist = target_distribution(rule, q[g], p[:, g], alpha, q_raw[g], p_raw[:, g])
        else:
            bonus_dist = p[:, g]
        n, nxt = verify_block(draft, accept, residual, bonus_dist, generator=generator)

        # emitted block: n accepted drafts, then the correction/bonus token
        block = torch.cat([draft, torch.zeros_like(nxt)[:, None]], 1)
        block[rows, n] = nxt
        j = torch.arange(g + 1, device=device)
        write = active[:, None] & (j[None] <= n[:, None])
        pos = (n_out[:, None] + j[None]).clamp(max=buffer.shape[1] - 1)
        buffer[rows[:, None].expand_as(pos)[write], pos[write]] = block[write]
        old = n_out.clone()
        n_out = torch.where(active, n_out + n + 1, n_out)
        # stop inside the new tokens: cut after the token that reaches num_stops
        col = torch.arange(buffer.shape[1], device=device)
        cum = (counts[buffer] * (col[None] < n_out[:, None])).cumsum(-1)
        hit = cum >= num_stops
        first = torch.where(hit.any(-1), hit.float().argmax(-1) + 1, n_out)
        newly_stopped = active & hit.any(-1)
        stopped |= newly_stopped
        n_out = torch.minimum(torch.where(newly_stopped, first, n_out), torch.full_like(n_out, m))
        stats["accepted"] += torch.where(active, torch.minimum(n, n_out - old), 0)

        # roll back: crop both caches to the longest accepted prefix; shorter rows keep masked holes
        keep_cols = int(n[active].max())
        ids, mask = ids[:, :start + keep_cols], mask[:, :start + keep_cols]
        mask[:, start:] *= (torch.arange(keep_cols, device=device)[None] < n[:, None]).long()
        d_len = min(d_len, start + keep_cols)
        v_len = start + keep_cols
        _crop(d_cache, d_len)
        _crop(v_cache, v_len)
        done = done | stopped | (n_out >= m)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)

    col = torch.arange(m, device=device)
    out_mask = col[None] < n_out[:, None]
    tokens = buffer[:, :m].masked_fill(~out_mask, pad_token_id)
    if not include_stop:
        is_last = col[None] == (n_out - 1)[:, None]
        out_mask = out_mask & ~(is_last & stopped[:, None])
    return SpeculativeOutput(tokens=tokens, mask=out_mask, stopped=stopped, num_tokens=n_out, **stats)
