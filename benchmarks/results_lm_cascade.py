"""Results of the LM-cascade section of docs/lm_cascades.md (Gupta et al., *Language Model Cascades: Token-level
Uncertainty and Beyond*, arXiv:2404.10136): Chow-Sum, Chow-Average, Chow-Quantile and the post-hoc learned
deferral rules on one LM pair, over 3 seeds.

    python -m benchmarks.results_lm_cascade                 # run (or reuse) the runs, write everything
    python -m benchmarks.results_lm_cascade --tables-only   # table.md and the figure from raw.json alone

One ``python -m recipes.lm_cascade preset=results seed=<s> task.seed=<s> post_hoc.seeds=[<s>]`` run per seed (one
thread, in ``runs/results_lm_cascade/seed<s>/``; a finished run directory is reused unless ``--rerun``). The pair is
one fixed build (``lm_pair preset=results``, trained once into the cache by the first run); a seed draws another
sample of training and test prompts and initialises the post-hoc MLPs differently, so the spread covers the prompt
sample and the MLP seed, not the pair. Writes ``docs/results/lm_cascade/raw.json`` (every rule's scalars per seed,
the quality at fixed deferral rates, the deferral curves on 51 rates, the pair's own test metrics, the commands,
wall times, load averages, git commit, machine) and, from that file alone, ``docs/results/lm_cascade/table.md``
and ``docs/img/lm_cascade_rules.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks._common import git_output, run_seeds, save_figure, write_tables
from benchmarks._common import results_machine as machine
from lit_cascades.effects import mean_std, paired_cell

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "lm_cascade"
RUNS = ROOT / "runs" / "results_lm_cascade"
RECIPE = "recipes.lm_cascade"
SEEDS = [0, 1, 2]
RATES = (0.1, 0.2, 0.3, 0.5)
CURVE_POINTS = 51
CHOW = ("chow_sum", "chow_average", "chow_quantile_0", "chow_quantile_0.25", "chow_quantile_0.5")
POST_HOC = ("post_hoc_quantile", "post_hoc_embed1", "post_hoc_embed1+2")
NAMES = {"chow_sum": "Chow-Sum", "chow_average": "Chow-Average", "chow_quantile_0": "Chow-Quantile(0)",
         "chow_quantile_0.25": "Chow-Quantile(0.25)", "chow_quantile_0.5": "Chow-Quantile(0.5)",
         "post_hoc_quantile": "Post-Hoc-Quantile", "post_hoc_embed1": "Post-Hoc-Embed-1",
         "post_hoc_embed1+2": "Post-Hoc-Embed-1+2"}
SCALARS = ("auc_df", "auc_gain", "s_d", "auroc")


def overrides(seed: int) -> list[str]:
    return ["preset=results", f"seed={seed}", f"task.seed={seed}", f"post_hoc.seeds=[{seed}]"]


# --------------------------------------------------------------------------------------------------------
# running and collecting
# --------------------------------------------------------------------------------------------------------
def rule_name(name: str, seed: int) -> str | None:
    """The seed-free name of a rule in a run's metrics/curves (``post_hoc_embed1_seed2`` -> ``post_hoc_embed1``);
    ``None`` for the recipe's own over-seeds summary entries."""
    if name.startswith("post_hoc_"):
        return name.removesuffix(f"_seed{seed}") if name.endswith(f"_seed{seed}") else None
    return name


def read_curves(path: Path, seed: int) -> dict[str, list[float]]:
    """The deferral-curve CSV of a run as ``{column: values}`` (rule columns renamed by :func:`rule_name`)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], [[float(v) for v in r] for r in rows[1:]]
    return {rule_name(c, seed) or c: [r[i] for r in body] for i, c in enumerate(header)}


def value_at(curves: dict[str, list[float]], column: str, rate: float) -> float:
    """A curve's value at the tabulated deferral rate nearest ``rate``."""
    rates = curves["rate"]
    i = min(range(len(rates)), key=lambda j: abs(rates[j] - rate))
    return curves[column][i]


def pair_info(pair_dir: Path) -> dict[str, Any]:
    """The pair's own record (pair.json: corpus, per-model params, steps, test loss and token accuracy) and its
    build time (the cached lm_pair run's start to the pair's files)."""
    meta = json.loads((pair_dir / "pair.json").read_text())
    info: dict[str, Any] = {"dir": str(pair_dir), "preset": meta.get("preset"), "results": meta.get("results")}
    run_json = pair_dir.parent / "run.json"
    if run_json.exists():
        created = datetime.fromisoformat(json.loads(run_json.read_text())["created"]).timestamp()
        info["build_wall_s"] = round((pair_dir / "pair.json").stat().st_mtime - created, 1)
    return info


def collect_seed(seed: int, run: dict[str, Any]) -> dict[str, Any]:
    out = RUNS / f"seed{seed}"
    m = json.loads((out / "metrics.json").read_text())
    rules = {}
    for name, rep in m["rules"].items():
        key = rule_name(name, seed)
        if key is not None:
            rules[key] = {k: rep[k] for k in (*SCALARS, "auc_random", "auc_ideal") if k in rep}
    curves = read_curves(out / "evaluate" / "deferral_lm_cascade_test.csv", seed)
    n = len(curves["rate"])
    keep = sorted({round(i * (n - 1) / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)})
    return {"seed": seed, "run": run, "task": m["task"], "pair": m["pair"], "rules": rules,
            "quality_at": {c: {f"{r:g}": value_at(curves, c, r) for r in RATES} for c in curves if c != "rate"},
            "curves": {c: [v[i] for i in keep] for c, v in curves.items()}}


def collect(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    per_seed = [collect_seed(s, runs[s]) for s in SEEDS]
    pair_dir = Path(per_seed[0]["pair"])
    return {
        "what": "sequence-level LM cascade (arXiv:2404.10136) on next-line completion of held-out stdlib files: "
                "deferral rules scored on the same generations per seed; token F1 as the quality",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.results_lm_cascade", "commit": git_output("rev-parse", "HEAD"),
        "machine": machine(), "seeds": SEEDS, "rates": list(RATES),
        "pair": pair_info(pair_dir) if (pair_dir / "pair.json").exists() else {"dir": str(pair_dir)},
        "per_seed": per_seed,
    }


# --------------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------------
def _rule(raw: dict[str, Any], rule: str, key: str) -> list[float]:
    """``key`` of ``rule``'s deferral scalars per seed."""
    return [s["rules"][rule][key] for s in raw["per_seed"]]


def _at(raw: dict[str, Any], column: str, rate: float) -> list[float]:
    """A deferral curve's quality at ``rate`` per seed (``column``: a rule, ``random`` or ``ideal``)."""
    return [s["quality_at"][column][f"{rate:g}"] for s in raw["per_seed"]]


def _arch(res: dict[str, Any], role: str) -> str:
    r = res[role]
    return f"{r['params'] / 1e6:.2f}M params, {r['steps']} steps, test loss {r['test_loss']:.3f}, token acc " \
           f"{r['test_token_acc']:.3f}"


def table_md(raw: dict[str, Any]) -> str:
    seeds = raw["seeds"]
    def task(key: str) -> str:
        return mean_std([s["task"][key] for s in raw["per_seed"]])

    first = raw["per_seed"][0]
    pair = raw["pair"]
    lines = []
    if pair.get("results"):
        lines.append(f"Pair `lm_pair preset={pair.get('preset')}` (one build, trained once): small "
                     f"{_arch(pair['results'], 'small')}; large {_arch(pair['results'], 'large')}"
                     + (f"; built in {pair['build_wall_s'] / 60:.1f} min of one thread on the shared machine."
                        if "build_wall_s" in pair else "."))
    lines += [
        f"Task: next-line completion, {first['task']['n_train']} training prompts (val files) and "
        f"{first['task']['n_test']} test prompts (test files) per seed, greedy, quality = token F1. Small F1 "
        f"{task('small_quality')}, large F1 {task('large_quality')}; share of test prompts where the large model "
        f"is better: {task('large_better_rate')}. AUROC: the rule's score against small-model F1 >= 0.5. Mean ± std over seeds {seeds} (a seed = another prompt "
        "sample and post-hoc MLP initialisation; the pair is fixed).",
        "",
        "| rule | AUC-DF | gain over random | s_d | AUROC | " + " | ".join(f"F1 @ {r:.0%} deferred" for r in RATES)
        + " |",
        "|---" * (5 + len(RATES)) + "|",
    ]
    for rule in (*CHOW, *POST_HOC):
        gain = _rule(raw, rule, "auc_gain")
        cells = [mean_std(_rule(raw, rule, "auc_df"), 4),
                 f"{statistics.fmean(gain) * 100:+.1f}% ± {statistics.stdev(gain) * 100:.1f}",
                 mean_std(_rule(raw, rule, "s_d")), mean_std(_rule(raw, rule, "auroc"))]
        cells += [mean_std(_at(raw, rule, r)) for r in RATES]
        lines.append(f"| {NAMES[rule]} | " + " | ".join(cells) + " |")
    for ref, label in (("random", "random deferral"), ("ideal", "oracle deferral")):
        auc = "auc_random" if ref == "random" else "auc_ideal"
        cells = [mean_std(_rule(raw, "chow_sum", auc), 4), "–", "–", "–"]
        cells += [mean_std(_at(raw, ref, r)) for r in RATES]
        lines.append(f"| *{label}* | " + " | ".join(cells) + " |")
    lines += ["", "AUC-DF of each post-hoc rule minus each Chow rule, paired by seed (mean ± std, the 95% interval of "
              "the mean in brackets; 'beyond seed spread' = the same sign on every seed and |mean| > 2 std, else "
              "noise):", "",
              "| post-hoc rule | " + " | ".join(NAMES[c] for c in CHOW) + " |", "|---" * (1 + len(CHOW)) + "|"]
    for rule in POST_HOC:
        cells = []
        for chow in CHOW:
            diffs = [a - b for a, b in zip(_rule(raw, rule, "auc_df"), _rule(raw, chow, "auc_df"), strict=True)]
            cells.append(paired_cell(diffs, 4))
        lines.append(f"| {NAMES[rule]} | " + " | ".join(cells) + " |")
    walls = [s["run"]["wall_seconds"] for s in raw["per_seed"]]
    loads = [s["run"]["loadavg"]["after"][1] for s in raw["per_seed"] if s["run"].get("loadavg")]
    load = f" (5-min load average {min(loads):.1f}–{max(loads):.1f} after the runs)" if loads else ""
    lines += ["", f"Run time per seed: {statistics.fmean(walls) / 60:.1f} min wall (min {min(walls) / 60:.1f}, max "
              f"{max(walls) / 60:.1f}; the first run includes building the pair when it was not cached), one torch "
              f"thread on a 2-core machine shared with other jobs{load}. Commands: "
              f"`{raw['per_seed'][0]['run']['command']}` and likewise per seed. Raw: "
              "`docs/results/lm_cascade/raw.json`; figure: `docs/img/lm_cascade_rules.png`."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------------------------------------
def figure(raw: dict[str, Any]) -> Path:
    """Left: deferral curves as the gain over random deferral (mean over seeds, ±1 std band). Right: relative
    AUC-DF gain over random per rule (mean, ±1 std error bars)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    seeds = raw["seeds"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.4, 1]})
    rates = raw["per_seed"][0]["curves"]["rate"]
    colors = plt.get_cmap("tab10")
    for i, rule in enumerate((*CHOW, *POST_HOC)):
        per = [[q - r for q, r in zip(s["curves"][rule], s["curves"]["random"], strict=True)] for s in raw["per_seed"]]
        mean = [statistics.fmean(v) for v in zip(*per, strict=True)]
        std = [statistics.stdev(v) for v in zip(*per, strict=True)]
        style = "-" if rule.startswith("post_hoc") else "--"
        left.plot(rates, mean, style, color=colors(i), label=NAMES[rule], lw=1.4)
        left.fill_between(rates, [m - s for m, s in zip(mean, std, strict=True)],
                          [m + s for m, s in zip(mean, std, strict=True)], color=colors(i), alpha=0.12)
    left.axhline(0.0, color="black", lw=0.8, ls=":", label="random deferral")
    left.set_xlabel("deferral rate (share of prompts sent to the large model)")
    left.set_ylabel("cascade token F1 − random deferral's")
    left.set_title("Deferral curves relative to random deferral\n(mean over seeds; bands: ±1 std)", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    names = [NAMES[r] for r in (*CHOW, *POST_HOC)]
    gains = [[s["rules"][r]["auc_gain"] * 100 for s in raw["per_seed"]] for r in (*CHOW, *POST_HOC)]
    y = list(range(len(names)))
    right.barh(y, [statistics.fmean(g) for g in gains], xerr=[statistics.stdev(g) for g in gains], capsize=3,
               color=[colors(i) for i in y], alpha=0.8)
    right.set_yticks(y, names, fontsize=8)
    right.invert_yaxis()
    right.axvline(0.0, color="black", lw=0.8)
    right.set_xlabel("AUC-DF gain over random deferral (%)")
    right.set_title("AUC-DF gain over random\n(bars: mean; error bars: ±1 std)", fontsize=10)
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(f"LM cascade deferral rules (arXiv:2404.10136), next-line completion, token F1; {len(seeds)} seeds "
                 f"{seeds}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return save_figure(fig, "lm_cascade_rules.png")


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
        runs = run_seeds(RECIPE, overrides, RUNS, SEEDS, args.rerun)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "raw.json").write_text(json.dumps(collect(runs), indent=1) + "\n")
    write_outputs()


if __name__ == "__main__":
    main()
