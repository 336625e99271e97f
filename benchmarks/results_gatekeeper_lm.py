"""Results of the Gatekeeper-LM section of docs/lm_cascades.md (Rabanser et al., *Gatekeeper: Improving Model
Cascades Through Confidence Tuning*, arXiv:2502.19335, token-level variant): an α sweep of token-level Gatekeeper
fine-tuning of a small causal LM against next-token (cross-entropy) fine-tuning of equal length, over 3 seeds.

    python -m benchmarks.results_gatekeeper_lm                 # run (or reuse) the runs, write everything
    python -m benchmarks.results_gatekeeper_lm --tables-only   # table.md and the figure from raw.json alone

One ``python -m recipes.gatekeeper_lm preset=sweep seed=<s>`` run per seed (one thread, in
``runs/results_gatekeeper_lm/seed<s>/``; a finished run directory is reused unless ``--rerun``). The pair is one
fixed build (``lm_pair preset=results``, cached) and the test prompts are the same for every seed; the seed sets the
fine-tuning data order (the same for every variant of a seed). Writes ``docs/results/gatekeeper_lm/raw.json`` (per
seed and variant: token-level accuracy, validation loss, s_d, AUROC of the max-probability score against
next-token correctness, the sequence-level small-model token F1 and every Chow rule's deferral scalars; the
commands, wall times, load averages, git commit, machine) and, from that file alone,
``docs/results/gatekeeper_lm/table.md`` and ``docs/img/gatekeeper_lm_sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks._common import git_output, run_seeds, save_figure, shared_legend, write_tables
from benchmarks._common import results_machine as machine
from benchmarks.results_lm_cascade import pair_info
from lit_cascades.effects import mean_std, paired_cell

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "gatekeeper_lm"
RUNS = ROOT / "runs" / "results_gatekeeper_lm"
RECIPE = "recipes.gatekeeper_lm"
SEEDS = [0, 1, 2]
BASELINE = "next_token"
#: per-variant values: token level (validation batches) and sequence level (test prompts)
TOKEN = ("token_small_quality", "val_loss", "token_s_d", "token_auroc")
SEQ_RULES = ("chow_sum", "chow_average", "chow_quantile_0")
RULE_NAMES = {"chow_sum": "Chow-Sum", "chow_average": "Chow-Average", "chow_quantile_0": "Chow-Quantile(0)"}


def alpha_of(variant: str) -> float:
    """``"gatekeeper_a0.7"`` -> 0.7."""
    return float(variant.removeprefix("gatekeeper_a"))


def label(variant: str) -> str:
    return {"pretrained": "small LM as built (no fine-tuning)", BASELINE: "+ next-token (CE) fine-tune"}.get(
        variant, f"+ Gatekeeper-LM α = {alpha_of(variant):g}" if variant.startswith("gatekeeper_a") else variant)


# --------------------------------------------------------------------------------------------------------
# running and collecting
# --------------------------------------------------------------------------------------------------------
def collect_seed(seed: int, run: dict[str, Any]) -> dict[str, Any]:
    from lit_cascades.lm_tasks import val_curve

    out = RUNS / f"seed{seed}"
    m = json.loads((out / "metrics.json").read_text())
    variants = {}
    for name, rec in m.items():
        if not isinstance(rec, dict) or "rules" not in rec:
            continue
        row = {"small_quality": rec["small_quality"], **{k: v for k, v in rec.items() if k.startswith("token_")},
               "rules": rec["rules"]}
        stage = out / "finetune" / name
        if stage.exists():
            row["val_loss"] = val_curve(stage, "val/loss")[-1][1]
        variants[name] = row
    return {"seed": seed, "run": run, "pair": m["pair"], "large_quality": m["large_quality"],
            "finetune": m["finetune"], "variants": variants}


def collect(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    per_seed = [collect_seed(s, runs[s]) for s in SEEDS]
    cfg = OmegaConf.to_container(OmegaConf.load(RUNS / f"seed{SEEDS[0]}" / "config.yaml"))
    pair_dir = Path(per_seed[0]["pair"])
    return {
        "what": "token-level Gatekeeper fine-tuning (arXiv:2502.19335) of an LM pair's small model per α vs "
                "next-token fine-tuning of equal length; token-level deferral on validation batches, sequence-level "
                "cascade (Chow rules) on next-line test prompts, token F1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.results_gatekeeper_lm", "commit": git_output("rev-parse", "HEAD"),
        "machine": machine(), "seeds": SEEDS,
        "setting": {"finetune": cfg["finetune"], "task": cfg["task"], "eval": cfg["eval"],
                    "quality": cfg["cascade"]["quality"]},
        "pair": pair_info(pair_dir) if (pair_dir / "pair.json").exists() else {"dir": str(pair_dir)},
        "per_seed": per_seed,
    }


# --------------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------------
def order(raw: dict[str, Any]) -> list[str]:
    names = raw["per_seed"][0]["variants"]
    gk = sorted((v for v in names if v.startswith("gatekeeper_a")), key=alpha_of)
    return [v for v in ("pretrained", BASELINE) if v in names] + gk


def values(raw: dict[str, Any], variant: str, key: str, rule: str | None = None) -> list[float] | None:
    """``key`` of ``variant`` per seed (a Chow rule's scalar with ``rule``); ``None`` where a variant lacks it."""
    out = []
    for s in raw["per_seed"]:
        v = s["variants"][variant]
        v = v["rules"][rule] if rule else v
        if key not in v:
            return None
        out.append(v[key])
    return out


def cell(vals: list[float] | None) -> str:
    return "–" if vals is None else mean_std(vals)


def table_md(raw: dict[str, Any]) -> str:
    seeds, s = raw["seeds"], raw["setting"]
    ft, pair = s["finetune"], raw["pair"]
    large = [p["large_quality"] for p in raw["per_seed"]]
    res = pair.get("results") or {}
    small_line = (f" (as built, on its test split: small loss {res['small']['test_loss']:.3f}, token acc "
                  f"{res['small']['test_token_acc']:.3f}; large {res['large']['test_loss']:.3f}, "
                  f"{res['large']['test_token_acc']:.3f})") if res else ""
    lines = [
        f"Pair `lm_pair preset={pair.get('preset')}`, one fixed build{small_line}. Fine-tuning of the small LM: "
        f"{ft['steps']} steps at lr {ft['module']['lr']}, batch {ft['batch_size']} × {ft['block_size']} tokens, the "
        f"same data order for every variant of a seed; Gatekeeper normalisation `{ft['module']['normalize']}`. "
        f"Token level: {ft['val_batches']} validation batches, score = max next-token probability, correct = argmax "
        f"is the true next token; s_d against the `{s['eval']['ideal']}` ideal (0 = random, 1 = ideal). Sequence "
        f"level: {s['task']['num_test']} next-line test prompts, greedy, token F1 (large LM alone: "
        f"{mean_std(large)}). Mean ± std over fine-tuning seeds {seeds}.",
        "",
        "| small LM | token acc | val loss (CE) | token s_d | token AUROC | next-line F1 | "
        + " | ".join(f"seq s_d, {RULE_NAMES[r]}" for r in SEQ_RULES) + " |",
        "|---" * (6 + len(SEQ_RULES)) + "|",
    ]
    for v in order(raw):
        cells = [cell(values(raw, v, k)) for k in TOKEN] + [cell(values(raw, v, "small_quality"))]
        cells += [cell(values(raw, v, "s_d", rule)) for rule in SEQ_RULES]
        lines.append(f"| {label(v)} | " + " | ".join(cells) + " |")
    lines += ["", "Each Gatekeeper α minus the next-token fine-tune, paired by seed (mean ± std, the 95% interval of the "
              "mean in brackets; 'beyond seed spread' "
              "= the same sign on every seed and |mean| > 2 std, else noise):", "",
              "| α | Δ token s_d | Δ token acc | Δ next-line F1 | "
              + " | ".join(f"Δ seq s_d, {RULE_NAMES[r]}" for r in SEQ_RULES) + " |", "|---" * (4 + len(SEQ_RULES)) + "|"]
    base = {k: values(raw, BASELINE, k) for k in ("token_s_d", "token_small_quality", "small_quality")}
    for v in order(raw):
        if not v.startswith("gatekeeper_a"):
            continue
        cells = []
        for k in ("token_s_d", "token_small_quality", "small_quality"):
            d = [a - b for a, b in zip(values(raw, v, k), base[k], strict=True)]
            cells.append(paired_cell(d))
        for rule in SEQ_RULES:
            d = [a - b for a, b in zip(values(raw, v, "s_d", rule), values(raw, BASELINE, "s_d", rule), strict=True)]
            cells.append(paired_cell(d))
        lines.append(f"| {alpha_of(v):g} | " + " | ".join(cells) + " |")
    walls = [p["run"]["wall_seconds"] for p in raw["per_seed"]]
    loads = [p["run"]["loadavg"]["after"][1] for p in raw["per_seed"] if p["run"].get("loadavg")]
    load = f" (5-min load average {min(loads):.1f}–{max(loads):.1f} after the runs)" if loads else ""
    lines += ["", f"Run time per seed: {statistics.fmean(walls) / 60:.1f} min wall (min {min(walls) / 60:.1f}, max "
              f"{max(walls) / 60:.1f}), one torch thread on a 2-core machine shared with other jobs{load}. Commands: "
              f"`{raw['per_seed'][0]['run']['command']}` and likewise per seed. Raw: "
              "`docs/results/gatekeeper_lm/raw.json`; figure: `docs/img/gatekeeper_lm_sweep.png`."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------------------------------------
PANELS = (("token_s_d", None, "token-level s_d (deferral performance)"),
          ("token_small_quality", None, "small LM next-token accuracy"),
          ("val_loss", None, "small LM validation loss (CE, nats/token)"),
          ("small_quality", None, "small LM next-line token F1"),
          ("s_d", "chow_sum", "sequence-level s_d, Chow-Sum"),
          ("s_d", "chow_quantile_0", "sequence-level s_d, Chow-Quantile(0)"))


def figure(raw: dict[str, Any]) -> Path:
    """One panel per metric against α: Gatekeeper-LM with ±1 std error bars (α labelled on every point); the
    next-token fine-tune of equal length as a horizontal line with a ±1 std band (and the untouched small LM where
    it has the value); s_d panels add random deferral (s_d = 0)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    seeds = raw["seeds"]
    gk = [v for v in order(raw) if v.startswith("gatekeeper_a")]
    alphas = [alpha_of(v) for v in gk]
    fig, grid = plt.subplots(2, 3, figsize=(14, 7.8))
    axes = grid.ravel()
    refs = {BASELINE: ("tab:orange", "next-token (CE) fine-tune, same steps (baseline)"),
            "pretrained": ("tab:gray", "small LM as built (no fine-tuning)")}
    for ax, (key, rule, name) in zip(axes, PANELS, strict=True):
        for variant, (color, ref_label) in refs.items():
            vals = values(raw, variant, key, rule)
            if vals is None:
                continue
            mean, std = statistics.fmean(vals), statistics.stdev(vals)
            ax.axhline(mean, color=color, ls="--", lw=1.2, label=ref_label)
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.15)
        per = [values(raw, v, key, rule) for v in gk]
        means = [statistics.fmean(p) for p in per]
        ax.errorbar(alphas, means, yerr=[statistics.stdev(p) for p in per], marker="o", capsize=3,
                    color="tab:blue", label="Gatekeeper-LM fine-tune (α swept)")
        for a, y in zip(alphas, means, strict=True):
            ax.annotate(f"α={a:g}", (a, y), textcoords="offset points", xytext=(4, 5), fontsize=7)
        if key == "s_d" or key == "token_s_d":
            ax.axhline(0.0, color="black", ls=":", lw=1, label="random deferral (s_d = 0; ideal = 1)")
        if key == "small_quality":
            large = statistics.fmean(p["large_quality"] for p in raw["per_seed"])
            ax.axhline(large, color="tab:green", ls=":", lw=1.2, label=f"large LM alone ({large:.3f})")
        ax.set_xlabel("Gatekeeper α (weight of CE on correctly predicted tokens)")
        ax.set_ylabel(name)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    shared_legend(fig, axes)
    fig.suptitle(f"Gatekeeper-LM α sweep (token level: validation batches; sequence level: next-line test prompts). "
                 f"Error bars and bands: ±1 std over {len(seeds)} fine-tuning seeds {seeds}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return save_figure(fig, "gatekeeper_lm_sweep.png")


def tables(raw: dict[str, Any]) -> dict[str, str]:
    """``{file name: text}`` of every table in ``OUT`` made from ``raw``."""
    return {"table.md": table_md(raw)}


def write_outputs() -> None:
    raw = json.loads((OUT / "raw.json").read_text())
    write_tables(OUT, tables(raw))
    print(f"wrote {figure(raw).relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables-only", action="store_true", help="regenerate table.md and the figure from raw.json")
    p.add_argument("--rerun", action="store_true", help="run again even where a finished run directory exists")
    args = p.parse_args(argv)
    if not args.tables_only:
        runs = run_seeds(RECIPE, lambda seed: ["preset=sweep", f"seed={seed}"], RUNS, SEEDS, args.rerun)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "raw.json").write_text(json.dumps(collect(runs), indent=1) + "\n")
    write_outputs()


if __name__ == "__main__":
    main()
