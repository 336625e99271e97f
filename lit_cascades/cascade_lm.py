"""A deployable two-LM generation cascade: small LM answers, large LM only where a sequence-level rule defers.

:class:`GenerationCascade` is the generation counterpart of :class:`lit_cascades.cascade.Cascade`. The small
causal LM greedily completes every prompt; a deferral score of its output (higher = keep) decides which rows are
sent, as one batch, to the large LM. Two kinds of rule:

* **sequence-level** (Gupta et al., "Language Model Cascades: Token-level Uncertainty and Beyond",
  arXiv:2404.10136): a Chow score of the small model's per-token log-probabilities ``ℓ_t`` of its own output
  (:func:`~lit_cascades.functional.sequence_scores.chow_sum`, ``chow_average``, ``chow_quantile`` at ``alpha``)
  or a learned post-hoc rule (:class:`~lit_cascades.modules.lm_cascade.PostHocDeferral` on the
  Post-Hoc-Quantile / Embed-1 / Embed-1+2 features). A row is deferred iff its score ``< threshold`` (or NaN),
  and the threshold is calibrated on held-out prompts with the guarantees of :meth:`Cascade.calibrate`
  (quantile, split-conformal, Clopper–Pearson; :func:`lit_cascades.cascade.calibrate_scores`). The small model
  may be a Gatekeeper-tuned one (Rabanser et al., arXiv:2502.19335; the ``gatekeeper_lm`` recipe).
* **token-level / speculative** (Narasimhan et al., "Faster Cascades via Speculative Decoding",
  arXiv:2405.19261): the rule decides per token inside speculative decoding
  (:class:`~lit_cascades.modules.speculative_cascade.SpeculativeCascade`). Every row runs through both models
  (the verifier checks each draft block), so the cost of a row is its verifier calls; there is no sequence
  threshold to calibrate (the trade-off is the rule's ``alpha``).

Shapes (``B`` prompts, ``M = max_new_tokens``): :meth:`GenerationCascade.generate` returns a
:class:`GenerationOutput` with ``texts`` (``B`` strings), ``tokens``/``mask`` ``[B, M]``, ``deferred``,
``scores``, ``calls`` and ``seconds`` ``[B]``.

Saved as one directory (:meth:`GenerationCascade.save`, :meth:`GenerationCascade.load`; ``Cascade.load`` reads
it too)::

    <dir>/cascade.json      task "generation": rule, threshold, generation settings, calibration report, source
    <dir>/pair/             both models (HF config + safetensors weights) and the tokenizer (save_pair layout)
    <dir>/rule.pt           the post-hoc rule's state dict (post-hoc rules only)

:meth:`GenerationCascade.from_run` builds one from a ``gatekeeper_lm``, ``lm_cascade`` or
``speculative_cascade`` run directory (``Cascade.from_run`` dispatches here for those recipes).

Importing this module is light (torch only); transformers and Lightning are imported when a model is run,
saved, loaded or built from a run.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_cascades.cascade import (
    FORMAT,
    FORMAT_VERSION,
    CalibrationReport,
    _check_spec,
    _device_of,
    _float_from_json,
    atomic_directory,
    calibrate_scores,
    check_calibration_args,
    check_save_directory,
)
from lit_cascades.functional.sequence_scores import chow_average, chow_quantile, chow_sum
from lit_cascades.io import atomic_save, atomic_write_json, jsonable, safe_torch_load

TASK = "generation"
#: the sequence-level Chow rules (Gupta et al., arXiv:2404.10136), by name
SEQUENCE_RULES: tuple[str, ...] = ("chow_sum", "chow_average", "chow_quantile")
#: where an output ends: at the tokenizer's eos token, or at the second newline (the next-line task of the LM
#: recipes, whose answer is the line between the first and the second newline)
STOPS: tuple[str, ...] = ("eos", "next_line")
#: recipes whose run directories :meth:`GenerationCascade.from_run` reads
LM_RECIPES: tuple[str, ...] = ("gatekeeper_lm", "lm_cascade", "speculative_cascade")
PAIR_DIR = "pair"
RULE_FILE = "rule.pt"


# --------------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------------
@dataclass
class GenerationOutput:
    """What :meth:`GenerationCascade.generate` returns for ``B`` prompts (``M = max_new_tokens``).

    Attributes:
        texts: ``B`` answers: the large model's for deferred rows, the small model's for the others (the whole
            decoded output, or its next line with ``stop="next_line"``).
        tokens: ``[B, M]`` generated ids of those answers (``pad_token_id`` after the end).
        mask: ``[B, M]`` bool, True on the output tokens (the stop token included unless ``include_stop=False``).
        deferred: ``[B]`` bool, True where the large model answered (sequence rules: ``score < threshold`` or a
            NaN score; speculative: the rule deferred to the verifier at one or more of the row's tokens).
        scores: ``[B]`` the small model's deferral score, higher = keep (speculative: the share of the row's
            emitted tokens at which the rule did not defer).
        calls: ``[B]`` sequence rules: models run on the row (1 kept, 2 deferred, +1 when the post-hoc rule reads
            the large model's hidden states); speculative: the row's verifier forwards.
        seconds: ``[B]`` wall time: the small model's (and scoring) time divided over all ``B`` rows, plus, for a
            deferred row, the large model's time divided over the deferred rows (speculative: batch time / ``B``).
        small_texts: ``B`` answers of the small model (the drafts' decoding for speculative: same as ``texts``).
    """

    texts: list[str]
    tokens: Tensor
    mask: Tensor
    deferred: Tensor
    scores: Tensor
    calls: Tensor
    seconds: Tensor
    small_texts: list[str]

    @property
    def deferral_rate(self) -> float:
        """The share of rows the large model answered."""
        return float(self.deferred.float().mean()) if self.deferred.numel() else 0.0


@dataclass
class _Decoded:
    """One model's greedy outputs for a batch: ``tokens/logprobs/mask [B, M]``, ``texts``, wall ``seconds``."""

    tokens: Tensor
    logprobs: Tensor
    mask: Tensor
    texts: list[str]
    seconds: float


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def parse_rule(rule: str, alpha: float | None = None) -> tuple[str, float | None]:
    """``(rule, alpha)`` of a sequence rule name: ``"chow_average"``, ``"chow_quantile"`` with ``alpha``, or the
    recipes' ``"chow_quantile_<α>"`` (e.g. ``"chow_quantile_0.25"``)."""
    m = re.fullmatch(r"chow_quantile_([0-9.eE+-]+)", rule)
    if m:
        if alpha is not None and float(alpha) != float(m.group(1)):
            raise ValueError(f"rule: {rule!r} names alpha {m.group(1)} but alpha={alpha!r} was given")
        return "chow_quantile", float(m.group(1))
    if rule not in SEQUENCE_RULES:
        raise ValueError(f"rule: expected one of {list(SEQUENCE_RULES)} (or 'chow_quantile_<alpha>'), or a "
                         f"PostHocDeferral; got {rule!r}")
    if rule == "chow_quantile":
        a = 0.0 if alpha is None else alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha: the quantile level of chow_quantile must be in [0, 1]; got {alpha!r}")
        return rule, float(a)
    if alpha is not None:
        raise ValueError(f"alpha: only rule='chow_quantile' takes a quantile level; rule={rule!r}")
    return rule, None


def recipe_of_run(run_dir: str | Path) -> str | None:
    """The recipe that wrote a run directory (``run.json``'s ``recipe``), or None when it does not say."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_text()).get("recipe")
    except (json.JSONDecodeError, AttributeError):
        return None
    return str(recipe) if recipe else None


def _trim_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the leading columns that are padding in every row of a left-padded batch."""
    used = mask.bool().any(0).nonzero()
    first = int(used[0]) if used.numel() else 0
    return ids[:, first:], mask[:, first:]


def _is_post_hoc(rule: Any) -> bool:
    return isinstance(rule, nn.Module) and callable(getattr(rule, "deferral_score", None)) \
        and hasattr(getattr(rule, "hparams", None), "features")


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# --------------------------------------------------------------------------------------------------------
# the cascade
# --------------------------------------------------------------------------------------------------------
class GenerationCascade(nn.Module):
    """A small/large causal-LM cascade for inference (module docstring).

    Args:
        small, large: Hugging Face causal LMs sharing ``tokenizer``'s vocabulary (checked here).
        tokenizer: their tokenizer (encodes string prompts, decodes outputs; a pad token is set to eos if absent).
        rule: the sequence-level deferral rule: ``"chow_sum"``, ``"chow_average"``, ``"chow_quantile"`` (at
            ``alpha``; also ``"chow_quantile_<α>"``) or a trained
            :class:`~lit_cascades.modules.lm_cascade.PostHocDeferral`. Ignored with ``speculative``.
        threshold: ``τ``; None until :meth:`calibrate` sets it (sequence rules only).
        alpha: the quantile level of ``chow_quantile``.
        max_new_tokens: generation budget ``M`` per prompt.
        stop: ``"eos"`` (an output ends at the eos token), ``"next_line"`` (at the second newline, the answer
            is the next line: the task of the LM recipes), or a list of stop token ids (the first one generated
            ends the output).
        include_stop: the stop token counts among the output (and scored) tokens.
        quality: the per-row text quality of :meth:`calibrate`'s report, ``"exact_match"`` or ``"token_f1"``
            (:func:`lit_cascades.functional.text.text_quality`, the metric of the LM recipes).
        batch_size: run each model on at most this many prompts at a time (None: all in one call).
        large_layer: hidden-state index of the large model for Post-Hoc-Embed-1+2 (default: its middle layer).
        speculative: make this a token-level cascade: keyword arguments of
            :class:`~lit_cascades.modules.speculative_cascade.SpeculativeCascade` (``rule``, ``alpha``,
            ``gamma``, ``temperature``, ``bonus``, ``seed``); ``small`` drafts and ``large`` verifies.
        add_special_tokens: whether string prompts are tokenized with the tokenizer's special tokens (the LM
            recipes' prompts are not).
    """

    def __init__(
        self,
        small: nn.Module,
        large: nn.Module,
        tokenizer: Any,
        rule: str | nn.Module = "chow_average",
        threshold: float | None = None,
        *,
        alpha: float | None = None,
        max_new_tokens: int = 32,
        stop: str | Sequence[int] = "eos",
        include_stop: bool = True,
        quality: str = "exact_match",
        batch_size: int | None = None,
        large_layer: int | None = None,
        speculative: Mapping[str, Any] | None = None,
        add_special_tokens: bool = False,
    ) -> None:
        super().__init__()
        from lit_cascades.functional.text import QUALITY_FUNCTIONS
        from lit_cascades.models.lm_pair import check_same_vocab, model_vocab_size

        for name, model in (("small", small), ("large", large)):
            if not isinstance(model, nn.Module) or not hasattr(model, "generate"):
                raise TypeError(f"{name}: expected a Hugging Face causal LM (an nn.Module with generate()); "
                                f"got {type(model).__name__}")
        if tokenizer is None or not callable(getattr(tokenizer, "batch_decode", None)):
            raise TypeError(f"tokenizer: expected a Hugging Face tokenizer; got {type(tokenizer).__name__}")
        check_same_vocab(small, large, tokenizer, tokenizer)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1; got {max_new_tokens!r}")
        if isinstance(stop, list | tuple):
            vocab = model_vocab_size(small)
            if not stop or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in stop):
                raise ValueError(f"stop: expected {list(STOPS)} or a non-empty list of stop token ids in [0, {vocab}); "
                                 f"got {stop!r}")
            stop = [int(t) for t in stop]
        elif stop not in STOPS:
            raise ValueError(f"stop: expected one of {list(STOPS)} or a list of stop token ids; got {stop!r}")
        if quality not in QUALITY_FUNCTIONS:
            raise ValueError(f"quality: expected one of {sorted(QUALITY_FUNCTIONS)}; got {quality!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size: expected an integer >= 1 or None; got {batch_size!r}")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                      or math.isnan(threshold)):
            raise ValueError(f"threshold: expected a number (or None until calibrate()); got {threshold!r}")
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer: has neither a pad nor an eos token; set tokenizer.pad_token first")
            tokenizer.pad_token = tokenizer.eos_token
        self.small, self.large, self.tokenizer = small.eval(), large.eval(), tokenizer
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.max_new_tokens, self.stop, self.include_stop = max_new_tokens, stop, bool(include_stop)
        self.quality, self.batch_size, self.add_special_tokens = quality, batch_size, bool(add_special_tokens)
        if isinstance(stop, list):
            self.stop_counts, self.num_stops = list(stop), 1
        elif stop == "eos":
            if tokenizer.eos_token_id is None:
                raise ValueError("stop: 'eos' needs a tokenizer with an eos token; use stop='next_line'")
            self.stop_counts: Any = [int(tokenizer.eos_token_id)]
            self.num_stops = 1
        else:
            from lit_cascades.data.lm import newline_counts

            self.stop_counts = newline_counts(tokenizer, model_vocab_size(small))
            self.num_stops = 2
        self.large_layer = int(large.config.num_hidden_layers) // 2 if large_layer is None else int(large_layer)
        self.speculative: dict[str, Any] | None = None
        self.spec_module: nn.Module | None = None
        self.rule: str | nn.Module
        self.alpha: float | None
        if speculative is not None:
            if threshold is not None:
                raise ValueError("threshold: a speculative (token-level) cascade has no sequence threshold; its "
                                 "trade-off is speculative['alpha']")
            self._set_speculative(speculative)
            self.rule, self.alpha = "speculative", None
        elif isinstance(rule, str):
            self.rule, self.alpha = parse_rule(rule, alpha)
        elif _is_post_hoc(rule):
            if alpha is not None:
                raise ValueError("alpha: a post-hoc rule takes its quantile levels from its own hparams.alphas")
            self.rule, self.alpha = rule.eval(), None  # type: ignore[union-attr]
        else:
            raise TypeError(f"rule: expected one of {list(SEQUENCE_RULES)} or a PostHocDeferral module; "
                            f"got {type(rule).__name__}")
        self.threshold: float | None = None if threshold is None else float(threshold)
        self.calibration: CalibrationReport | None = None
        self.source: dict[str, Any] = {}

    def _set_speculative(self, settings: Mapping[str, Any]) -> None:
        from lit_cascades.modules.speculative_cascade import SpeculativeCascade

        if not isinstance(settings, Mapping):
            raise TypeError(f"speculative: expected a mapping of SpeculativeCascade arguments; got "
                            f"{type(settings).__name__}")
        reserved = {"drafter", "verifier", "tokenizer", "max_new_tokens", "stop_counts", "num_stops",
                    "include_stop", "quality"} & set(settings)
        if reserved:
            raise ValueError(f"speculative: {sorted(reserved)} are set by the cascade itself; pass only the rule's "
                             "settings (rule, alpha, gamma, temperature, bonus, seed)")
        self.speculative = jsonable(dict(settings))
        if json.loads(json.dumps(self.speculative)) != self.speculative:
            raise ValueError("speculative: the settings must be JSON values (numbers, strings, lists, dicts)")
        self.spec_module = SpeculativeCascade(self.small, self.large, self.tokenizer,
                                              max_new_tokens=self.max_new_tokens, stop_counts=self.stop_counts,
                                              num_stops=self.num_stops, include_stop=self.include_stop,
                                              quality=self.quality, **self.speculative)

    def train(self, mode: bool = True) -> GenerationCascade:
        """Kept in eval mode whatever ``mode`` is: a cascade is for inference (fine-tune the parts instead)."""
        return super().train(False)

    @property
    def is_speculative(self) -> bool:
        """Whether this is a token-level (speculative) cascade."""
        return self.spec_module is not None

    # ----------------------------------------------------------------------------------------------------
    # inputs
    # ----------------------------------------------------------------------------------------------------
    def encode(self, prompts: Any) -> tuple[Tensor, Tensor]:
        """Left-padded ``(input_ids, attention_mask)`` ``[B, L]`` of ``prompts``: a non-empty list of strings,
        a mapping with ``input_ids`` (and ``attention_mask``) ``[B, L]`` left-padded (e.g. a
        :func:`~lit_cascades.data.lm.collate_prompts` batch), or an int tensor ``[B, L]`` without padding."""
        if isinstance(prompts, str):
            raise TypeError("prompts: expected a list of strings (a batch), got a single str; wrap it in a list")
        if isinstance(prompts, list | tuple):
            if not prompts:
                raise ValueError("prompts: empty list; expected at least one prompt")
            bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
            if bad:
                raise TypeError(f"prompts: expected strings; row {bad[0]} is {type(prompts[bad[0]]).__name__}")
            ids = self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens)["input_ids"]
            empty = [i for i, row in enumerate(ids) if len(row) == 0]
            if empty:
                raise ValueError(f"prompts: row {empty[0]} is empty (no tokens); every prompt needs at least one "
                                 "token")
            length = max(len(row) for row in ids)
            input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(ids), length), dtype=torch.long)
            for r, row in enumerate(ids):
                input_ids[r, length - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[r, length - len(row):] = 1
            return input_ids, mask
        if isinstance(prompts, Mapping):
            input_ids, mask = prompts.get("input_ids"), prompts.get("attention_mask")
            if mask is None and isinstance(input_ids, Tensor):
                mask = torch.ones_like(input_ids)
        elif isinstance(prompts, Tensor):
            input_ids, mask = prompts, torch.ones_like(prompts)
        else:
            raise TypeError("prompts: expected a list of strings, a mapping with 'input_ids' [B, L] (and "
                            f"'attention_mask'), or token ids [B, L]; got {type(prompts).__name__}")
        for name, t in (("input_ids", input_ids), ("attention_mask", mask)):
            if not isinstance(t, Tensor) or t.ndim != 2 or t.is_floating_point():
                got = f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"prompts: {name} must be an integer tensor [B, L]; got {got}")
        if input_ids.shape != mask.shape:
            raise ValueError(f"prompts: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(mask.shape)} "
                             "differ in shape")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"prompts: empty batch (shape {tuple(input_ids.shape)}); expected at least one prompt")
        m = mask.long()
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("prompts: attention_mask must hold only 0 and 1")
        if bool((m[:, 1:] < m[:, :-1]).any()):
            raise ValueError("prompts: expected left-padded rows (attention_mask 0...0 1...1); a row has padding "
                             "after a token")
        if bool((m.sum(-1) == 0).any()):
            row = int((m.sum(-1) == 0).nonzero()[0])
            raise ValueError(f"prompts: row {row} is empty (all padding); every prompt needs at least one token")
        return input_ids.long(), m

    # ----------------------------------------------------------------------------------------------------
    # models
    # ----------------------------------------------------------------------------------------------------
    def decode_texts(self, tokens: Tensor, mask: Tensor) -> list[str]:
        """The answers of outputs ``tokens/mask [B, M]``: the decoded text (without special tokens), or its
        next line with ``stop="next_line"``."""
        texts = self.tokenizer.batch_decode([row[m].tolist() for row, m in zip(tokens.cpu(), mask.cpu().bool())],
                                            skip_special_tokens=True)
        if self.stop == "next_line":
            from lit_cascades.data.lm import next_line

            texts = [next_line(t) for t in texts]
        return texts

    def _decode(self, role: str, input_ids: Tensor, mask: Tensor, max_new_tokens: int) -> _Decoded:
        """Greedy outputs of one model on every row, in chunks of ``batch_size`` (each chunk's all-padding
        leading columns dropped), with its wall time."""
        from lit_cascades.models.generation import greedy_generate

        model = self.small if role == "small" else self.large
        device = _device_of(model)
        step = self.batch_size or input_ids.shape[0]
        parts = []
        start = time.perf_counter()
        for i in range(0, input_ids.shape[0], step):
            ids, m = _trim_left(input_ids[i: i + step], mask[i: i + step])
            parts.append(greedy_generate(model, ids.to(device), m.to(device), max_new_tokens, self.stop_counts,
                                         self.pad_token_id, self.num_stops, self.include_stop))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        tokens = torch.cat([g.tokens for g in parts]).cpu()
        out_mask = torch.cat([g.mask for g in parts]).cpu()
        return _Decoded(tokens, torch.cat([g.logprobs for g in parts]).cpu(), out_mask,
                        self.decode_texts(tokens, out_mask), seconds)

    # ----------------------------------------------------------------------------------------------------
    # scoring
    # ----------------------------------------------------------------------------------------------------
    def scores_from_logprobs(self, logprobs: Tensor, mask: Tensor, features: Mapping[str, Tensor] | None = None
                             ) -> Tensor:
        """The deferral score ``[B]`` (higher = keep) of the small model's outputs from their per-token
        log-probabilities ``logprobs [B, M]`` and output ``mask [B, M]``; rows without an output token score NaN
        (deferred). ``features`` holds ``small_embed [B, d]`` / ``large_embed`` for the Embed post-hoc rules."""
        if self.is_speculative:
            raise RuntimeError("rule: a speculative cascade decides per token; it has no sequence score")
        mask = mask.bool()
        valid = mask.any(-1)
        scores = torch.full((logprobs.shape[0],), math.nan, dtype=torch.float32)
        if not bool(valid.any()):
            return scores
        lp, m = logprobs[valid].float(), mask[valid]
        if self.rule == "chow_sum":
            s = chow_sum(lp, m)
        elif self.rule == "chow_average":
            s = chow_average(lp, m)
        elif self.rule == "chow_quantile":
            s = chow_quantile(lp, m, alpha=float(self.alpha or 0.0))
        else:
            from lit_cascades.modules.lm_cascade import post_hoc_features

            rule: Any = self.rule
            records = {"small_logprobs": lp, "small_mask": m,
                       **{k: v[valid] for k, v in (features or {}).items()}}
            with torch.inference_mode():
                feats = post_hoc_features(records, rule.hparams.features, rule.hparams.alphas)
                s = rule.deferral_score(feats.to(_device_of(rule))).cpu()
        scores[valid] = s.float()
        return scores

    def _score(self, input_ids: Tensor, mask: Tensor, small: _Decoded) -> tuple[Tensor, float, int]:
        """Scores of the small model's outputs; the scoring time and the extra model calls per row it needed."""
        start = time.perf_counter()
        features: dict[str, Tensor] = {}
        extra = 0
        if not isinstance(self.rule, str) and self.rule.hparams.features in ("embed1", "embed1+2"):
            from lit_cascades.models.generation import output_hidden_states

            roles = [("small_embed", self.small, -1)]
            if self.rule.hparams.features == "embed1+2":
                roles.append(("large_embed", self.large, self.large_layer))
                extra = 1
            step = self.batch_size or input_ids.shape[0]
            for key, model, layer in roles:
                device = _device_of(model)
                chunks = []
                for i in range(0, input_ids.shape[0], step):
                    ids, m = _trim_left(input_ids[i: i + step], mask[i: i + step])
                    chunks.append(output_hidden_states(model, ids.to(device), m.to(device),
                                                       small.tokens[i: i + step].to(device),
                                                       small.mask[i: i + step].to(device), layer=layer).cpu())
                features[key] = torch.cat(chunks)
        scores = self.scores_from_logprobs(small.logprobs, small.mask, features)
        return scores, time.perf_counter() - start, extra

    # ----------------------------------------------------------------------------------------------------
    # inference
    # ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Any, max_new_tokens: int | None = None) -> GenerationOutput:
        """Run the cascade on a batch of prompts (see :meth:`encode` for the accepted forms).

        Sequence rules: the small model completes every row, the rule scores its outputs, and the large model
        completes only the rows with ``score < threshold`` (or NaN), in one batched call (chunks of
        ``batch_size``). Speculative: one speculative-cascade decoding of every row.

        Raises:
            TypeError / ValueError: bad prompts (named, with what was expected).
            RuntimeError: the threshold is not set (``threshold: not calibrated; call calibrate() first``).
        """
        m_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(m_new, bool) or not isinstance(m_new, int) or m_new < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1; got {max_new_tokens!r}")
        if not self.is_speculative and self.threshold is None:
            raise RuntimeError("threshold: not calibrated; call calibrate() first (or pass threshold=)")
        input_ids, mask = self.encode(prompts)
        if self.is_speculative:
            return self._generate_speculative(input_ids, mask, m_new)
        b = input_ids.shape[0]
        small = self._decode("small", input_ids, mask, m_new)
        scores, t_score, extra = self._score(input_ids, mask, small)
        deferred = ~(scores >= self.threshold)  # NaN scores are deferred
        tokens, out_mask, texts = small.tokens.clone(), small.mask.clone(), list(small.texts)
        seconds = torch.full((b,), (small.seconds + t_score) / b, dtype=torch.float64)
        idx = deferred.nonzero().squeeze(1)
        if idx.numel():
            large = self._decode("large", input_ids[idx], mask[idx], m_new)
            tokens[idx], out_mask[idx] = large.tokens, large.mask
            for j, row in enumerate(idx.tolist()):
                texts[row] = large.texts[j]
            seconds[idx] += large.seconds / idx.numel()
        return GenerationOutput(texts=texts, tokens=tokens, mask=out_mask, deferred=deferred, scores=scores,
                                calls=1 + extra + deferred.long(), seconds=seconds, small_texts=list(small.texts))

    def _generate_speculative(self, input_ids: Tensor, mask: Tensor, max_new_tokens: int) -> GenerationOutput:
        module: Any = self.spec_module
        device = _device_of(self.large)
        if module.device != device:  # a LightningModule inside a plain module misses the parent's .to(): its
            module.to(device)        # device (and so its sampling generator's) is set here
        step = self.batch_size or input_ids.shape[0]
        outs = []
        start = time.perf_counter()
        for i in range(0, input_ids.shape[0], step):
            ids, m = _trim_left(input_ids[i: i + step], mask[i: i + step])
            outs.append(module.generate(ids.to(device), m.to(device), max_new_tokens))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start

        def cat(name: str) -> Tensor:
            return torch.cat([getattr(o, name) for o in outs]).cpu()

        tokens, out_mask = cat("tokens"), cat("mask").bool()
        if all(getattr(o, "deferred", None) is not None for o in outs):
            # the rule's own decisions: emitted tokens at which its target put weight on the verifier
            deferred_tokens = cat("deferred")
            deferred = deferred_tokens > 0
            scores = 1.0 - deferred_tokens.float() / cat("num_tokens").clamp(min=1).float()
        else:  # an output without deferral counts: rejected drafts instead
            accepted, drafted = cat("accepted"), cat("drafted")
            deferred, scores = accepted < drafted, accepted.float() / drafted.clamp(min=1).float()
        texts = self.decode_texts(tokens, out_mask)
        b = tokens.shape[0]
        return GenerationOutput(texts=texts, tokens=tokens, mask=out_mask, deferred=deferred, scores=scores,
                                calls=cat("verifier_calls"), seconds=torch.full((b,), seconds / b, dtype=torch.float64),
                                small_texts=list(texts))

    def forward(self, prompts: Any, max_new_tokens: int | None = None) -> GenerationOutput:
        """Same as :meth:`generate`."""
        return self.generate(prompts, max_new_tokens)

    # ----------------------------------------------------------------------------------------------------
    # calibration
    # ----------------------------------------------------------------------------------------------------
    def _calibration_batches(self, data: Any, references: Sequence[str] | None) -> Iterable[tuple[Any, Any]]:
        if isinstance(data, list | tuple) and (not data or isinstance(data[0], str)):
            return [(data, references)]
        if isinstance(data, Mapping) or isinstance(data, Tensor):
            refs = references if references is not None else (data.get("target") if isinstance(data, Mapping)
                                                              else None)
            return [(data, refs)]
        if isinstance(data, Iterable) and not isinstance(data, str):
            if references is not None:
                raise ValueError("references: pass them inside the batches ('target') when the data is an iterable")
            return ((batch, batch.get("target") if isinstance(batch, Mapping) else None) for batch in data)
        raise TypeError("data: expected scores [N], a list of prompt strings, a prompt batch (mapping with "
                        "'input_ids'), or an iterable of prompt batches (e.g. a DataLoader of collate_prompts "
                        f"batches); got {type(data).__name__}")

    @torch.inference_mode()
    def evaluate(self, data: Any, references: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Scores ``[N]`` of held-out prompts and, when references are known (``references`` or each batch's
        ``"target"``), the per-row quality of each model's answer (both models are run on every row)."""
        from lit_cascades.functional.text import text_quality

        scores, small_q, large_q = [], [], []
        for batch, refs in self._calibration_batches(data, references):
            input_ids, mask = self.encode(batch)
            if refs is not None and (isinstance(refs, str) or len(refs) != input_ids.shape[0]):
                got = "a str" if isinstance(refs, str) else f"{len(refs)}"
                raise ValueError(f"references: expected {input_ids.shape[0]} strings (one per prompt); got {got}")
            small = self._decode("small", input_ids, mask, self.max_new_tokens)
            scores.append(self._score(input_ids, mask, small)[0])
            if refs is not None:
                large = self._decode("large", input_ids, mask, self.max_new_tokens)
                small_q.append(text_quality(small.texts, list(refs), self.quality))
                large_q.append(text_quality(large.texts, list(refs), self.quality))
            elif small_q:
                raise ValueError("references: some batches have references ('target') and others do not")
        if not scores:
            raise ValueError("data: no calibration prompts")
        if small_q and len(small_q) != len(scores):
            raise ValueError("references: some batches have references ('target') and others do not")
        out = {"scores": torch.cat(scores)}
        if small_q:
            out["small_quality"], out["large_quality"] = torch.cat(small_q), torch.cat(large_q)
        return out

    def calibrate(
        self,
        data: Any,
        target_rate: float,
        confidence: float | None = None,
        method: str = "quantile",
        *,
        references: Sequence[str] | None = None,
        small_quality: Tensor | None = None,
        large_quality: Tensor | None = None,
    ) -> CalibrationReport:
        """Set ``threshold`` on held-out prompts so that the deferral rate is ``≤ target_rate``; returns a report.

        The methods and their guarantees are those of :meth:`lit_cascades.cascade.Cascade.calibrate` (computed
        by :func:`lit_cascades.cascade.calibrate_scores`): ``"quantile"`` (realised rate on these rows only),
        ``"conformal"`` (``E[rate on a new row] ≤ target``), ``"clopper_pearson"`` (``P(true rate > target) ≤
        1 − confidence`` over the calibration draw). The calibration prompts must be exchangeable with the
        prompts served later.

        Args:
            data: held-out prompts: a list of strings (with ``references`` for quality), a prompt batch
                (mapping with ``input_ids``/``attention_mask`` and optionally ``target``), an iterable of such
                batches (e.g. a DataLoader of :func:`~lit_cascades.data.lm.collate_prompts` batches), or
                precomputed scores ``[N]`` (with ``small_quality``/``large_quality`` for quality).
            target_rate: the deferral rate not to exceed, in ``[0, 1]``.
            confidence: the level of the ``"clopper_pearson"`` bound (only that method takes it).
            method: ``"quantile"`` (default), ``"conformal"`` or ``"clopper_pearson"``.
            references: the reference answers of string prompts; both models then complete every prompt and
                the report has the small, large and cascade quality (``self.quality``) and the deferral curve.
            small_quality, large_quality: ``[N]`` per-row qualities, with scores given directly.

        Raises:
            RuntimeError: a speculative cascade (no sequence threshold).
        """
        if self.is_speculative:
            raise RuntimeError("calibrate: a speculative (token-level) cascade has no sequence threshold; its "
                               "trade-off is speculative['alpha']")
        target_rate, confidence = check_calibration_args(target_rate, method, confidence)
        if isinstance(data, Tensor) and data.ndim == 1 and data.is_floating_point():
            if references is not None:
                raise ValueError("references: given with scores; pass small_quality and large_quality instead")
            scores = data
        else:
            if small_quality is not None or large_quality is not None:
                raise ValueError("small_quality: given with prompts; pass references instead (both models are run)")
            ev = self.evaluate(data, references)
            scores, small_quality, large_quality = ev["scores"], ev.get("small_quality"), ev.get("large_quality")
        report = calibrate_scores(scores, target_rate, method, confidence, small_correct=small_quality,
                                  large_correct=large_quality, name="data", stacklevel=3)
        self.threshold = report.threshold
        self.calibration = report
        return report

    # ----------------------------------------------------------------------------------------------------
    # save / load
    # ----------------------------------------------------------------------------------------------------
    def _rule_json(self) -> dict[str, Any]:
        if self.is_speculative:
            return {"speculative": self.speculative}
        if isinstance(self.rule, str):
            return {"kind": self.rule, "alpha": self.alpha}
        hparams = {k: v for k, v in dict(self.rule.hparams).items()}
        spec = _check_spec("rule", {"_target_": _class_path(self.rule), **hparams})
        return {"post_hoc": spec, "weights": RULE_FILE}

    def metadata(self) -> dict[str, Any]:
        """The content of ``cascade.json``."""
        from lit_cascades import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": TASK,
            "rule": self._rule_json(),
            "threshold": self.threshold,
            "generation": {"max_new_tokens": self.max_new_tokens, "stop": self.stop,
                           "include_stop": self.include_stop, "quality": self.quality, "batch_size": self.batch_size,
                           "large_layer": self.large_layer, "add_special_tokens": self.add_special_tokens},
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "models": {"pair": PAIR_DIR},
            "source": self.source,
            "lit_cascades_version": __version__,
        }

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the cascade to ``directory`` (module docstring): ``cascade.json``, ``pair/`` (both models with
        their HF configs and safetensors weights, and the tokenizer), ``rule.pt`` for a post-hoc rule.

        Written into a temporary directory beside ``directory`` and renamed into place
        (:func:`lit_cascades.cascade.atomic_directory`): a failure leaves nothing half-written.

        Raises:
            FileExistsError: ``directory`` is not empty and ``overwrite`` is False.
        """
        from lit_cascades.models.lm_pair import LMPair, save_pair

        directory = check_save_directory(directory, overwrite)
        meta = self.metadata()  # fails before anything is written
        with atomic_directory(directory) as tmp:
            save_pair(LMPair(self.small, self.large, self.tokenizer), tmp / PAIR_DIR)
            if "post_hoc" in meta["rule"]:
                rule: Any = self.rule
                atomic_save({k: v.detach().cpu() for k, v in rule.state_dict().items()}, tmp / RULE_FILE)
            atomic_write_json(tmp / "cascade.json", meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: Any = "cpu") -> GenerationCascade:
        """Rebuild a cascade written by :meth:`save` (models with ``from_pretrained``, a post-hoc rule via
        :func:`lit_cascades.runner.build` and :func:`lit_cascades.io.safe_torch_load`)."""
        from lit_cascades.models.lm_pair import load_pair

        directory = Path(directory)
        path = directory / "cascade.json"
        if not path.is_file():
            raise FileNotFoundError(f"directory: no cascade.json in {directory}")
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT or meta.get("task") != TASK:
            raise ValueError(f"directory: {path} is not a saved generation cascade (format {meta.get('format')!r}, "
                             f"task {meta.get('task')!r})")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"directory: {path} has format version {meta['format_version']}; this lit_cascades "
                             f"reads up to {FORMAT_VERSION}")
        pair = load_pair(directory / meta["models"]["pair"])
        small, large = pair.small.to(map_location), pair.large.to(map_location)
        rule_meta = meta["rule"]
        rule: Any = "chow_average"
        alpha, speculative = None, None
        if "speculative" in rule_meta:
            speculative = rule_meta["speculative"]
        elif "post_hoc" in rule_meta:
            from lit_cascades.runner import build

            rule = build(rule_meta["post_hoc"], "rule")
            rule.load_state_dict(safe_torch_load(directory / rule_meta["weights"], map_location=map_location))
            rule = rule.to(map_location)
        else:
            rule, alpha = rule_meta["kind"], rule_meta.get("alpha")
        threshold = meta.get("threshold")
        cascade = cls(small, large, pair.tokenizer, rule=rule, alpha=alpha,
                      threshold=None if threshold is None else _float_from_json(threshold), speculative=speculative,
                      **meta["generation"])
        if meta.get("calibration"):
            cascade.calibration = CalibrationReport.from_dict(meta["calibration"])
        cascade.source = meta.get("source") or {}
        return cascade

    def serve_adapter(self, max_prompts: int = 64, max_chars: int = 20_000) -> GenerationAdapter:
        """The :class:`GenerationAdapter` that serves this cascade with :mod:`lit_cascades.serving`."""
        return GenerationAdapter(self, max_prompts=max_prompts, max_chars=max_chars)

    # ----------------------------------------------------------------------------------------------------
    # from a recipe run
    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        variant: str | None = None,
        rule: str | None = None,
        alpha: float | None = None,
        method: str | None = None,
        batch_size: int | None = None,
    ) -> GenerationCascade:
        """The cascade of an LM recipe run (uncalibrated for sequence rules: call :meth:`calibrate`).

        Reads ``<run>/run.json`` (the recipe) and ``<run>/config.yaml``; the pair is the one the run used (the
        directory recorded in ``metrics.json``, else ``pair.small``/``pair.large`` or ``pair.path`` of the
        config). Generation settings (next-line task, ``max_new_tokens``, ``include_stop``, ``quality``) are the
        run's.

        * ``gatekeeper_lm``: the small model is the fine-tuned one of ``finetune/<variant>/model.pt``
          (``variant``: ``gatekeeper_a<α>``, default the first Gatekeeper α; ``next_token``; ``pretrained`` =
          the pair's own small model); ``rule``: a Chow rule (default ``chow_average``).
        * ``lm_cascade``: ``rule``: a Chow rule (default ``chow_average``, or ``chow_quantile_<α>``) or a trained
          post-hoc rule by its recipe name, ``post_hoc_<features>_seed<s>`` (from ``post_hoc/.../model.pt``).
        * ``speculative_cascade``: a token-level cascade; ``method`` (a method of the run, e.g.
          ``spec_token_v3_0.3``) or ``rule``/``alpha``; default: the run's ``rule``/``alpha``, else the
          fastest method at large-model quality of its ``metrics.json``.

        Raises:
            FileNotFoundError: no run there, or weights / the pair missing.
            ValueError: a run of another recipe, or an unknown variant / rule / method.
        """
        from omegaconf import OmegaConf

        run_dir = Path(run_dir)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"run_dir: no config.yaml in {run_dir}; expected a recipe run directory")
        recipe = recipe_of_run(run_dir)
        if recipe not in LM_RECIPES:
            hint = " (use lit_cascades.Cascade.from_run for gatekeeper runs)" if recipe == "gatekeeper" else ""
            raise ValueError(f"run_dir: {run_dir} is a {recipe!r} run; GenerationCascade.from_run reads runs of "
                             f"{list(LM_RECIPES)}{hint}")
        cfg = OmegaConf.load(cfg_path)
        metrics = _read_json(run_dir / "metrics.json")
        pair = _run_pair(run_dir, cfg, metrics)
        section = OmegaConf.to_container(cfg.cascade, resolve=True)
        settings = {"max_new_tokens": int(cfg.task.max_new_tokens), "stop": "next_line",
                    "include_stop": bool(section.get("include_stop", True)),  # type: ignore[union-attr]
                    "quality": str(section.get("quality", "exact_match")), "batch_size": batch_size}  # type: ignore
        source: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "recipe": recipe}
        small = pair.small
        kwargs: dict[str, Any] = {}
        if recipe == "speculative_cascade":
            if variant is not None:
                raise ValueError("variant: only gatekeeper_lm runs have fine-tuned variants")
            spec_rule, spec_alpha = _speculative_method(cfg, metrics, method, rule, alpha)
            settings["stop"] = _speculative_stop(section)  # type: ignore[arg-type]
            kwargs["speculative"] = {**{k: v for k, v in section.items()  # type: ignore[union-attr]
                                        if k not in ("_target_", "max_new_tokens", "include_stop", "quality",
                                                     "stop_counts", "num_stops")},
                                     "rule": spec_rule, "alpha": spec_alpha}
            source["method"] = _method_name(spec_rule, spec_alpha)
        else:
            if method is not None:
                raise ValueError("method: only speculative_cascade runs have methods; pass rule=")
            rule = rule or "chow_average"
            if recipe == "gatekeeper_lm":
                variant = variant or _default_variant(cfg)
                small = _finetuned_small(run_dir, cfg, pair.small, variant)
                source["variant"] = variant
            elif variant is not None:
                raise ValueError("variant: only gatekeeper_lm runs have fine-tuned variants")
            if rule.startswith("post_hoc_"):
                if recipe != "lm_cascade":
                    raise ValueError(f"rule: {rule!r}: only lm_cascade runs train post-hoc rules")
                kwargs["rule"] = _post_hoc_rule(run_dir, cfg, rule, pair.small, pair.large)
                if alpha is not None:
                    raise ValueError("alpha: a post-hoc rule takes its quantile levels from its own hparams.alphas")
            else:
                kwargs["rule"], kwargs["alpha"] = parse_rule(rule, alpha)
            large_layer = section.get("large_layer")  # type: ignore[union-attr]
            if large_layer is not None:
                kwargs["large_layer"] = int(large_layer)
            source["rule"] = rule
        from lit_cascades.data.lm import ensure_pad_token

        cascade = cls(small, pair.large, ensure_pad_token(pair.tokenizer), **settings, **kwargs)
        run_info = _read_json(run_dir / "run.json")
        cascade.source = {**source, "pair": pair.path,
                          **{k: run_info[k] for k in ("run_id", "preset", "config_hash", "git_commit")
                             if k in run_info}}
        return cascade


# --------------------------------------------------------------------------------------------------------
# reading runs
# --------------------------------------------------------------------------------------------------------
def run_prompts(run_dir: str | Path, split: str = "val", num_examples: int | None = None,
                batch_size: int | None = None) -> Any:
    """A DataLoader of an LM recipe run's next-line prompts, built as the recipe builds them (same corpus,
    tokenizer, context length and seed): left-padded batches ``{"input_ids", "attention_mask", "target", ...}``
    that :meth:`GenerationCascade.calibrate` and :meth:`GenerationCascade.generate` take.

    ``split="val"`` (default) gives calibration prompts no model of the run was fitted on: for an ``lm_cascade``
    run the first ``task.num_train`` val prompts trained its post-hoc rules, so they are skipped here (the same
    seeded draw, continued). ``split="test"`` gives the run's own test prompts first.

    Args:
        run_dir: a finished ``gatekeeper_lm``, ``lm_cascade`` or ``speculative_cascade`` run.
        split: ``"val"`` or ``"test"``.
        num_examples: prompts to draw (default: the run's ``task.num_test``); fewer when the split has fewer
            candidate lines.
        batch_size: prompts per batch (default: the run's ``task.batch_size``).
    """
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, Subset

    from lit_cascades.data.lm import collate_prompts
    from lit_cascades.lm_tasks import build_task_datamodule

    run_dir = Path(run_dir)
    recipe = recipe_of_run(run_dir)
    if recipe not in LM_RECIPES or not (run_dir / "config.yaml").is_file():
        raise ValueError(f"run_dir: {run_dir} is not a run of {list(LM_RECIPES)} (recipe {recipe!r})")
    if split not in ("val", "test"):
        raise ValueError(f"split: expected 'val' or 'test'; got {split!r}")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    task = cfg.task
    n = int(num_examples if num_examples is not None else task.num_test)
    if n < 1:
        raise ValueError(f"num_examples: expected an integer >= 1; got {num_examples!r}")
    skip = int(task.num_train) if recipe == "lm_cascade" and split == "val" else 0
    pair = _run_pair(run_dir, cfg, _read_json(run_dir / "metrics.json"))
    dm = build_task_datamodule(cfg.data, pair)
    dataset = dm.next_line_dataset(split, num_examples=skip + n, context_tokens=task.context_tokens,
                                   max_target_tokens=task.max_new_tokens, min_context_lines=task.min_context_lines,
                                   seed=task.seed)
    if len(dataset) <= skip:
        raise ValueError(f"num_examples: the {split} split has {len(dataset)} prompts, all used to train the run's "
                         "post-hoc rules")
    return DataLoader(Subset(dataset, range(skip, len(dataset))), batch_size=batch_size or int(task.batch_size),
                      shuffle=False, collate_fn=collate_prompts(dm.get_tokenizer().pad_token_id))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}


def _run_pair(run_dir: Path, cfg: Any, metrics: Mapping[str, Any]) -> Any:
    """The LM pair a run used: the pair directory its ``metrics.json`` names (also a cached built pair), else
    the config's ``pair.small``/``pair.large`` or ``pair.path``."""
    from lit_cascades.models.lm_pair import PAIR_FILE, load_pair

    recorded = metrics.get("pair")
    if isinstance(recorded, str) and (Path(recorded) / PAIR_FILE).is_file():
        return load_pair(recorded)
    pair_cfg = cfg.get("pair") or {}
    if pair_cfg.get("small") and pair_cfg.get("large"):
        return load_pair(small=str(pair_cfg.small), large=str(pair_cfg.large),
                         tokenizer=None if not pair_cfg.get("tokenizer") else str(pair_cfg.tokenizer))
    if pair_cfg.get("path") and (Path(str(pair_cfg.path)).expanduser() / PAIR_FILE).is_file():
        return load_pair(Path(str(pair_cfg.path)).expanduser())
    raise FileNotFoundError(f"run_dir: cannot find the LM pair of {run_dir}: its metrics.json names none that "
                            f"exists ({recorded!r}) and the config has no pair.small/pair.large or pair.path with a "
                            "pair in it (is the run finished, and the pair cache still there?)")


def _default_variant(cfg: Any) -> str:
    alphas = list(cfg.finetune.get("alphas") or [])
    if alphas:
        return f"gatekeeper_a{float(alphas[0]):g}"
    return "next_token" if cfg.finetune.get("baseline") else "pretrained"


def _finetuned_small(run_dir: Path, cfg: Any, small: nn.Module, variant: str) -> nn.Module:
    if variant == "pretrained":
        return small
    path = run_dir / "finetune" / variant / "model.pt"
    if not path.is_file():
        have = sorted(p.name for p in (run_dir / "finetune").iterdir()) if (run_dir / "finetune").is_dir() else []
        raise FileNotFoundError(f"variant: no weights at {path}; the run has {['pretrained', *have]}")
    state = safe_torch_load(path)
    state = state.get("state_dict", state)
    sub = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not sub:
        raise ValueError(f"variant: {path} has no 'model.' entries; expected a CausalLM state dict")
    model = copy.deepcopy(small)
    model.load_state_dict(sub)
    return model.eval()


def _post_hoc_rule(run_dir: Path, cfg: Any, name: str, small: nn.Module, large: nn.Module) -> nn.Module:
    from omegaconf import OmegaConf

    from lit_cascades.modules.lm_cascade import FEATURE_SETS, post_hoc_in_features
    from lit_cascades.runner import build

    m = re.fullmatch(r"post_hoc_(.+)_seed(\d+)", name)
    if m is None or m.group(1) not in FEATURE_SETS:
        raise ValueError(f"rule: {name!r} is not a post-hoc rule name; expected post_hoc_<features>_seed<s> with "
                         f"features in {list(FEATURE_SETS)}")
    features, seed = m.group(1), int(m.group(2))
    path = run_dir / "post_hoc" / f"{features.replace('+', '_')}_seed{seed}" / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"rule: no weights at {path}; was post_hoc.feature_sets/seeds of the run "
                                f"{OmegaConf.to_container(cfg.post_hoc.feature_sets)}/"
                                f"{OmegaConf.to_container(cfg.post_hoc.seeds)}?")
    section = OmegaConf.to_container(cfg.post_hoc.module, resolve=True)
    alphas = list(section.get("alphas", []))  # type: ignore[union-attr]
    rule = build(section, "post_hoc.module", in_features=post_hoc_in_features(features, alphas, small, large),
                 features=features)
    rule.load_state_dict(safe_torch_load(path))
    return rule.eval()


def _speculative_stop(section: Mapping[str, Any]) -> str | list[int]:
    """The ``stop`` of a speculative_cascade run's ``cascade`` section (runs before ``stop_counts`` was a key
    always stopped at the second newline)."""
    if "stop_counts" not in section:
        return "next_line"
    counts, num_stops = section["stop_counts"], int(section.get("num_stops") or 1)
    if counts == "newlines" and num_stops == 2:
        return "next_line"
    if counts is None and num_stops == 1:
        return "eos"
    if isinstance(counts, list) and num_stops == 1:
        return [int(t) for t in counts]
    raise ValueError(f"run_dir: cascade.stop_counts={counts!r} with num_stops={num_stops} has no GenerationCascade "
                     "stop equivalent ('eos', 'next_line' or a list of stop ids)")


def _method_name(rule: str, alpha: float | None) -> str:
    return "spec_decode" if rule == "spec_decode" else f"spec_{rule}_{alpha if alpha is not None else 0:g}"


def _speculative_method(cfg: Any, metrics: Mapping[str, Any], method: str | None, rule: str | None,
                        alpha: float | None) -> tuple[str, float | None]:
    from lit_cascades.functional.speculative import RULES, check_rule

    if method is not None and rule is not None:
        raise ValueError("method: give a method name or rule/alpha, not both")
    if rule is None and method is None:
        if cfg.get("rule") is not None:
            rule, alpha = str(cfg.rule), None if cfg.get("alpha") is None else float(cfg.alpha)
        else:
            best = metrics.get("fastest_at_large_quality") or {}
            method = best.get("method")
            if method is None:
                known = sorted(k for k in metrics.get("methods", {}) if k.startswith("spec_"))
                raise ValueError(f"method: the run swept several rules and none matched large-model quality; pass "
                                 f"method= (one of {known}) or rule=/alpha=")
    if method is not None:
        if method == "spec_decode":
            rule, alpha = "spec_decode", None
        else:
            for r in sorted(RULES, key=len, reverse=True):
                if method.startswith(f"spec_{r}_"):
                    rule, alpha = r, float(method[len(f"spec_{r}_"):])
                    break
            else:
                raise ValueError(f"method: {method!r} is not a speculative method name (spec_decode or "
                                 f"spec_<rule>_<alpha> with a rule of {list(RULES)})")
    assert rule is not None
    try:
        alpha_checked = check_rule(rule, alpha)
    except (TypeError, ValueError) as err:
        raise ValueError(f"rule: {err}") from None
    return rule, (alpha_checked if alpha is not None else None)


# --------------------------------------------------------------------------------------------------------
# serving
# --------------------------------------------------------------------------------------------------------
class GenerationAdapter:
    """Serves a :class:`GenerationCascade` through :mod:`lit_cascades.serving` (its ``Adapter`` protocol).

    Request: ``{"inputs": [prompt, ...]}``, 1 to ``max_prompts`` non-empty strings of at most ``max_chars``
    characters each, whose tokens plus ``max_new_tokens`` fit both models' context windows.
    Response: ``{"outputs": [{"text": str, "deferred": bool, "score": float | null, "calls": int,
    "seconds": float}, ...]}``, the fields of :class:`GenerationOutput` per prompt (a NaN score is ``null``).
    The prompts of all requests of a dynamic batch go through one :meth:`GenerationCascade.generate` call, so
    the large model runs once per batch (per ``batch_size`` chunk) on the deferred prompts.

    Args:
        cascade: a calibrated cascade (or a speculative one), or the directory it was saved to.
        max_prompts: the most prompts one request may carry (more: 413).
        max_chars: the longest prompt, in characters (longer: 413).
    """

    task = "generation"

    def __init__(self, cascade: GenerationCascade | str | Path, max_prompts: int = 64,
                 max_chars: int = 20_000) -> None:
        if isinstance(cascade, str | Path):
            cascade = GenerationCascade.load(cascade)
        if not isinstance(cascade, GenerationCascade):
            raise TypeError(f"cascade: expected a GenerationCascade or the directory of a saved one; got "
                            f"{type(cascade).__name__}")
        if not cascade.is_speculative and cascade.threshold is None:
            raise ValueError("cascade: not calibrated (threshold is None); call calibrate() before serving")
        for name, value in (("max_prompts", max_prompts), ("max_chars", max_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1; got {value!r}")
        self.cascade, self.max_prompts, self.max_chars = cascade, max_prompts, max_chars

    def parse(self, payload: Any) -> list[str]:
        """``{"inputs": [prompt, ...]}`` -> the prompts; ``BadRequest`` (of :mod:`lit_cascades.serving`) naming
        the bad part."""
        from lit_cascades.models.lm_pair import context_length
        from lit_cascades.serving import BadRequest, request_inputs

        prompts = request_inputs(payload, self.max_prompts, "prompt", "prompts", "prompt strings")
        c = self.cascade
        limits = [n for n in (context_length(c.small), context_length(c.large)) if n is not None]
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise BadRequest(f"inputs[{i}]: expected a string; got {type(p).__name__}")
            if len(p) > self.max_chars:
                raise BadRequest(f"inputs[{i}]: {len(p)} characters; at most {self.max_chars}", status=413)
            n = len(c.tokenizer(p, add_special_tokens=c.add_special_tokens)["input_ids"])
            if n == 0:
                raise BadRequest(f"inputs[{i}]: empty prompt (no tokens)")
            if limits and n + c.max_new_tokens > min(limits):
                raise BadRequest(f"inputs[{i}]: {n} tokens + max_new_tokens {c.max_new_tokens} exceed the context "
                                 f"window of {min(limits)} tokens", status=413)
        return prompts

    def setup(self, device: str) -> None:
        self.cascade.to(device)

    def run(self, requests: list[list[str]]) -> Any:
        from lit_cascades.serving import BatchResult

        prompts = [p for r in requests for p in r]
        out = self.cascade.generate(prompts)
        rows = [{"text": t, "deferred": d, "score": None if math.isnan(s) else s, "calls": k, "seconds": sec}
                for t, d, s, k, sec in zip(out.texts, out.deferred.tolist(), out.scores.tolist(), out.calls.tolist(),
                                           out.seconds.tolist())]
        responses, start = [], 0
        for r in requests:
            responses.append({"outputs": rows[start: start + len(r)]})
            start += len(r)
        if self.cascade.is_speculative:
            large_calls = int(out.calls.max()) if out.calls.numel() else 0  # verifier forwards of the batch
        else:
            n_def = int(out.deferred.sum())
            large_calls = math.ceil(n_def / (self.cascade.batch_size or max(n_def, 1)))
        return BatchResult(responses, out.deferred.tolist(), large_calls)

    def describe(self) -> dict[str, Any]:
        c = self.cascade
        rep = c.calibration
        calibration = None
        if rep is not None:
            calibration = {k: getattr(rep, k) for k in ("method", "n", "target_rate", "confidence", "rate", "bound",
                                                         "guarantee", "cascade_quality", "large_quality")}
        threshold = c.threshold
        return {"task": self.task,
                "threshold": threshold if threshold is None or math.isfinite(threshold) else str(threshold),
                "rule": c._rule_json(), "max_new_tokens": c.max_new_tokens, "stop": c.stop,
                "max_prompts": self.max_prompts, "calibration": calibration, "source": c.source}
