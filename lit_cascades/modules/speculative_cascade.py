"""Speculative cascades as a LightningModule: a deferral rule executed by speculative decoding.

Reference: Narasimhan et al., "Faster Cascades via Speculative Decoding", ICLR 2025 (arXiv:2405.19261). The decoding itself is :func:`~lit_cascades.models.speculative.speculative_generate`
(rules in :mod:`lit_cascades.functional.speculative`); this module holds the pair and the settings, and runs
them over a DataModule of prompts:

* ``predict_step`` on a batch of left-padded prompts (:func:`~lit_cascades.data.lm.collate_prompts`) returns
  per-prompt records: generated tokens and mask, the decoded next line and its qualities (when the batch has
  ``target``), the decoding statistics and the wall time (the batch's time split evenly over its rows);
* ``test_step`` logs the batch means of quality, acceptance rate, tokens per verifier call and forward counts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lit_cascades.data.lm import newline_counts, next_line
from lit_cascades.functional.speculative import BONUS_CHOICES, check_rule
from lit_cascades.functional.text import QUALITY_FUNCTIONS, text_quality
from lit_cascades.models.lm_pair import model_vocab_size
from lit_cascades.models.speculative import (
    GAMMA_SCHEDULES,
    SpeculativeOutput,
    check_vocabularies,
    is_hf_causal_lm,
    speculative_generate,
)

STAT_KEYS: tuple[str, ...] = ("num_tokens", "accepted", "drafted", "verifier_calls", "drafter_calls", "deferred")
#: ``stop_counts="newlines"``: the next-line task's stop rule (newline counts of the tokenizer, EOS a full stop).
NEWLINES = "newlines"


class SpeculativeCascade(L.LightningModule):
    """A drafter/verifier pair decoded with a speculative-cascade rule.

    Args:
        drafter, verifier: causal LMs sharing one tokenizer (output sizes checked against ``tokenizer``); the
            verifier a HF model, the drafter a HF model or the minimal protocol of
            :mod:`lit_cascades.models.speculative`.
        tokenizer: their tokenizer (decodes outputs for the quality metric; its size is the shared vocabulary
            when the output layers are padded differently).
        rule, alpha: see :mod:`lit_cascades.functional.speculative` (``rule="spec_decode"`` is exact
            speculative decoding, ``"drafter_only"`` the drafter alone).
        gamma: (initial) draft block size; ``gamma_schedule``: ``"constant"`` or ``"heuristic"`` (HF's).
        temperature: 0 = greedy; > 0 = sampling at that temperature; ``None`` = the verifier's
            ``generation_config``.
        max_new_tokens: default generation budget.
        stop_counts: ``[V]`` stop events per token or stop ids; ``None`` (default) = the verifier's EOS ids;
            ``"newlines"`` = newline counts of ``tokenizer`` (the next-line task; use with ``num_stops=2``).
        num_stops: stop events that end an output.
        bonus: ``"verifier"`` (bonus token from ``p_{γ+1}``), ``"target"`` (from ``π_{γ+1}``) or ``None``
            (``"target"`` for ``drafter_only``, else ``"verifier"``).
        include_stop: the stop token is part of the output mask.
        quality: the quality reported by ``test_step`` (``exact_match`` or ``token_f1``; both are recorded).
        seed: seed of the module's sampling generator (reset by :meth:`reset_generator`).
        generation_kwargs: settings that update the verifier's ``generation_config`` (``top_k``, ``top_p``,
            ``min_p``, ``repetition_penalty``, ...), applied to both models' logits as HF assisted generation does.
        output_logprobs: records also hold the emitted tokens' log-probs under both models.

    Changed in this version: the default stop is the verifier's EOS (was: newline counts with ``num_stops=2``,
    the next-line task, now ``stop_counts="newlines", num_stops=2``) and ``bonus=None`` (``drafter_only``
    reproduces the drafter).
    """

    def __init__(
        self,
        drafter: nn.Module,
        verifier: nn.Module,
        tokenizer: Any = None,
        rule: str = "spec_decode",
        alpha: float | None = None,
        gamma: int = 4,
        temperature: float = 0.0,
        max_new_tokens: int = 32,
        stop_counts: Tensor | list[int] | str | None = None,
        num_stops: int = 1,
        bonus: str | None = None,
        include_stop: bool = True,
        quality: str = "exact_match",
        seed: int = 0,
        gamma_schedule: str = "constant",
        generation_kwargs: dict[str, Any] | None = None,
        output_logprobs: bool = False,
    ) -> None:
        super().__init__()
        check_rule(rule, alpha)
        if bonus is not None and bonus not in BONUS_CHOICES:
            raise ValueError(f"`bonus` must be one of {list(BONUS_CHOICES)} or None; got {bonus!r}")
        if gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"`gamma_schedule` must be one of {list(GAMMA_SCHEDULES)}; got {gamma_schedule!r}")
        if quality not in QUALITY_FUNCTIONS:
            raise ValueError(f"`quality` must be one of {sorted(QUALITY_FUNCTIONS)}; got {quality!r}")
        if not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"`gamma` must be an integer >= 1; got {gamma!r}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 or None; got {temperature}")
        self.vocab_size = len(tokenizer) if tokenizer is not None else None
        if is_hf_causal_lm(drafter):
            check_vocabularies(drafter, verifier, self.vocab_size)
        self.drafter, self.verifier, self.tokenizer = drafter.eval(), verifier.eval(), tokenizer
        if isinstance(stop_counts, str):
            if stop_counts != NEWLINES or tokenizer is None:
                raise ValueError(f"`stop_counts` as a string must be {NEWLINES!r} (with a tokenizer); got "
                                 f"{stop_counts!r}")
            stop_counts = newline_counts(tokenizer, model_vocab_size(verifier))
        self.stop_counts = stop_counts
        self.generation_kwargs = dict(generation_kwargs or {})
        pad = None
        if tokenizer is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        self.save_hyperparameters(ignore=["drafter", "verifier", "tokenizer", "stop_counts", "generation_kwargs"])
        self._generator: torch.Generator | None = None

    def reset_generator(self, seed: int | None = None) -> None:
        """Restart the sampling RNG (at ``seed``, default the module's), so runs are reproducible."""
        self._generator = torch.Generator(device=self.device).manual_seed(
            self.hparams.seed if seed is None else seed)

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self.reset_generator()
        return self._generator  # type: ignore[return-value]

    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int | None = None,
                 **overrides: Any) -> SpeculativeOutput:
        """Decode a left-padded batch ``[B, L]``; ``overrides`` replace the module's settings for this call
        (``rule``, ``alpha``, ``gamma``, ``temperature``, ``stop_counts``, ``num_stops``, ``bonus``,
        ``include_stop``, ``generator``, ``gamma_schedule``, ``generation_kwargs``, ``output_logprobs``,
        ``generation_config``, ``logits_processor``)."""
        h = self.hparams
        kwargs: dict[str, Any] = dict(rule=h.rule, alpha=h.alpha, gamma=h.gamma, temperature=h.temperature,
                                      stop_counts=self.stop_counts, num_stops=h.num_stops, bonus=h.bonus,
                                      include_stop=h.include_stop, pad_token_id=self.pad_token_id,
                                      generator=self.generator, gamma_schedule=h.gamma_schedule,
                                      generation_kwargs=self.generation_kwargs,
                                      output_logprobs=h.output_logprobs, generation_config=None,
                                      logits_processor=None, vocab_size=self.vocab_size)
        unknown = set(overrides) - set(kwargs)
        if unknown:
            raise TypeError(f"unknown generate() overrides {sorted(unknown)}; allowed: {sorted(kwargs)}")
        kwargs.update(overrides)
        return speculative_generate(self.drafter, self.verifier, input_ids, attention_mask,
                                    max_new_tokens or h.max_new_tokens, **kwargs)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """Records of one batch of prompts: ``tokens``, ``mask``, ``text``, qualities, statistics, ``seconds``."""
        start = time.perf_counter()
        out = self.generate(batch["input_ids"], batch["attention_mask"])
        seconds = time.perf_counter() - start
        b = out.tokens.shape[0]
        rec: dict[str, Any] = {"tokens": out.tokens.cpu(), "mask": out.mask.cpu(), "stopped": out.stopped.cpu(),
                               "seconds": torch.full((b,), seconds / b, dtype=torch.float64)}
        rec.update({k: getattr(out, k).cpu() for k in STAT_KEYS})
        if out.logprobs is not None:
            rec["logprobs"], rec["drafter_logprobs"] = out.logprobs.cpu(), out.drafter_logprobs.cpu()
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode([row[m].tolist() for row, m in zip(out.tokens, out.mask)],
                                                skip_special_tokens=True)
            rec["text"] = [next_line(t) for t in texts]
            if "target" in batch:
                rec["target"] = list(batch["target"])
                for metric in QUALITY_FUNCTIONS:
                    rec[metric] = text_quality(rec["text"], batch["target"], metric)
        return rec

    def test_step(self, batch: Mapping[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """Generate and log the batch means (quality, acceptance rate, tokens per verifier call, forwards)."""
        rec = self.predict_step(batch, batch_idx)
        b = rec["tokens"].shape[0]
        logs = {"acceptance_rate": rec["accepted"].sum() / rec["drafted"].sum().clamp(min=1),
                "deferral_rate": rec["deferred"].sum() / rec["num_tokens"].sum().clamp(min=1),
                "tokens_per_verifier_call": rec["num_tokens"].sum() / rec["verifier_calls"].sum().clamp(min=1),
                "verifier_calls": rec["verifier_calls"].float().mean(),
                "drafter_calls": rec["drafter_calls"].float().mean(),
                "seconds_per_prompt": rec["seconds"].mean()}
        if self.hparams.quality in rec:
            logs["quality"] = rec[self.hparams.quality].float().mean()
        self.log_dict({f"test/{k}": float(v) for k, v in logs.items()}, batch_size=b)
        return rec
