"""Speculative cascades: deferral rules executed by speculative decoding (Narasimhan et al., ICLR 2025).

    python -m recipes.speculative_cascade                          # pair in runs/lm_pair/latest, α sweep per rule
    python -m recipes.speculative_cascade rule=token_v3 alpha=0.3 gamma=4 temperature=0
    python -m recipes.speculative_cascade preset=sampling          # temperature 1, token-F1 quality
    python -m recipes.speculative_cascade preset=smollm2           # SmolLM2-135M verifier, its first layers as drafter
    python -m recipes.speculative_cascade preset=smoke             # seconds (tests)

Task: next-line completion on held-out files of the pair's corpus (the LM-cascade task, same prompts for every
method). For every method the recipe decodes ``task.num_test`` prompts in batches of ``task.batch_size`` and
records quality, wall time, tokens/s, verifier and drafter forwards and (speculative methods) acceptance rate
and tokens per verifier call:

* baselines: ``small_only`` and ``large_only`` (plain autoregressive HF decoding), ``spec_decode`` (exact
  speculative decoding), and the sequence-level cascade (Chow-Average on the small model's output, the
  LM-cascade rule) at the deferral rates ``seq_cascade_rates``; its cost is modelled from the measured per-prompt
  costs of the two models (small always + large on the deferred prompts);
* the speculative cascades: each rule of ``sweep.rules`` at each α of ``sweep.alphas.<rule>`` (lossy
  speculative decoding is the rule ``lossy``), or only ``rule``/``alpha`` when ``rule=`` is given.

Outputs: ``methods.csv`` (one row per method), ``quality_latency.png`` (quality vs latency relative to
``large_only`` and quality vs verifier calls per emitted token) and ``metrics.json``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lit_cascades.data.lm import collate_prompts, ensure_pad_token, newline_counts, next_line
from lit_cascades.functional.sequence_scores import sequence_scores
from lit_cascades.functional.text import QUALITY_FUNCTIONS, text_quality
from lit_cascades.models.generation import greedy_generate
from lit_cascades.models.lm_pair import model_vocab_size
from lit_cascades.modules.lm_cascade import concat_records
from lit_cascades.modules.speculative_cascade import SpeculativeCascade
from lit_cascades.runner import Run, main
from recipes.lm_cascade import task_datamodule
from recipes.lm_pair import load_or_build_pair, set_threads

COLUMNS = ("method", "rule", "alpha", "quality", "exact_match", "token_f1", "seconds_per_prompt", "relative_latency",
           "tokens_per_second", "verifier_calls_per_prompt", "verifier_calls_per_token", "drafter_calls_per_prompt",
           "acceptance_rate", "tokens_per_verifier_call", "deferral_rate")


def prompts_loader(cfg: DictConfig, pair) -> DataLoader:
    """The next-line prompts every method decodes (left-padded batches)."""
    task = cfg.task
    dm = task_datamodule(cfg, pair)
    ds = dm.next_line_dataset(task.split, num_examples=task.num_test, context_tokens=task.context_tokens,
                              max_target_tokens=task.max_new_tokens, min_context_lines=task.min_context_lines,
                              seed=task.seed)
    return DataLoader(ds, batch_size=task.batch_size, shuffle=False,
                      collate_fn=collate_prompts(ensure_pad_token(pair.tokenizer).pad_token_id))


def plain_decode(model, loader: DataLoader, tokenizer, cfg: DictConfig) -> dict[str, Any]:
    """Autoregressive decoding of every prompt with one model (greedy at T = 0, sampling otherwise).

    Records per prompt: qualities, output length, ``seconds`` (batch time / batch size), ``forwards`` (one per
    generated token, the stop token included), per-token log-probs for the sequence-level cascade.
    """
    task = cfg.task
    counts = newline_counts(tokenizer, model_vocab_size(model))
    torch.manual_seed(cfg.seed)
    out: list[dict[str, Any]] = []
    for batch in loader:
        start = time.perf_counter()
        gen = greedy_generate(model, batch["input_ids"], batch["attention_mask"], task.max_new_tokens, counts,
                              tokenizer.pad_token_id, num_stops=2, include_stop=task.include_stop,
                              temperature=float(cfg.temperature))
        seconds = time.perf_counter() - start
        b = gen.tokens.shape[0]
        texts = [next_line(t) for t in tokenizer.batch_decode([row[m].tolist() for row, m in zip(gen.tokens, gen.mask)],
                                                              skip_special_tokens=True)]
        forwards = gen.mask.sum(-1) + (gen.stopped & (not task.include_stop)).long()  # one per generated token
        rec = {"logprobs": gen.logprobs, "mask": gen.mask, "num_tokens": forwards, "forwards": forwards, "seconds": torch.full((b,), seconds / b, dtype=torch.float64)}
        for metric in QUALITY_FUNCTIONS:
            rec[metric] = text_quality(texts, batch["target"], metric)
        out.append(rec)
    return concat_records(out)


def speculative_decode(r: Run, module: SpeculativeCascade, loader: DataLoader) -> dict[str, Any]:
    """Records of the module's ``predict_step`` over every prompt (a fresh RNG at the module's seed)."""
    module.reset_generator()
    trainer = r.trainer("decode", checkpoint=False, logger=False, enable_progress_bar=False)
    return concat_records(trainer.predict(module, dataloaders=loader))


def plain_row(name: str, rec: dict[str, Any], quality: str, verifier: bool) -> dict[str, Any]:
    seconds = float(rec["seconds"].sum())
    calls = float(rec["forwards"].float().mean()) if verifier else 0.0
    tokens = float(rec["num_tokens"].float().sum())
    return {"method": name, "rule": "", "alpha": math.nan, "quality": float(rec[quality].mean()),
            "exact_match": float(rec["exact_match"].mean()), "token_f1": float(rec["token_f1"].mean()),
            "seconds_per_prompt": float(rec["seconds"].mean()), "tokens_per_second": tokens / max(seconds, 1e-12),
            "verifier_calls_per_prompt": calls, "verifier_calls_per_token": calls * len(rec["seconds"]) / max(tokens, 1),
            "drafter_calls_per_prompt": 0.0 if verifier else float(rec["forwards"].float().mean()),
            "acceptance_rate": math.nan, "tokens_per_verifier_call": math.nan,
            "deferral_rate": 1.0 if verifier else 0.0}


def speculative_row(name: str, rule: str, alpha: float | None, rec: dict[str, Any], quality: str) -> dict[str, Any]:
    seconds = float(rec["seconds"].sum())
    tokens = float(rec["num_tokens"].float().sum())
    calls = float(rec["verifier_calls"].float().sum())
    n = len(rec["seconds"])
    return {"method": name, "rule": rule, "alpha": math.nan if alpha is None else float(alpha),
            "quality": float(rec[quality].mean()), "exact_match": float(rec["exact_match"].mean()),
            "token_f1": float(rec["token_f1"].mean()), "seconds_per_prompt": seconds / n,
            "tokens_per_second": tokens / max(seconds, 1e-12), "verifier_calls_per_prompt": calls / n,
            "verifier_calls_per_token": calls / max(tokens, 1),
            "drafter_calls_per_prompt": float(rec["drafter_calls"].float().mean()),
            "acceptance_rate": float(rec["accepted"].sum() / rec["drafted"].sum().clamp(min=1)),
            "tokens_per_verifier_call": tokens / max(calls, 1),
            "deferral_rate": 1.0 - float(rec["accepted"].sum() / rec["drafted"].sum().clamp(min=1))}


def sequence_cascade_rows(small: dict[str, Any], large: dict[str, Any], rates: list[float],
                          quality: str) -> list[dict[str, Any]]:
    """The sequence-level cascade (Chow-Average on the small model's greedy output) at each deferral rate.

    Prompts with the lowest Chow-Average are deferred; latency per prompt = small time + large time of the
    deferred prompts (from the two plain runs); verifier calls = the large model's forwards on them.
    """
    conf = sequence_scores(small["logprobs"], small["mask"])["chow_average"]
    order = torch.argsort(conf)  # least confident first
    n = conf.numel()
    rows = []
    for rate in rates:
        deferred = torch.zeros(n, dtype=torch.bool)
        deferred[order[: round(rate * n)]] = True
        q = {m: torch.where(deferred, large[m], small[m]) for m in QUALITY_FUNCTIONS}
        seconds = float(small["seconds"].sum() + large["seconds"][deferred].sum())
        tokens = float(torch.where(deferred, large["num_tokens"], small["num_tokens"]).float().sum())
        calls = float(large["forwards"][deferred].float().sum())
        rows.append({"method": f"seq_cascade_{rate:g}", "rule": "chow_average", "alpha": rate,
                     "quality": float(q[quality].mean()), "exact_match": float(q["exact_match"].mean()),
                     "token_f1": float(q["token_f1"].mean()), "seconds_per_prompt": seconds / n,
                     "tokens_per_second": tokens / max(seconds, 1e-12), "verifier_calls_per_prompt": calls / n,
                     "verifier_calls_per_token": calls / max(tokens, 1),
                     "drafter_calls_per_prompt": float(small["forwards"].float().mean()),
                     "acceptance_rate": math.nan, "tokens_per_verifier_call": math.nan, "deferral_rate": rate})
    return rows


def plot_methods(rows: list[dict[str, Any]], quality: str):
    """Quality vs relative latency and vs verifier calls per token: rules as lines over α, baselines as marks."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key = row["rule"] if row["method"].startswith(("spec_", "seq_cascade")) and row["rule"] not in ("", "spec_decode") \
            else row["method"]
        groups.setdefault(key, []).append(row)
    for ax, x_key, label in ((axes[0], "relative_latency", "latency / large-only latency"),
                             (axes[1], "verifier_calls_per_token", "verifier calls per emitted token")):
        for i, (name, group) in enumerate(groups.items()):
            group = sorted(group, key=lambda g: g[x_key])
            xs, ys = [g[x_key] for g in group], [g["quality"] for g in group]
            style = "o-" if len(group) > 1 else "s"
            ax.plot(xs, ys, style, color=f"C{i % 10}", label=name, ms=5 if len(group) > 1 else 8)
        ax.set_xlabel(label)
        ax.set_ylabel(quality)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    set_threads(cfg.threads)
    pair = load_or_build_pair(cfg.pair, r)
    tok = ensure_pad_token(pair.tokenizer)
    loader = prompts_loader(cfg, pair)
    task, q = cfg.task, cfg.task.quality
    # warm both models up (first-call allocations would otherwise be billed to the first method)
    warm = next(iter(loader))
    for model in (pair.small, pair.large):
        greedy_generate(model, warm["input_ids"][:2], warm["attention_mask"][:2], 2, [tok.pad_token_id], tok.pad_token_id)

    small = plain_decode(pair.small, loader, tok, cfg)
    large = plain_decode(pair.large, loader, tok, cfg)
    rows = [plain_row("small_only", small, q, verifier=False), plain_row("large_only", large, q, verifier=True)]
    if cfg.baselines.seq_cascade_rates and cfg.temperature == 0:
        rows += sequence_cascade_rows(small, large, list(cfg.baselines.seq_cascade_rates), q)

    if cfg.rule is not None:
        runs = [(str(cfg.rule), None if cfg.alpha is None else float(cfg.alpha))]
    else:
        runs = [(rule, float(a)) for rule in cfg.sweep.rules for a in cfg.sweep.alphas[rule]]
    if cfg.baselines.spec_decode and all(rule != "spec_decode" for rule, _ in runs):
        runs.insert(0, ("spec_decode", None))
    common = dict(gamma=int(cfg.gamma), temperature=float(cfg.temperature), max_new_tokens=task.max_new_tokens,
                  bonus=cfg.bonus, include_stop=task.include_stop, quality=q, seed=cfg.seed)
    for rule, alpha in runs:
        module = SpeculativeCascade(pair.small, pair.large, tok, rule=rule, alpha=alpha, **common)
        rec = speculative_decode(r, module, loader)
        name = "spec_decode" if rule == "spec_decode" else f"spec_{rule}_{alpha:g}"
        rows.append(speculative_row(name, rule, alpha, rec, q))
        print(f"[speculative_cascade] {name}: {q}={rows[-1]['quality']:.4f} "
              f"accept={rows[-1]['acceptance_rate']:.3f} s/prompt={rows[-1]['seconds_per_prompt']:.4f}")

    large_seconds = rows[1]["seconds_per_prompt"]
    for row in rows:
        row["relative_latency"] = row["seconds_per_prompt"] / max(large_seconds, 1e-12)
    r.save_table("methods", COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
    r.save_figure("quality_latency", plot_methods(rows, q))
    methods = {row["method"]: {c: row[c] for c in COLUMNS if c != "method"} for row in rows}
    matched = [row for row in rows if row["method"].startswith("spec_") and row["quality"] >= rows[1]["quality"]]
    best = min(matched, key=lambda row: row["seconds_per_prompt"]) if matched else None
    return {
        "pair": pair.path or f"{cfg.pair.small} -> {cfg.pair.large}",
        "task": {"quality": q, "n_test": len(small["seconds"]), "split": task.split,
                 "max_new_tokens": task.max_new_tokens},
        "settings": OmegaConf.to_container(cfg, resolve=True)["sweep"] | {"gamma": cfg.gamma,
                                                                          "temperature": cfg.temperature,
                                                                          "bonus": cfg.bonus},
        "methods": methods,
        "fastest_at_large_quality": None if best is None else {
            "method": best["method"], "relative_latency": best["relative_latency"],
            "speedup_vs_large": 1.0 / max(best["relative_latency"], 1e-12),
            "verifier_calls_per_token": best["verifier_calls_per_token"]},
    }


if __name__ == "__main__":
    main("speculative_cascade", run)
