"""Speculative cascades: speed against transformers' assisted generation, against the large model, and batching.

    python -m benchmarks.speculative [--prompts 16] [--quality-prompts 96] [--rule token_v3] \
        [--alphas 0.1,0.3,0.5,0.8] [--gamma 4] [--threads 1] [recipe overrides, e.g. pair.path=... preset=smollm2]

Prompts are the next-line task of ``recipes.speculative_cascade`` (its config, with any ``key=value`` overrides;
``task.quality`` defaults to ``token_f1`` here). Everything is greedy (temperature 0); every ratio compares runs
made in this process, timed in alternation (best of ``--repeats``), so machine load hits both sides alike.

1. ``vs_hf_assisted`` (target <= 1.0): exact speculative decoding (``rule=spec_decode``) vs
   ``verifier.generate(assistant_model=drafter)`` with the same constant ``γ``, batch 1 (HF's assisted generation
   supports no larger batch), ``max_new_tokens`` tokens per prompt and no stop token, so both emit the same
   tokens; outputs are checked equal token for token before timing. For reference, also timed: HF assisted
   generation with its own default drafting policy (the assistant's ``generation_config``: a confidence
   threshold that stops a draft early) and plain greedy decoding of the verifier.
2. ``batching``: tokens/s of ``spec_decode`` and of plain verifier decoding at batch 8 vs batch 1 (the task's
   stop rule: rows finish at different lengths).
3. ``quality_latency``: on ``--quality-prompts`` prompts (batch 8) the large model alone vs ``--rule`` at each
   α: quality, tokens/s relative to large-only, verifier calls per emitted token. Reported at the fastest α whose
   quality is at least large-only's (targets: tokens/s ratio > 1, verifier calls per token <= 0.5).

Needs a pair: ``pair.path=<run>/pair`` of ``python -m recipes.lm_pair``, or ``pair.build_preset`` (default: the
cached pair of ``lm_pair preset=default``, trained on first use).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from benchmarks._common import interleaved_best_times, write_results
from lit_cascades.data.lm import collate_prompts, ensure_pad_token
from lit_cascades.lm_tasks import (
    build_task_datamodule,
    load_or_build_pair,
    next_line_loader,
    plain_decode,
    plain_row,
    speculative_row,
)
from lit_cascades.models.speculative import HF_DRAFTING_KEYS, hf_constant_drafting
from lit_cascades.modules.lm_cascade import concat_records
from lit_cascades.modules.speculative_cascade import SpeculativeCascade
from lit_cascades.runner import load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def decode_args(cfg: DictConfig) -> dict[str, Any]:
    """:func:`plain_decode` settings of a speculative_cascade config."""
    return dict(max_new_tokens=cfg.task.max_new_tokens, include_stop=cfg.cascade.include_stop,
                temperature=float(cfg.cascade.temperature), seed=int(cfg.seed), progress=False)


def prompts_of(rows: list, batch_size: int, pad_token_id: int) -> DataLoader:
    """Left-padded batches of next-line prompts ``rows``, in order."""
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate_prompts(pad_token_id))


def decode_records(module: SpeculativeCascade, loader: DataLoader) -> dict[str, Any]:
    module.reset_generator()
    return concat_records([module.predict_step(batch, i) for i, batch in enumerate(loader)])


def default_policy(assistant, key: str) -> Any:
    """The assistant's setting ``key``, or transformers' global default where it is unset."""
    value = getattr(assistant.generation_config, key)
    if value is None:
        defaults = getattr(assistant.generation_config, "_get_default_generation_params", dict)()
        value = defaults.get(key)
    return value


def vs_hf_assisted(pair, prompts: list[torch.Tensor], gamma: int, max_new: int, pad: int,
                   repeats: int) -> dict[str, Any]:
    """Batch-1 exact speculative decoding vs HF assisted generation (same γ, no stop token, same tokens)."""
    sc = SpeculativeCascade(pair.small, pair.large, rule="spec_decode", gamma=gamma, max_new_tokens=max_new,
                            stop_counts=None, num_stops=1)
    sc.pad_token_id = pad
    hf_kwargs = dict(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=pad,
                     eos_token_id=None)
    assisted_kwargs = dict(hf_kwargs, assistant_model=pair.small)
    stats = {"verifier_calls": 0, "accepted": 0, "drafted": 0, "tokens": 0}
    for p in prompts:  # correctness first: the same tokens, or the timing compares different work
        ones = torch.ones_like(p)
        ours = sc.generate(p, ones)
        with hf_constant_drafting(pair.small, gamma):
            hf = pair.large.generate(p, attention_mask=ones, **assisted_kwargs)[0, p.shape[1]:]
        if ours.tokens[0, ours.mask[0]].tolist() != hf.tolist():
            raise AssertionError("spec_decode and HF assisted generation disagree; timing would be meaningless")
        stats["verifier_calls"] += int(ours.verifier_calls[0])
        stats["accepted"] += int(ours.accepted[0])
        stats["drafted"] += int(ours.drafted[0])
        stats["tokens"] += int(ours.num_tokens[0])

    def run_ours() -> None:
        for p in prompts:
            sc.generate(p, torch.ones_like(p))

    def run_hf_assisted() -> None:  # the same constant γ as ours
        with hf_constant_drafting(pair.small, gamma):
            for p in prompts:
                pair.large.generate(p, attention_mask=torch.ones_like(p), **assisted_kwargs)

    def run_hf_assisted_default() -> None:  # HF's own drafting policy (confidence threshold, its defaults)
        for p in prompts:
            pair.large.generate(p, attention_mask=torch.ones_like(p), **assisted_kwargs)

    def run_hf_plain() -> None:
        for p in prompts:
            pair.large.generate(p, attention_mask=torch.ones_like(p), **hf_kwargs)

    best = interleaved_best_times({"spec_decode": run_ours, "hf_assisted": run_hf_assisted,
                                   "hf_assisted_default_policy": run_hf_assisted_default,
                                   "hf_verifier_greedy": run_hf_plain}, repeats=repeats, warmup=1)
    return {"prompts": len(prompts), "gamma": gamma, "max_new_tokens": max_new, "seconds": best,
            "ratio_spec_decode_over_hf_assisted": best["spec_decode"] / best["hf_assisted"], "target": 1.0,
            "ratio_spec_decode_over_verifier_greedy": best["spec_decode"] / best["hf_verifier_greedy"],
            "ratio_hf_assisted_over_verifier_greedy": best["hf_assisted"] / best["hf_verifier_greedy"],
            "ratio_hf_assisted_default_policy_over_verifier_greedy":
                best["hf_assisted_default_policy"] / best["hf_verifier_greedy"],
            "hf_default_policy": {k: default_policy(pair.small, k) for k in HF_DRAFTING_KEYS},
            "tokens_per_verifier_call": stats["tokens"] / max(stats["verifier_calls"], 1),
            "acceptance_rate": stats["accepted"] / max(stats["drafted"], 1)}


def batching(pair, cfg: DictConfig, rows: list, pad: int, repeats: int) -> dict[str, Any]:
    """Tokens/s at batch 8 vs batch 1 on the prompts ``rows``, for spec_decode and for plain verifier decoding."""
    sc = SpeculativeCascade(pair.small, pair.large, pair.tokenizer, rule="spec_decode", gamma=int(cfg.cascade.gamma),
                            max_new_tokens=cfg.task.max_new_tokens, include_stop=cfg.cascade.include_stop)
    loaders = {b: prompts_of(rows, b, pad) for b in (1, 8)}
    tokens = {}
    fns = {}
    for b, ld in loaders.items():
        tokens[f"spec_decode_b{b}"] = float(decode_records(sc, ld)["num_tokens"].sum())
        tokens[f"verifier_b{b}"] = float(plain_decode(pair.large, ld, pair.tokenizer, **decode_args(cfg))["num_tokens"].sum())
        fns[f"spec_decode_b{b}"] = lambda ld=ld: decode_records(sc, ld)
        fns[f"verifier_b{b}"] = lambda ld=ld: plain_decode(pair.large, ld, pair.tokenizer, **decode_args(cfg))
    best = interleaved_best_times(fns, repeats=repeats, warmup=0)
    tps = {k: tokens[k] / best[k] for k in best}
    return {"prompts": len(rows), "tokens_per_second": tps,
            "spec_decode_b8_over_b1": tps["spec_decode_b8"] / tps["spec_decode_b1"],
            "verifier_b8_over_b1": tps["verifier_b8"] / tps["verifier_b1"]}


def quality_latency(pair, cfg: DictConfig, loader: DataLoader, rule: str, alphas: list[float]) -> dict[str, Any]:
    """Large-only vs ``rule`` at each α on the same prompts (one timed pass each, large-only timed twice)."""
    q = cfg.cascade.quality
    large = plain_row("large_only", plain_decode(pair.large, loader, pair.tokenizer, **decode_args(cfg)), q, verifier=True)
    rows = []
    for alpha in [None, *alphas]:
        name, r = ("spec_decode", "spec_decode") if alpha is None else (f"{rule}_{alpha:g}", rule)
        sc = SpeculativeCascade(pair.small, pair.large, pair.tokenizer, rule=r, alpha=alpha, gamma=int(cfg.cascade.gamma),
                                max_new_tokens=cfg.task.max_new_tokens, include_stop=cfg.cascade.include_stop,
                                quality=q)
        rows.append(speculative_row(name, r, alpha, decode_records(sc, loader), q))
    again = plain_row("large_only", plain_decode(pair.large, loader, pair.tokenizer, **decode_args(cfg)), q, verifier=True)
    large_tps = max(large["tokens_per_second"], again["tokens_per_second"])  # the faster of two passes
    table = {row["method"]: {"quality": row["quality"], "tokens_per_second_ratio": row["tokens_per_second"] / large_tps,
                             "verifier_calls_per_token": row["verifier_calls_per_token"],
                             "acceptance_rate": row["acceptance_rate"]} for row in rows}
    matched = [m for m, v in table.items() if m != "spec_decode" and v["quality"] >= large["quality"]]
    best = max(matched, key=lambda m: table[m]["tokens_per_second_ratio"]) if matched else None
    return {"prompts": len(loader.dataset), "quality_metric": q, "large_only_quality": large["quality"],
            "large_only_tokens_per_second": large_tps, "methods": table,
            "at_large_quality": None if best is None else {"method": best, **table[best]},
            "targets": {"tokens_per_second_ratio": "> 1", "verifier_calls_per_token": "<= 0.5"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts for the HF comparison and batching")
    parser.add_argument("--quality-prompts", type=int, default=96)
    parser.add_argument("--rule", default="token_v3")
    parser.add_argument("--alphas", default="0.1,0.3,0.5,0.8")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="HF comparison: tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument("overrides", nargs="*", help="recipes.speculative_cascade key=value overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, preset = load_config("speculative_cascade", ["cascade.quality=token_f1", f"cascade.gamma={args.gamma}",
                                                      "cascade.temperature=0", *args.overrides], CONFIG_DIR)
    pair = load_or_build_pair(cfg.pair, CONFIG_DIR)
    tok = ensure_pad_token(pair.tokenizer)
    pad = int(tok.pad_token_id)
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"pair": str(pair.path or f"{cfg.pair.small} -> {cfg.pair.large}"), "preset": preset,
                               "small_parameters": sum(p.numel() for p in pair.small.parameters()),
                               "large_parameters": sum(p.numel() for p in pair.large.parameters())}
    start = time.perf_counter()
    cfg.task.num_test = max(args.prompts, args.quality_prompts)
    dm = build_task_datamodule(cfg.data, pair)
    loader = next_line_loader(dm, cfg.task, cfg.task.split, cfg.task.num_test, pad)
    prompt_rows = [loader.dataset[i] for i in range(args.prompts)]
    if "hf" not in skip:
        prompts = [row.input_ids[None] for row in prompt_rows]
        results["vs_hf_assisted"] = vs_hf_assisted(pair, prompts, args.gamma, args.max_new_tokens, pad, args.repeats)
    if "batching" not in skip:
        results["batching"] = batching(pair, cfg, prompt_rows, pad, args.repeats)
    if "quality" not in skip:
        q_loader = prompts_of([loader.dataset[i] for i in range(args.quality_prompts)], 8, pad)
        alphas = [float(a) for a in args.alphas.split(",")]
        results["quality_latency"] = quality_latency(pair, cfg, q_loader, args.rule, alphas)
    results["total_seconds"] = time.perf_counter() - start
    write_results("speculative", results)


if __name__ == "__main__":
    main()
