"""Batch-1 speculative decoding of SmolLM2-135M-Instruct with its EAGLE feature drafter, by draft length γ.

    python -m benchmarks.feature_drafter_gamma [--preset smollm2_feature_drafter_xl] [--gammas 1,2,3,4]
                                               [--prompts 6] [--max-new-tokens 32] [--alternations 10]

``spec_decode`` ("EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", arXiv:2401.15077, drafter
of ``recipes.lm_pair preset=<--preset>``, built into the pair cache on first use) at each constant γ of
``--gammas`` and with HF's adaptive schedule (``gamma_schedule="heuristic"``, starting at the largest γ), against
the verifier's own greedy ``generate``: the first ``--prompts`` next-line prompts of the stdlib corpus, batch 1,
``--max-new-tokens`` tokens without a stop. Every side's tokens are first checked equal to the verifier's greedy
output; then all sides alternate (``benchmarks._common.interleaved_ratios``, baseline: the verifier's greedy
decoding), one thread. Per side: the median per-alternation time ratio with its min-max, tokens per verifier call
and acceptance rate. A speed-up needs the verifier's forward over γ + 1 tokens plus γ drafter steps to cost less
than the tokens a round emits; the sweep shows which γ gets there on this CPU. No target row: a measurement for
the docs. Writes ``docs/results/benchmarks/feature_drafter_gamma.json`` and from it
``feature_drafter_gamma.table.md`` (``--tables-only``: the table alone, from the committed JSON).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._common import RESULTS, Run, interleaved_ratios, write_tables
from benchmarks.speculative import (
    checked_decoding,
    greedy_kwargs,
    load_task_pair,
    spec_decode_prompts,
    verifier_greedy_prompts,
)


def sides(drafter, verifier, prompts: list[torch.Tensor], gammas: list[int],
          max_new: int) -> tuple[dict[str, Callable[[], None]], dict[str, dict[str, Any]]]:
    """The timed functions (``verifier_greedy``, ``gamma_<g>``, ``adaptive``) and each speculative side's decoding
    statistics, after checking its tokens against the verifier's greedy ``generate``."""
    kw = greedy_kwargs(max_new)
    settings = {f"gamma_{g}": (g, "constant") for g in gammas} | {"adaptive": (max(gammas), "heuristic")}
    stats = {name: {**checked_decoding(drafter, verifier, prompts, g, schedule, max_new,
                                       lambda p, mask: verifier.generate(p, attention_mask=mask, **kw),
                                       "the verifier's greedy generate"), "gamma": g, "schedule": schedule}
             for name, (g, schedule) in settings.items()}
    fns = {name: spec_decode_prompts(drafter, verifier, prompts, g, schedule, max_new)
           for name, (g, schedule) in settings.items()}
    return {"verifier_greedy": verifier_greedy_prompts(verifier, prompts, max_new), **fns}, stats


def render(payload: dict[str, Any]) -> str:
    """The table of ``feature_drafter_gamma.json`` (its content alone)."""
    set_, dec, ratios = payload["setting"], payload["decoding"], payload["ratios"]
    lines = ["| draft length | time / verifier greedy (median, min–max) | tokens / verifier call | acceptance rate |",
             "|---|---|---|---|"]
    for name, d in dec.items():
        r = ratios[name]
        label = f"γ = {d['gamma']}" if d["schedule"] == "constant" else f"adaptive (HF's schedule from γ = {d['gamma']})"
        lines.append(f"| {label} | {r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f}) | "
                     f"{d['tokens_per_verifier_call']:.2f} | {d['acceptance_rate']:.3f} ({d['accepted']}/{d['drafted']}) |")
    load = payload["load"]
    return "\n".join(lines) + (
        f"\n\nBatch 1, {set_['prompts']} next-line prompts × {set_['max_new_tokens']} new tokens without a stop; "
        f"{set_['pair']}; every side's tokens equal SmolLM2's greedy `generate`. {payload['alternations']} interleaved "
        f"rounds after warm-up, one thread, {payload['machine']['cpu']}, load average (1 min) "
        f"{load['loadavg_start'][0]:.1f} → {load['loadavg_end'][0]:.1f} (a shared 2-core machine). Tokens per verifier "
        "call count the prompt's prefill call. Raw: `docs/results/benchmarks/feature_drafter_gamma.json` "
        f"(`{payload['command'].strip()}`).\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2_feature_drafter_xl")
    parser.add_argument("--gammas", default="1,2,3,4")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--alternations", type=int, default=10)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args(argv)
    if args.tables_only:
        payload = json.loads((RESULTS / "feature_drafter_gamma.json").read_text())
        write_tables(RESULTS, {"feature_drafter_gamma.table.md": render(payload)})
        return
    gammas = [int(g) for g in args.gammas.split(",") if g]
    if not gammas or min(gammas) < 1:
        raise SystemExit(f"--gammas must list integers >= 1; got {args.gammas!r}")
    torch.set_num_threads(1)
    run = Run("feature_drafter_gamma")
    task = load_task_pair("smollm2_feature", argparse.Namespace(
        overrides=[], smollm2_preset=None, feature_preset=args.preset, gamma=max(gammas), prompts=args.prompts,
        cache_batch=1, batching_prompts=1, rule_prompts=1))
    prompts = [r.input_ids[None] for r in task["rows"][:args.prompts]]
    fns, stats = sides(task["drafter"], task["verifier"], prompts, gammas, args.max_new_tokens)
    timing = interleaved_ratios(fns, baseline="verifier_greedy", alternations=args.alternations)
    path = run.write({"setting": {**{k: v for k, v in vars(args).items() if k != "tables_only"},
                                  "pair": task["label"]}, "decoding": stats, **timing})
    write_tables(RESULTS, {"feature_drafter_gamma.table.md": render(json.loads(path.read_text()))})
    for name in stats:
        r = timing["ratios"][name]
        print(f"{name}: {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) x verifier greedy, "
              f"{stats[name]['tokens_per_verifier_call']:.2f} tokens/call", flush=True)


if __name__ == "__main__":
    main()
