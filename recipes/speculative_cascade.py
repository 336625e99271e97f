"""Speculative cascades: deferral rules executed by speculative decoding (Narasimhan et al., ICLR 2025).

    python -m recipes.speculative_cascade                          # pair of lm_pair preset=default, α sweep per rule
    python -m recipes.speculative_cascade rule=token_v3 alpha=0.3 cascade.gamma=4 cascade.temperature=0
    python -m recipes.speculative_cascade preset=sampling          # temperature 1, token-F1 quality
    python -m recipes.speculative_cascade preset=smollm2           # SmolLM2-135M verifier, its first layers as drafter
    python -m recipes.speculative_cascade preset=smoke             # seconds (tests)

Task: next-line completion on held-out files of the pair's corpus (the LM-cascade task, same prompts for every
method). Before any decoding the recipe loads the pair, builds the prompts and one ``cascade`` module
(:class:`~lit_cascades.modules.speculative_cascade.SpeculativeCascade`) per rule and α, so a bad value
(``cascade.gamma=0``, ``rule=foo``, an α out of range) stops it within seconds. Each method is a stage
``decode/<method>`` whose records (quality, wall time, tokens, verifier and drafter forwards, acceptance) are
memoised in ``<stage>/records.pt``; ``task.num_test`` prompts are decoded in batches of ``task.batch_size``:

* baselines: ``small_only`` and ``large_only`` (plain autoregressive HF decoding), ``spec_decode`` (exact
  speculative decoding), and the sequence-level cascade (Chow-Average on the small model's output, the
  LM-cascade rule) at the deferral rates ``baselines.seq_cascade_rates``; its cost is modelled from the measured
  per-prompt costs of the two models (small always + large on the deferred prompts);
* the speculative cascades: each rule of ``sweep.rules`` at each α of ``sweep.alphas.<rule>`` (lossy
  speculative decoding is the rule ``lossy``), or only ``rule``/``alpha`` when ``rule=`` is given.

``drafter=feature`` drafts with the pair's EAGLE feature drafter (:class:`~lit_cascades.models.feature_drafter.
FeatureDrafter`, built by an ``lm_pair`` preset with a ``drafter`` section) instead of its small LM; ``small_only``
and the sequence-level cascade still use the small LM.

Outputs: ``methods.csv`` (one row per method; ``deferral_rate`` is the rule's: the share of emitted tokens at
which its target puts weight on the large model, 1 for ``spec_decode``; ``rejection_rate`` is the share of
drafts rejected by the accept/reject step), ``quality_latency.png`` (quality vs latency relative to
``large_only`` and quality vs verifier calls per emitted token) and ``metrics.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lit_cascades.functional.speculative import RULES, check_rule
from lit_cascades.lm_tasks import (
    build_task_datamodule,
    check_pair_section,
    check_task,
    generate_records,
    load_or_build_pair,
    next_line_loader,
    pair_name,
    plain,
    plain_decode,
    plain_row,
    sequence_cascade_rows,
    speculative_row,
)
from lit_cascades.models.generation import greedy_generate
from lit_cascades.runner import ConfigError, Run, build, config_errors, main

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: what drafts for the speculative methods: the pair's small LM, or its EAGLE feature drafter (``pair.drafter``)
DRAFTERS = ("small", "feature")
COLUMNS = ("method", "rule", "alpha", "quality", "exact_match", "token_f1", "seconds_per_prompt", "relative_latency",
           "tokens_per_second", "verifier_calls_per_prompt", "verifier_calls_per_token", "drafter_calls_per_prompt",
           "acceptance_rate", "tokens_per_verifier_call", "rejection_rate", "deferral_rate")


def methods_to_run(cfg: DictConfig) -> list[tuple[str, float | None]]:
    """``[(rule, alpha)]`` of the run (``rule``/``alpha``, else the sweep), checked: unknown rules and α out of
    range are config errors naming their key."""
    if cfg.rule is not None:
        if cfg.rule not in RULES:
            raise ConfigError(f"unknown rule {cfg.rule!r}; choose one of {list(RULES)}", key="rule")
        alpha = None if cfg.alpha is None else float(cfg.alpha)
        with config_errors("alpha"):
            check_rule(str(cfg.rule), alpha)
        runs: list[tuple[str, float | None]] = [(str(cfg.rule), alpha)]
    else:
        runs = []
        for rule in cfg.sweep.rules:
            if rule not in RULES:
                raise ConfigError(f"unknown rule {rule!r}; choose from {list(RULES)}", key="sweep.rules")
            if rule not in cfg.sweep.alphas:
                raise ConfigError(f"no α list for rule {rule!r}", key=f"sweep.alphas.{rule}")
            for a in cfg.sweep.alphas[rule]:
                with config_errors(f"sweep.alphas.{rule}"):
                    check_rule(str(rule), float(a))
                runs.append((str(rule), float(a)))
    if cfg.baselines.spec_decode and all(rule != "spec_decode" for rule, _ in runs):
        runs.insert(0, ("spec_decode", None))
    return runs


def method_name(rule: str, alpha: float | None) -> str:
    return "spec_decode" if rule == "spec_decode" else f"spec_{rule}_{alpha if alpha is not None else 0:g}"


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
    task = cfg.task
    check_pair_section(cfg.pair)
    check_task(task)
    runs = methods_to_run(cfg)
    if cfg.get("drafter", "small") not in DRAFTERS:
        raise ConfigError(f"unknown drafter {cfg.drafter!r}; choose one of {list(DRAFTERS)}", key="drafter")
    pair = load_or_build_pair(cfg.pair, CONFIG_DIR)
    drafter = pair.small
    if cfg.get("drafter") == "feature":
        if pair.drafter is None:
            raise ConfigError(f"the pair {pair_name(pair, cfg.pair)} has no feature drafter; build one with "
                              "`python -m recipes.lm_pair preset=smollm2_feature_drafter` (a `drafter` section) "
                              "or use drafter=small", key="drafter")
        drafter = pair.drafter

    # -- build everything before any work ---------------------------------------------------------------
    dm = build_task_datamodule(cfg.data, pair)
    tok = dm.get_tokenizer()
    loader = next_line_loader(dm, task, task.split, task.num_test, tok.pad_token_id)
    modules = {method_name(rule, alpha): (rule, alpha, build(cfg.cascade, "cascade", drafter=drafter,
                                                                verifier=pair.large, tokenizer=tok, rule=rule,
                                                                alpha=alpha))
               for rule, alpha in runs}
    h = next(iter(modules.values()))[2].hparams if modules else build(
        cfg.cascade, "cascade", drafter=drafter, verifier=pair.large, tokenizer=tok).hparams
    q = h.quality
    decode_args = dict(max_new_tokens=h.max_new_tokens, include_stop=h.include_stop, temperature=h.temperature,
                       seed=int(cfg.seed))

    # warm both models up (first-call allocations would otherwise be billed to the first method)
    warm = next(iter(loader))
    for model in (pair.small, pair.large):
        greedy_generate(model, warm["input_ids"][:2], warm["attention_mask"][:2], 2, [tok.pad_token_id], tok.pad_token_id)

    def stage(name: str, config: dict[str, Any]) -> Any:
        feature = {"drafter": "feature"} if drafter is not pair.small else {}  # (memoised records: per drafter)
        return r.stage(f"decode/{name}", kind="decode", config={"method": name, "task": plain(task),
                                                                "cascade": plain(cfg.cascade), **feature, **config})

    plain_records = {}
    for name, model in (("small_only", pair.small), ("large_only", pair.large)):
        st = stage(name, {})
        plain_records[name] = st.cached("records", lambda m=model, n=name: plain_decode(
            m, loader, tok, desc=f"decoding ({n})", **decode_args))
    small, large = plain_records["small_only"], plain_records["large_only"]
    rows = [plain_row("small_only", small, q, verifier=False), plain_row("large_only", large, q, verifier=True)]
    for row, name in zip(rows, ("small_only", "large_only")):
        r.stages[f"decode/{name}"].finish(row)
    if cfg.baselines.seq_cascade_rates and h.temperature == 0:
        rows += sequence_cascade_rows(small, large, list(cfg.baselines.seq_cascade_rates), q)

    for name, (rule, alpha, module) in modules.items():
        st = stage(name, {"rule": rule, "alpha": alpha})
        rec = st.cached("records", lambda m=module, n=name: generate_records(m, loader, desc=f"decoding ({n})"))
        rows.append(speculative_row(name, rule, alpha, rec, q))
        st.finish(rows[-1])
        print(f"[speculative_cascade] {name}: {q}={rows[-1]['quality']:.4f} "
              f"accept={rows[-1]['acceptance_rate']:.3f} s/prompt={rows[-1]['seconds_per_prompt']:.4f}")

    large_seconds = rows[1]["seconds_per_prompt"]
    for row in rows:
        row["relative_latency"] = row["seconds_per_prompt"] / max(large_seconds, 1e-12)
    for row in rows:  # the plain and sequence-cascade rows have no draft rejections
        row.setdefault("rejection_rate", math.nan)
    r.save_table("methods", COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
    r.save_figure("quality_latency", plot_methods(rows, q))
    methods = {row["method"]: {c: row[c] for c in COLUMNS if c != "method"} for row in rows}
    matched = [row for row in rows if row["method"].startswith("spec_") and row["quality"] >= rows[1]["quality"]]
    best = min(matched, key=lambda row: row["seconds_per_prompt"]) if matched else None
    return {
        "pair": pair_name(pair, cfg.pair),
        "task": {"quality": q, "n_test": len(small["seconds"]), "split": task.split,
                 "max_new_tokens": h.max_new_tokens},
        "settings": plain(cfg.sweep) | {"gamma": h.gamma, "temperature": h.temperature, "bonus": h.bonus},
        "methods": methods,
        "fastest_at_large_quality": None if best is None else {
            "method": best["method"], "relative_latency": best["relative_latency"],
            "speedup_vs_large": 1.0 / max(best["relative_latency"], 1e-12),
            "verifier_calls_per_token": best["verifier_calls_per_token"]},
    }


if __name__ == "__main__":
    main("speculative_cascade", run)
