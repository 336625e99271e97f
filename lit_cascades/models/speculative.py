"""Batched speculative-cascade decoding with a drafter and a verifier causal LM (Hugging Face or a minimal protocol).

Reference: Narasimhan et al., "Faster Cascades via Speculative Decoding", ICLR 2025 (arXiv:2405.19261); the
accept/reject rules live in :mod:`lit_cascades.functional.speculative`. One round, for a left-padded batch:

1. **draft**: the drafter samples ``γ`` tokens autoregressively from its (processed) distribution ``q``;
2. **verify**: one verifier forward over the pending tokens and the ``γ`` drafts gives ``p_1 … p_{γ+1}``;
3. **accept**: each row keeps its longest accepted prefix ``n_b`` (:func:`~lit_cascades.functional.speculative.
   verify_block`) and emits one more token: the residual draw at the first rejection, or a *bonus* token after
   ``γ`` acceptances;
4. **compact**: rows that accepted fewer drafts than the batch's longest prefix are shifted right, in the ids,
   the mask and both KV caches (one gather per layer), so that every row stays *left-padded without holes*:
   a row's columns after its first real token are all real tokens. Leading columns that are padding in every
   row are dropped, and finished rows leave the batch. The KV cache therefore holds ``max_b (real tokens of
   row b)`` columns (plus the left padding of shorter prompts, as in HF ``generate``), and a *sliding-window*
   mask, which HF models compute over cache columns, sees exactly the row's last ``W`` tokens, so
   sliding-window models (Mistral, Qwen2 with ``use_sliding_window``) decode exactly, batched. With ``B = 1``
   the compaction is the usual crop.

**Caches.** Both models run on a :class:`transformers.DynamicCache` of plain full-attention layers built here
(sliding-window layers too: the window is applied by the model's attention mask, the cache keeps every column so
that it can be rolled back). Models whose layers need another cache type (linear attention / state-space
layers, chunked or indexed attention, KV sharing) are rejected before decoding with an error naming the type.

**Vocabularies.** The two models must share a tokenizer; their output layers may be padded to different sizes
(e.g. 151,936 vs 152,064 rows for Qwen2.5 0.5B / 7B). Pass ``vocab_size=len(tokenizer)``: both output sizes must
cover it (the check that stands in for "same tokenizer"; ``SpeculativeCascade`` passes it from its tokenizer).
When the sizes differ, both distributions are compared on the tokenizer's vocabulary: the logits are sliced to
the first ``vocab_size`` rows (the padding rows are not tokens; a padding id emitted by one model could not even
be embedded by the other). ``spec_decode`` is then exactly the verifier's decoding restricted to real tokens
(HF ``generate`` with ``suppress_tokens`` = the padding rows; identical to plain HF ``generate`` unless the
verifier would emit a padding id). Equal sizes are never sliced.

**Generation controls** (as HF assisted generation applies them, ``transformers.generation.utils.
_assisted_decoding``): the logits processors are those HF ``generate`` builds from the verifier's
``generation_config``, updated with the ``generation_config`` argument and ``generation_kwargs`` (repetition
penalty, top-k, top-p, min-p, temperature, no-repeat n-grams, bad words, min new tokens, ...), plus any
``logits_processor``. They are applied to the verifier's logits at each verified position and to the drafter's
at each drafted position, with the same token history HF gives them (the prompt as passed, left padding
included, then the row's generated tokens). ``q`` and ``p`` are the softmax of the processed logits (one-hot
argmax in greedy mode). The rules' *decisions* (``chow``, ``diff``, ``opt``, ``token_v*``) use the models' raw
temperature-1 distributions, as in the paper's colab. The ``temperature`` argument keeps its meaning (0 =
greedy, > 0 = sampling at that temperature, overriding the config's ``do_sample``/``temperature``);
``temperature=None`` uses the config's. Note that HF's global default ``top_k=50`` applies when sampling unless
the config or ``generation_kwargs`` say otherwise (``top_k=0`` turns it off).

**Bonus token** (after a fully accepted block): ``bonus="verifier"`` draws it from the verifier's ``p_{γ+1}`` as
speculative decoding and HF do, at no extra cost; ``bonus="target"`` draws it from the rule's ``π_{γ+1}``, which
needs the drafter's ``q_{γ+1}`` (one more drafter forward per round). ``bonus=None`` (default) is ``"target"`` for
``drafter_only`` (so that it reproduces the drafter) and ``"verifier"`` otherwise.

**Draft length.** ``gamma_schedule="constant"`` drafts ``γ`` tokens per round; ``"heuristic"`` is HF's
(``num_assistant_tokens_schedule="heuristic"``): ``γ += 2`` after a round in which every active row accepted all
its drafts, else ``γ = max(1, γ − 1)``. At most ``remaining − 1`` tokens are drafted (HF's cap), so at batch 1
the rounds are HF's.

**Plain ``nn.Module`` drafter** (minimal protocol): any module called as ``model(input_ids=[B, T],
attention_mask=[B, T], position_ids=[B, T])`` that returns logits ``[B, T, V]`` (a tensor, or an object with
``.logits``). It gets no KV cache: every drafter forward recomputes the whole sequence. The verifier must be a
Hugging Face causal LM (``transformers.GenerationMixin``).

**Feature drafter** (EAGLE, :mod:`lit_cascades.models.feature_drafter`): a drafter with
``uses_verifier_features = True`` gets, with each column it is fed, the verifier's last hidden state of the column
before (zeros after padding); the verifier first runs on the prompt minus its last token (one more verifier call)
so that the drafter always has the prefix's real features; draft columns carry the drafter's own predicted
feature; after a verification the drafter's cache is cut back to the round's first draft column and the accepted
drafts are re-fed with the verifier's features.

Statistics per row: ``accepted`` drafts kept in the output, ``drafted`` tokens proposed, ``deferred`` emitted
tokens at which the rule's target put weight on the verifier (:func:`~lit_cascades.functional.speculative.
defers`), ``verifier_calls`` and ``drafter_calls`` (forwards while the row was unfinished), ``num_tokens``
emitted; ``output_logprobs=True`` adds the raw log-probabilities of the emitted tokens under both models.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_cascades.functional.speculative import (
    BONUS_CHOICES,
    check_rule,
    defers,
    rule_acceptance,
    scaled_probs,
    target_distribution,
    verify_block,
)
from lit_cascades.models.feature_drafter import (
    capture_head_input,
    hidden_size,
    shift_features,
    uses_verifier_features,
)
from lit_cascades.models.generation import as_stop_counts, position_ids_from_mask
from lit_cascades.models.lm_pair import context_length, model_vocab_size

#: Settings of transformers' assisted generation that it reads from the *assistant's* ``generation_config``
#: (the same names passed to ``generate()`` are ignored).
HF_DRAFTING_KEYS: tuple[str, ...] = ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                     "assistant_confidence_threshold")
GAMMA_SCHEDULES: tuple[str, ...] = ("constant", "heuristic")
#: cache layer types that a cache of full layers reproduces exactly (the window is in the attention mask).
SUPPORTED_LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")
#: HF logits processors that read only the scores (not the token history): one batched call suffices.
_HISTORY_FREE = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
                 "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "InfNanRemoveLogitsProcessor")


@contextmanager
def hf_constant_drafting(assistant: nn.Module, gamma: int, schedule: str = "constant") -> Iterator[None]:
    """Within the block, HF ``generate(assistant_model=assistant)`` drafts ``gamma`` tokens per round (``schedule=
    "heuristic"``: starting from ``gamma``, HF's adaptive schedule) and no confidence threshold.

    Transformers takes its drafting policy from ``assistant.generation_config`` (by default a confidence
    threshold that ends a draft early); this sets the policy of :func:`speculative_generate` and restores the old
    values afterwards. For comparisons with HF.
    """
    config = assistant.generation_config
    old = {k: getattr(config, k) for k in HF_DRAFTING_KEYS}
    for k, v in zip(HF_DRAFTING_KEYS, (gamma, schedule, 0.0)):
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
        deferred: ``[B]`` emitted tokens at which the rule's target ``π`` put weight on the verifier's ``p``
            (the rule's deferral decision; ``spec_decode``: all, ``drafter_only``: none); with
            ``bonus="verifier"`` a bonus token, drawn from ``p``, counts as deferred. ``deferred /
            num_tokens`` is the deferral rate; ``1 − accepted / drafted`` is the rejection rate.
        logprobs, drafter_logprobs: ``[B, M]`` float32 log-probabilities of ``tokens`` under the verifier's and
            the drafter's raw (unprocessed, temperature-1) distributions, 0 where ``tokens`` is padding
            (``output_logprobs=True``; else ``None``).
        gammas: the draft length of each round (``gamma_schedule="heuristic"`` changes it).
        cache_columns: the most columns the verifier's KV cache kept for the unfinished rows after a round's
            rollback (the drafts of a round add up to ``γ`` columns while it runs).
        draft_reached, draft_accepted: ``[B, M]`` per draft position ``k`` (column ``k − 1``): the rounds in
            which the ``k``-th draft was verified with the ``k − 1`` drafts before it accepted, and those in which
            it was accepted too; drafts after a stop or past the budget count in neither. ``draft_accepted.sum(-1)
            == accepted``; pooled over rows, ``draft_accepted / draft_reached`` at column ``k − 1`` is the
            acceptance of draft step ``k`` given that the round reached it (:attr:`draft_acceptance`).
    """

    tokens: Tensor
    mask: Tensor
    stopped: Tensor
    num_tokens: Tensor
    accepted: Tensor
    drafted: Tensor
    verifier_calls: Tensor
    drafter_calls: Tensor
    deferred: Tensor | None = None
    logprobs: Tensor | None = None
    drafter_logprobs: Tensor | None = None
    gammas: list[int] = field(default_factory=list)
    cache_columns: int = 0
    draft_reached: Tensor | None = None
    draft_accepted: Tensor | None = None

    @property
    def draft_acceptance(self) -> Tensor:
        """``[M]`` pooled over rows: acceptance of draft step ``k`` (column ``k − 1``) in the rounds that reached
        it; NaN where no round did."""
        if self.draft_reached is None or self.draft_accepted is None:
            raise AttributeError("this output has no per-position draft counts")
        reached = self.draft_reached.sum(0).float()
        return torch.where(reached > 0, self.draft_accepted.sum(0).float() / reached.clamp(min=1), float("nan"))

    @property
    def acceptance_rate(self) -> Tensor:
        """``[B]`` accepted / drafted."""
        return self.accepted.float() / self.drafted.clamp(min=1).float()

    @property
    def deferral_rate(self) -> Tensor:
        """``[B]`` deferred / emitted tokens (the rule's decision, not the rejection rate)."""
        if self.deferred is None:
            raise AttributeError("this output has no `deferred` counts")
        return self.deferred.float() / self.num_tokens.clamp(min=1).float()

    @property
    def tokens_per_verifier_call(self) -> Tensor:
        """``[B]`` emitted tokens per verifier forward (accepted drafts + the correction/bonus token)."""
        return self.num_tokens.float() / self.verifier_calls.clamp(min=1).float()


# ----------------------------------------------------------------------------------------------------------------
# models and caches


def is_hf_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model with ``generate`` and a ``config`` (what gets a KV cache here)."""
    return hasattr(model, "config") and hasattr(model, "generate") and hasattr(model, "get_output_embeddings")


def _layer_types(config: Any, model: nn.Module) -> list[str]:
    """Cache layer types of a decoder config (transformers' own reading where it has one, else the config's fields).

    Older transformers releases (before ``cache_utils.get_layer_types_and_kwargs``) describe layers only through
    ``layer_types`` or the ``sliding_window`` / ``attention_chunk_size`` fields, which this reads the same way.
    """
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        if getattr(model, "_is_stateful", False):  # Mamba-style models keep a recurrent state, not a KV cache
            return ["recurrent"] * int(getattr(config, "num_hidden_layers", 1))
        types = getattr(config, "layer_types", None)
        if types is not None:
            return list(types)
        kind = ("sliding_attention" if getattr(config, "sliding_window", None) is not None
                else "chunked_attention" if getattr(config, "attention_chunk_size", None) is not None
                else "full_attention")
        return [kind] * int(config.num_hidden_layers)
    return list(get_layer_types_and_kwargs(config)[0])


def check_cache_support(model: nn.Module, name: str) -> None:
    """Raise ``ValueError`` (before any decoding) if ``model`` needs a cache type this module cannot roll back."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"the {name} is an encoder-decoder model ({type(model).__name__}); speculative decoding "
                         "here needs decoder-only causal LMs")
    try:
        layer_types = _layer_types(config, model)
    except Exception as err:  # a config this transformers version cannot describe
        raise ValueError(f"cannot tell the cache layer types of the {name} ({type(model).__name__}): {err}") from err
    bad = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
    if bad:
        raise ValueError(f"the {name} ({type(model).__name__}) has cache layers of type {bad}; speculative decoding "
                         f"here supports {list(SUPPORTED_LAYER_TYPES)} layers only (it rolls back and realigns "
                         "per-row KV caches, which recurrent, chunked, indexed or shared layers do not allow)")


@functools.cache
def _forward_kwargs(model_class: type) -> tuple[str, bool]:
    """Name of the KV-cache argument of ``forward`` (``cache`` in recent transformers, else ``past_key_values``)
    and whether it takes ``logits_to_keep`` (the LM head then runs on the needed columns only)."""
    params = inspect.signature(model_class.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


class _Runner:
    """One model's forward state during decoding: its KV cache (HF models) and how many columns it holds."""

    def __init__(self, model: nn.Module, vocab: int, max_position: int | None) -> None:
        self.model, self.vocab, self.max_position = model, vocab, max_position
        self.cached = is_hf_causal_lm(model) or uses_verifier_features(model)
        self.cache_kwarg, self.has_keep = _forward_kwargs(type(model)) if self.cached else ("", False)
        self.length = 0
        self.cache = None
        if self.cached:
            from transformers import DynamicCache

            self.cache = DynamicCache()  # lazily initialised full layers (sliding windows live in the mask)

    def positions(self, mask: Tensor) -> Tensor:
        """Position ids of a left-padded ``mask`` ``[B, T]``, within the model's context."""
        positions = position_ids_from_mask(mask)
        if self.max_position is not None:  # draft columns past a row's budget: never kept, keep them in range
            positions = positions.clamp(max=self.max_position - 1)
        return positions

    def forward(self, ids: Tensor, mask: Tensor, keep: int, features: Tensor | None = None,
                hidden: bool = False) -> Any:
        """Feed the columns the cache lacks; float32 logits ``[B, keep, V_union]`` of the last ``keep`` columns.

        ``features`` ``[B, T, d]`` (a feature drafter): the verifier's features aligned with ``ids``; the model gets
        each fed column's predecessor's (:func:`~lit_cascades.models.feature_drafter.shift_features`).
        ``hidden=True`` also returns last hidden states: a verifier's of the ``keep`` columns its LM head reads
        (``[B, keep, d]``), a feature drafter's predicted ones of every fed column.
        """
        positions = self.positions(mask)
        if self.cached:
            start = self.length
            kwargs = {self.cache_kwarg: self.cache, **({"logits_to_keep": keep} if self.has_keep else {})}
            if features is not None:
                kwargs["features"] = shift_features(features)[:, start:]
            with capture_head_input(self.model) if hidden and features is None else nullcontext() as store:
                out = self.model(input_ids=ids[:, start:], attention_mask=mask, position_ids=positions[:, start:],
                                 use_cache=True, **kwargs)
            self.length = ids.shape[1]
        else:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        logits = out if isinstance(out, Tensor) else out.logits
        logits = logits[:, -keep:, :self.vocab].float()  # rows past the tokenizer's vocabulary: not tokens
        if logits.shape[-1] < self.vocab:  # (defensive) rows this model lacks: probability 0
            logits = torch.nn.functional.pad(logits, (0, self.vocab - logits.shape[-1]), value=-float("inf"))
        if not hidden:
            return logits
        return logits, (out.hidden_states[-1] if features is not None else store[-1])  # [B, keep, d]

    def prefill(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Feed ``ids`` through the decoder only (no LM head); its last hidden states ``[B, T, d]``."""
        base = self.model.base_model
        cache_kwarg, _ = _forward_kwargs(type(base))
        start = self.length
        out = base(input_ids=ids[:, start:], attention_mask=mask, position_ids=self.positions(mask)[:, start:],
                   use_cache=True, **{cache_kwarg: self.cache})
        self.length = ids.shape[1]
        return out.last_hidden_state

    def realign(self, rows: Tensor, index: Tensor, length: int) -> None:
        """Keep batch ``rows`` and, per row, cache columns ``index[:, :length]`` (``[B', ≥ length]`` old columns)."""
        if not self.cached:
            return
        length = min(length, self.length)
        idx = index[:, :length]
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            for attr in ("keys", "values"):
                t = getattr(layer, attr)[rows]
                g = idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
                setattr(layer, attr, t.gather(2, g))
        self.length = length

    def crop(self, length: int) -> None:
        """Keep the first ``length`` cache columns of every row."""
        if self.cached and self.length > length:
            self.cache.crop(length - self.length)
            self.length = length


# ----------------------------------------------------------------------------------------------------------------
# generation controls


def build_logits_processor(verifier: nn.Module, input_ids: Tensor, temperature: float | None = 0.0,
                           generation_config: Any = None, logits_processor: Any = None,
                           **generation_kwargs: Any) -> tuple[Any, Any]:
    """The ``(generation_config, LogitsProcessorList)`` HF ``generate`` would use for the verifier on ``input_ids``.

    ``generation_config``/``generation_kwargs`` update the verifier's own ``generation_config`` (HF's rules);
    ``temperature`` (if not ``None``) then sets ``do_sample = temperature > 0`` and the temperature.
    """
    from transformers import LogitsProcessorList

    if temperature is not None:
        generation_kwargs = {**generation_kwargs, "do_sample": temperature > 0,
                             **({"temperature": float(temperature)} if temperature > 0 else {})}
    config, unused = verifier._prepare_generation_config(generation_config, **generation_kwargs)
    if unused:
        raise TypeError(f"unknown generation settings {sorted(unused)} (not fields of transformers.GenerationConfig)")
    if config.num_beams not in (None, 1):
        raise ValueError(f"speculative decoding samples or decodes greedily; got num_beams={config.num_beams}")
    verifier._prepare_special_tokens(config, True, device=input_ids.device)
    processors = verifier._get_logits_processor(
        generation_config=config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        logits_processor=LogitsProcessorList(logits_processor or []), device=input_ids.device, model_kwargs={})
    return config, processors


def _apply_processors(processors: Any, logits: Tensor, prompts: Tensor, outputs: Tensor, n_out: Tensor,
                      block: Tensor, offset: int = 0) -> Tensor:
    """Processed logits ``[B, K, V]``; position ``j`` of row ``b`` has the history ``prompts[b] +
    outputs[b, :n_out[b]] + block[b, :offset + j]`` (grouped by length so every call is rectangular, as in HF)."""
    if not processors:
        return logits
    b, k, v = logits.shape
    if all(type(p).__name__ in _HISTORY_FREE for p in processors):
        dummy = torch.zeros(b * k, 1, dtype=torch.long, device=logits.device)
        return processors(dummy, logits.reshape(b * k, v)).reshape(b, k, v)
    out = torch.empty_like(logits)
    for n in n_out.unique().tolist():
        sel = (n_out == n).nonzero().squeeze(-1)
        base = torch.cat([prompts[sel], outputs[sel, :n]], 1)
        for j in range(k):
            hist = torch.cat([base, block[sel, :offset + j]], 1)
            out[sel, j] = processors(hist, logits[sel, j].clone())
    return out


def eos_ids(model: nn.Module) -> list[int]:
    """The model's end-of-sequence ids (``generation_config.eos_token_id``, else ``config.eos_token_id``)."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return []


# ----------------------------------------------------------------------------------------------------------------
# checks


def check_vocabularies(drafter: nn.Module, verifier: nn.Module, vocab_size: int | None,
                       drafter_vocab: int | None = None) -> int:
    """The size ``V`` of the compared distributions: the verifier's output size when both sizes agree, else
    ``vocab_size`` (the shared tokenizer's size, which both must then cover; ``ValueError`` if missing)."""
    v_ver = model_vocab_size(verifier)
    v_dra = drafter_vocab if drafter_vocab is not None else model_vocab_size(drafter)
    if v_ver == v_dra:
        return v_ver
    if vocab_size is not None:
        if min(v_ver, v_dra) < vocab_size:
            raise ValueError(f"the drafter's output layer has {v_dra} rows and the verifier's {v_ver}; both must cover "
                             f"the tokenizer's vocabulary of {vocab_size} tokens")
    elif v_ver != v_dra:
        raise ValueError(f"the drafter's output layer has {v_dra} rows and the verifier's {v_ver} (different "
                         "vocabulary sizes): give vocab_size=len(tokenizer) if the two share a tokenizer and only "
                         "pad their output layers differently (SpeculativeCascade does this from its tokenizer)")
    return int(vocab_size)  # type: ignore[arg-type]


def _drafter_vocab(drafter: nn.Module, ids: Tensor, mask: Tensor) -> int:
    if is_hf_causal_lm(drafter) or uses_verifier_features(drafter):
        return model_vocab_size(drafter)
    try:
        out = drafter(input_ids=ids[:1, -1:], attention_mask=mask[:1, -1:], position_ids=torch.zeros_like(ids[:1, -1:]))
    except Exception as err:  # explain the protocol instead of a deep traceback
        raise TypeError(f"the drafter ({type(drafter).__name__}) is not a Hugging Face causal LM, so it must follow "
                        "the minimal protocol model(input_ids=[B, T], attention_mask=[B, T], position_ids=[B, T]) -> "
                        f"logits [B, T, V] (or an object with .logits); calling it failed: {err!r}") from err
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, Tensor) or logits.ndim != 3 or logits.shape[:2] != (1, 1):
        raise TypeError(f"the drafter ({type(drafter).__name__}) must return logits [B, T, V] (or an object with "
                        f".logits) for input_ids [B, T]; got {type(out).__name__}"
                        + (f" of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else ""))
    return int(logits.shape[-1])


def check_generation_inputs(drafter: nn.Module, verifier: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                            max_new_tokens: int, gamma: int, temperature: float | None,
                            vocab_size: int | None = None) -> int:
    """The bad-input checks of :func:`speculative_generate` (raise ``ValueError``/``TypeError``); returns the
    size of the compared distributions (:func:`check_vocabularies`)."""
    if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
        raise ValueError(f"`gamma` (draft block size) must be an integer >= 1; got {gamma!r}")
    if temperature is not None and float(temperature) < 0:
        raise ValueError(f"`temperature` must be >= 0 (0 = greedy) or None (the verifier's config); got {temperature}")
    if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"`input_ids` and `attention_mask` must both be [B, L]; got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if input_ids.shape[1] == 0 or bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("every prompt needs at least one token; got an empty (all-padding) prompt")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("prompts must be left-padded (attention_mask 0...0 1...1 per row); got padding after a token")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1; got {max_new_tokens}")
    if not is_hf_causal_lm(verifier):
        raise TypeError(f"the verifier must be a Hugging Face causal LM (transformers GenerationMixin with a config); "
                        f"got {type(verifier).__name__}")
    check_cache_support(verifier, "verifier")
    if is_hf_causal_lm(drafter) or uses_verifier_features(drafter):
        check_cache_support(drafter, "drafter")
    if uses_verifier_features(drafter) and drafter.feature_size != hidden_size(verifier):
        raise ValueError(f"the feature drafter reads hidden states of width {drafter.feature_size}; the verifier's are "
                         f"{hidden_size(verifier)} wide (was the drafter trained on another verifier?)")
    vocab = check_vocabularies(drafter, verifier, vocab_size, _drafter_vocab(drafter, input_ids, attention_mask))
    for model, name in ((drafter, "drafter"), (verifier, "verifier")):
        ctx = context_length(model) if hasattr(model, "config") else None
        if ctx is not None and input_ids.shape[1] + max_new_tokens > ctx:
            raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = "
                             f"{input_ids.shape[1] + max_new_tokens} exceeds the {name}'s context window of {ctx} "
                             "tokens; shorten the prompts (context_tokens) or max_new_tokens")
    return vocab


# ----------------------------------------------------------------------------------------------------------------
# decoding


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
    temperature: float | None = 0.0,
    stop_counts: Tensor | Sequence[int] | None = None,
    num_stops: int = 1,
    pad_token_id: int = 0,
    include_stop: bool = True,
    bonus: str | None = None,
    generator: torch.Generator | None = None,
    generation_config: Any = None,
    logits_processor: Any = None,
    generation_kwargs: dict[str, Any] | None = None,
    gamma_schedule: str = "constant",
    vocab_size: int | None = None,
    output_logprobs: bool = False,
) -> SpeculativeOutput:
    """Speculative-cascade decoding of a left-padded batch (module docstring).

    Args:
        drafter, verifier: causal LMs sharing a tokenizer (the drafter may follow the minimal protocol).
        input_ids: ``[B, L]`` left-padded prompts; ``attention_mask`` ``[B, L]`` 1 on prompt tokens.
        max_new_tokens: budget ``M`` per row (``L + M`` must fit both context windows).
        rule, alpha: a rule of :data:`~lit_cascades.functional.speculative.RULES` and its trade-off.
        gamma: (initial) draft block size ``γ >= 1``.
        temperature: ``0`` = greedy (deterministic), ``> 0`` = sampling at ``T``, ``None`` = the verifier's
            ``generation_config`` decides (``do_sample``, ``temperature``).
        stop_counts: ``[V]`` stop events per token or a list of stop ids; ``None`` = the verifier's EOS ids;
            ``[]`` = no stop token.
        num_stops: stop events that end an output.
        pad_token_id: id written after a row's end.
        include_stop: the stop token is part of ``mask``.
        bonus: ``"verifier"``, ``"target"`` or ``None`` (``"target"`` for ``drafter_only``, else ``"verifier"``).
        generator: RNG for the drafts, coins and residual draws (default: torch's global RNG).
        generation_config, generation_kwargs: update the verifier's ``generation_config`` (top_k, top_p, min_p,
            repetition_penalty, ...), as in HF ``generate``; ``logits_processor``: extra HF logits processors.
        gamma_schedule: ``"constant"`` or ``"heuristic"`` (HF's adaptive draft length).
        vocab_size: the shared tokenizer's size; needed when the output layers differ in size.
        output_logprobs: also return the emitted tokens' log-probabilities under both models.
    """
    alpha = check_rule(rule, alpha)
    if bonus is None:
        bonus = "target" if rule == "drafter_only" else "verifier"
    if bonus not in BONUS_CHOICES:
        raise ValueError(f"`bonus` must be one of {list(BONUS_CHOICES)} or None; got {bonus!r}")
    if gamma_schedule not in GAMMA_SCHEDULES:
        raise ValueError(f"`gamma_schedule` must be one of {list(GAMMA_SCHEDULES)}; got {gamma_schedule!r}")
    if num_stops < 1:
        raise ValueError(f"`num_stops` must be >= 1; got {num_stops}")
    vocab = check_generation_inputs(drafter, verifier, input_ids, attention_mask, max_new_tokens, gamma, temperature,
                                    vocab_size)
    config, processors = build_logits_processor(verifier, input_ids, temperature, generation_config,
                                                logits_processor, **(generation_kwargs or {}))
    greedy = not config.do_sample
    # greedy exact speculative decoding needs no distributions: argmax comparisons give the same tokens (and draw
    # no random numbers); every other rule or temperature goes through the accept/reject step
    fast = greedy and rule == "spec_decode" and bonus == "verifier"
    device = input_ids.device
    b_all, m = input_ids.shape[0], max_new_tokens
    if stop_counts is None:
        stop_counts = eos_ids(verifier)
    no_stop = not isinstance(stop_counts, Tensor) and len(stop_counts) == 0
    counts = (torch.zeros(vocab, device=device) if no_stop else as_stop_counts(stop_counts, vocab).to(device))
    if counts.shape[0] < vocab:
        counts = torch.nn.functional.pad(counts, (0, vocab - counts.shape[0]))

    prompts = input_ids
    width = 2 * m + 1  # a round writes at most γ + 1 <= m tokens from n_out < m
    buffer = torch.full((b_all, width), pad_token_id, dtype=torch.long, device=device)
    lp_v = torch.zeros(b_all, width, device=device)
    lp_d = torch.zeros(b_all, width, device=device)
    n_out = torch.zeros(b_all, dtype=torch.long, device=device)
    stopped = torch.zeros(b_all, dtype=torch.bool, device=device)
    stats = {k: torch.zeros(b_all, dtype=torch.long, device=device)
             for k in ("accepted", "drafted", "verifier_calls", "drafter_calls", "deferred")}
    pending = torch.zeros(b_all, dtype=torch.long, device=device)  # trailing tokens lacking a drafter log-prob
    reached = torch.zeros(b_all, m, dtype=torch.long, device=device)  # per draft position (draft_reached)
    accepted_at = torch.zeros(b_all, m, dtype=torch.long, device=device)

    d_run = _Runner(drafter, vocab, context_length(drafter) if hasattr(drafter, "config") else None)
    v_run = _Runner(verifier, vocab, context_length(verifier))
    rows = torch.arange(b_all, device=device)  # original index of each working row
    ids, mask = input_ids.clone(), attention_mask.long().clone()
    # drop leading columns that are padding in every row
    lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
    ids, mask = ids[:, lead:], mask[:, lead:]
    # feature drafter (EAGLE): the verifier's last hidden state of every column it has verified, the drafter's own
    # prediction on draft columns; the verifier first runs on the prompt minus its last token, so that every round
    # starts with exactly one column it has not seen and the drafter always reads real features of the prefix
    feats = None
    if uses_verifier_features(drafter):
        feats = ids.new_zeros(*ids.shape, drafter.feature_size, dtype=torch.float32)
        if ids.shape[1] > 1:
            # padding columns get zeros, as the column before a first token does
            feats[:, :-1] = v_run.prefill(ids[:, :-1], mask[:, :-1]).float() * mask[:, :-1, None]
            stats["verifier_calls"][rows] += 1
    g_cur = gamma
    gammas: list[int] = []
    peak = 0

    def probs(processed: Tensor) -> Tensor:
        return scaled_probs(processed, 0.0 if greedy else 1.0)

    def sample(p: Tensor) -> Tensor:
        if greedy:  # one-hot: the argmax is the draw (and costs no RNG call)
            return p.argmax(-1)
        return torch.multinomial(p, 1, generator=generator).squeeze(-1)

    def fill_pending(logits: Tensor, last_col: int) -> None:
        """Drafter log-probs of pending tokens: ``logits [B', K, V]`` end at column ``last_col − 1`` (they score
        columns up to ``last_col``); a row's pending tokens are its last ones before column ``last_col + 1``."""
        nonlocal pending
        need = pending[rows]
        if not output_logprobs or not bool((need > 0).any()):
            return
        logp = torch.log_softmax(logits, -1)
        k = logits.shape[1]
        for i in (need > 0).nonzero().squeeze(-1).tolist():
            r, c = int(rows[i]), int(need[i])
            toks = ids[i, last_col + 1 - c: last_col + 1]
            lp = logp[i, k - c:].gather(-1, toks[:, None]).squeeze(-1)
            lp_d[r, int(n_out[r]) - c: int(n_out[r])] = lp
        pending[rows] = 0

    while rows.numel() > 0:
        b = rows.numel()
        rem = m - n_out[rows]
        g = int(min(g_cur, int(rem.max()) - 1))
        gammas.append(g)
        start = ids.shape[1]
        outs = buffer[rows]
        drafts, q_raw, q, q_logp = [], [], [], []
        for j in range(g + (bonus == "target")):
            # logits of the last column only (the LM head is most of a small drafter's cost), except when pending
            # tokens still need their drafter log-probs
            keep = ids.shape[1] - d_run.length if j == 0 and bool((pending[rows] > 0).any()) else 1
            if feats is None:
                logits = d_run.forward(ids, mask, keep)
            else:
                logits, h = d_run.forward(ids, mask, keep, features=feats, hidden=True)
                feats[:, -1] = h[:, -1].float()  # the last column's feature: predicted until the verifier has seen it
            stats["drafter_calls"][rows] += 1
            if j == 0:
                fill_pending(logits[:, :-1], ids.shape[1] - 1)
            logits = logits[:, -1]
            so_far = torch.stack(drafts, 1) if drafts else ids.new_zeros(b, 0)
            processed = _apply_processors(processors, logits[:, None], prompts[rows], outs, n_out[rows], so_far,
                                          offset=j)[:, 0]
            if not fast:
                q_raw.append(torch.softmax(logits, -1))
                q.append(probs(processed))
            if output_logprobs:
                q_logp.append(torch.log_softmax(logits, -1))
            if j == g:  # q_{γ+1}: the bonus token's distribution only
                break
            x = processed.argmax(-1) if fast else sample(q[-1])
            drafts.append(x)
            ids = torch.cat([ids, x[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(x)[:, None]], 1)
            if feats is not None:
                feats = torch.cat([feats, feats.new_zeros(b, 1, feats.shape[2])], 1)
        draft = torch.stack(drafts, 1) if drafts else ids.new_zeros(b, 0)
        if feats is None:
            v_logits = v_run.forward(ids, mask, g + 1)  # the block's g + 1 columns (not the prompt's, in round 1)
        else:
            # the verifier lacks exactly the pending column, so its g + 1 logit columns are all the fed columns
            v_logits, h = v_run.forward(ids, mask, g + 1, hidden=True)
            feats[:, -(g + 1):] = h.float()  # real features replace the drafter's predictions
        stats["verifier_calls"][rows] += 1
        stats["drafted"][rows] += g
        v_processed = _apply_processors(processors, v_logits, prompts[rows], outs, n_out[rows], draft)
        if fast:  # one-hot q and p: a draft is accepted iff it is the verifier's argmax, which is also the next token
            v_arg = v_processed.argmax(-1)  # [B', g + 1]
            n = (draft == v_arg[:, :g]).long().cumprod(-1).sum(-1)
            nxt = v_arg.gather(1, n[:, None]).squeeze(1)
            deferred_pos = torch.ones(b, g, dtype=torch.bool, device=device)
            bonus_defers = torch.ones(b, dtype=torch.bool, device=device)
        else:
            p_raw, p = torch.softmax(v_logits, -1), probs(v_processed)
            if g > 0:
                q_raw_t, q_t = torch.stack(q_raw[:g], 1), torch.stack(q[:g], 1)
                accept, residual, _ = rule_acceptance(rule, draft, q_t, p[:, :g], alpha, q_raw_t, p_raw[:, :g])
                deferred_pos = defers(rule, q_t, p[:, :g], alpha, q_raw_t, p_raw[:, :g])  # [B', g]
            else:
                accept = p.new_zeros(b, 0)
                residual = p.new_zeros(b, 0, vocab)
                deferred_pos = torch.zeros(b, 0, dtype=torch.bool, device=device)
            if bonus == "target":
                bonus_dist = target_distribution(rule, q[g], p[:, g], alpha, q_raw[g], p_raw[:, g])
                bonus_defers = defers(rule, q[g], p[:, g], alpha, q_raw[g], p_raw[:, g])
            else:
                bonus_dist = p[:, g]
                bonus_defers = torch.ones(b, dtype=torch.bool, device=device)  # the verifier decides this token
            n, nxt = verify_block(draft, accept, residual, bonus_dist, generator=generator)

        # emitted block: n accepted drafts, then the correction/bonus token
        j_idx = torch.arange(g + 1, device=device)
        block = torch.cat([draft, nxt[:, None]], 1)
        block[torch.arange(b, device=device), n] = nxt
        write = j_idx[None] <= n[:, None]
        old = n_out[rows].clone()
        pos = old[:, None] + j_idx[None]
        r_idx = rows[:, None].expand_as(pos)
        buffer[r_idx[write], pos[write]] = block[write]
        if output_logprobs:
            vl = torch.log_softmax(v_logits, -1).gather(-1, block[..., None]).squeeze(-1)  # [B', g+1]
            lp_v[r_idx[write], pos[write]] = vl[write]
            if q_logp:
                qs = torch.stack(q_logp, 1)  # [B', g (+1), V]
                dl = qs.gather(-1, block[:, :qs.shape[1], None]).squeeze(-1)
                w = write[:, :qs.shape[1]]
                lp_d[r_idx[:, :qs.shape[1]][w], pos[:, :qs.shape[1]][w]] = dl[w]
            has_q = n < len(q_logp)  # the last emitted token's drafter distribution was computed this round
            cut = torch.zeros_like(has_q)  # set below: a stop or the budget cut the block before its last token
        # position j <= n: an accepted draft (j < n), the correction drawn at n < g, or the bonus (n = g)
        dpos = torch.cat([deferred_pos, bonus_defers[:, None]], 1)
        new_n = old + n + 1
        # stop inside the new tokens: cut after the token that reaches num_stops
        col = torch.arange(width, device=device)
        out_rows = buffer[rows]
        cum = (counts[out_rows] * (col[None] < new_n[:, None])).cumsum(-1)
        hit = cum >= num_stops
        first = torch.where(hit.any(-1), hit.float().argmax(-1) + 1, new_n)
        newly = hit.any(-1)
        final = torch.minimum(torch.where(newly, first, new_n), torch.full_like(new_n, m))
        n_out[rows] = final
        stopped[rows] |= newly
        emitted = final - old
        stats["accepted"][rows] += torch.minimum(n, emitted)
        k_idx = j_idx[None, :g] + 1  # draft positions 1..g; those at or past a stop/budget cut were not emitted
        within = k_idx <= emitted[:, None]
        reached[rows, :g] += ((k_idx <= n[:, None] + 1) & within).long()
        accepted_at[rows, :g] += ((k_idx <= n[:, None]) & within).long()
        stats["deferred"][rows] += (dpos & (j_idx[None] < emitted[:, None])).sum(-1)
        done = newly | (final >= m)
        if output_logprobs:  # the bonus token lacks a drafter log-prob unless it was cut off
            cut = emitted < n + 1
            pending[rows] = torch.where(has_q | cut, 0, pending[rows] + 1)

        # compact: shift rows that accepted fewer drafts right, drop columns that are padding in every row
        ids, mask = ids[:, :start + int(n.max())], mask[:, :start + int(n.max())]
        if feats is not None:
            feats = feats[:, :start + int(n.max())]
        # a feature drafter's cache entries of this round's drafts were built on predicted features: recompute them
        d_keep = start if feats is not None else start + n
        shift = int(n.max()) - n
        real = mask.sum(-1) - (int(n.max()) - n)  # real tokens of each row (no holes before this round)
        left = ids.shape[1] - real  # leading padding after the shift
        strip = int(left.min())
        cols = ids.shape[1] - strip
        src = torch.arange(cols, device=device)[None] + strip - shift[:, None]  # [B', cols] old column
        valid = torch.arange(cols, device=device)[None] + strip >= left[:, None]
        src = src.clamp(min=0)
        all_rows = torch.arange(b, device=device)
        if bool((shift == 0).all()) and strip == 0:
            v_run.crop(start + int(n.max()))
            d_run.crop(min(d_run.length, int(torch.as_tensor(d_keep).max())))
        else:
            ids = ids.gather(1, src) * valid
            mask = valid.long()
            if feats is not None:
                feats = feats.gather(1, src[..., None].expand(-1, -1, feats.shape[2])) * valid[..., None]
            v_run.realign(all_rows, src, cols)
            d_end = (torch.clamp(torch.full_like(n, d_run.length), max=d_keep) + shift - strip)
            d_run.realign(all_rows, src, int(d_end.min()) if d_run.cached else 0)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        if feats is not None:
            feats = torch.cat([feats, feats.new_zeros(b, 1, feats.shape[2])], 1)
        if output_logprobs and bool((pending[rows] > 0)[done].any()):
            # a finishing row's last token still needs its drafter log-prob: one drafter forward (no new token)
            d_logits = d_run.forward(ids[:, :-1], mask[:, :-1], max(1, ids.shape[1] - 1 - d_run.length),
                                     **({} if feats is None else {"features": feats[:, :-1]}))
            stats["drafter_calls"][rows] += 1
            fill_pending(d_logits, ids.shape[1] - 1)
        if gamma_schedule == "heuristic":
            g_cur = g_cur + 2 if bool((n == g).all()) else max(1, g_cur - 1)
        if bool(done.any()):
            keep_rows = (~done).nonzero().squeeze(-1)
            rows = rows[keep_rows]
            if rows.numel() == 0:
                break
            ids, mask = ids[keep_rows], mask[keep_rows]
            lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
            lead = min(lead, v_run.length, d_run.length if d_run.cached else lead)
            ids, mask = ids[:, lead:], mask[:, lead:]
            if feats is not None:
                feats = feats[keep_rows][:, lead:]
            cols_idx = torch.arange(ids.shape[1], device=device)[None].expand(rows.numel(), -1) + lead
            v_run.realign(keep_rows, cols_idx, v_run.length - lead)
            d_run.realign(keep_rows, cols_idx, d_run.length - lead)
        peak = max(peak, v_run.length)

    col = torch.arange(m, device=device)
    out_mask = col[None] < n_out[:, None]
    tokens = buffer[:, :m].masked_fill(~out_mask, pad_token_id)
    logprobs = lp_v[:, :m].masked_fill(~out_mask, 0.0) if output_logprobs else None
    drafter_logprobs = lp_d[:, :m].masked_fill(~out_mask, 0.0) if output_logprobs else None
    if not include_stop:
        is_last = col[None] == (n_out - 1)[:, None]
        out_mask = out_mask & ~(is_last & stopped[:, None])
    return SpeculativeOutput(tokens=tokens, mask=out_mask, stopped=stopped, num_tokens=n_out, logprobs=logprobs,
                             drafter_logprobs=drafter_logprobs, gammas=gammas, cache_columns=peak,
                             draft_reached=reached, draft_accepted=accepted_at, **stats)
