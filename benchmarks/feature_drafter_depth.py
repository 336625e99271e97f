"""Top-1 agreement of SmolLM2's EAGLE feature drafters with SmolLM2 when they read their own predicted features.

    python -m benchmarks.feature_drafter_depth [--presets smollm2_feature_drafter,...] [--blocks 32]

For each built ``lm_pair`` preset with a feature drafter ("EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty", arXiv:2401.15077), on the first ``--blocks`` test blocks (4 x 128 tokens each) of the pair's own
corpus split: depth 1 = the drafter reads SmolLM2's float32 feature of the previous token in every column (the
first draft step of a round); depth ``k`` = every column reads the drafter's own depth-``k − 1`` prediction of
the previous column (``k − 1`` predicted features in a row, as draft step ``k`` does; harsher than decoding, where
the columns before the round hold the verifier's features). Agreement = the drafter's top-1 token equals SmolLM2's
at the columns from ``k − 1`` on. Greedy acceptance over a round of γ drafts falls with depth, so this shows which
draft steps limit it. One thread. Writes ``docs/results/feature_drafter_depth/raw.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

import torch

from benchmarks._common import ROOT, git_output, write_tables
from benchmarks._common import results_machine as machine

OUT = ROOT / "docs" / "results" / "feature_drafter_depth"
PRESETS = ("smollm2_feature_drafter", "smollm2_feature_drafter_long", "smollm2_feature_drafter_xl",
           "smollm2_feature_drafter_unroll")
DEPTHS = 4


@torch.no_grad()
def depth_agreement(drafter: Any, verifier: Any, blocks: list[torch.Tensor], depths: int = DEPTHS) -> list[float]:
    """Agreement at depths ``1..depths`` pooled over ``blocks`` (``[B, T]`` token ids without padding)."""
    from lit_cascades.models.feature_drafter import capture_head_input, shift_features

    hits, counts = [0] * depths, [0] * depths
    for ids in blocks:
        with capture_head_input(verifier) as hidden:
            top = verifier(input_ids=ids).logits.argmax(-1)
        inputs = shift_features(hidden[-1])
        for k in range(depths):
            out = drafter(input_ids=ids, features=inputs)
            hits[k] += int((out.logits.argmax(-1) == top)[:, k:].sum())
            counts[k] += top[:, k:].numel()
            inputs = shift_features(out.hidden_states[-1])
    return [h / c for h, c in zip(hits, counts, strict=True)]


def tables(raw: dict[str, Any]) -> dict[str, str]:
    """``{"table.md": ...}`` made from ``raw.json``'s content alone."""
    depths = len(next(iter(raw["presets"].values()))["agreement"])
    lines = ["| drafter | training steps | " + " | ".join(f"depth {k + 1}" for k in range(depths)) + " |\n",
             "|---|---|" + "---|" * depths + "\n"]
    for name, r in raw["presets"].items():
        lines.append(f"| lm_pair preset={name} | {r['steps']} | " + " | ".join(f"{a:.3f}" for a in r["agreement"])
                     + " |\n")
    return {"table.md": "".join(lines) + (
        f"\nTop-1 agreement with SmolLM2-135M-Instruct on the first {raw['blocks']} test blocks of the stdlib corpus "
        f"(4 × 128 tokens each, {raw['positions']:,} positions at depth 1); depth k: every column reads the "
        "drafter's own prediction k − 1 times in a row. Deterministic (no sampling). Raw: "
        "`docs/results/feature_drafter_depth/raw.json` (`python -m benchmarks.feature_drafter_depth`).\n")}


def corpus_test_blocks(corpus: dict[str, Any], n: int) -> list[torch.Tensor]:
    """The first ``n`` test blocks (``input_ids`` ``[B, T]``) of a pair's corpus (``pair.json``'s ``"corpus"``)."""
    from omegaconf import OmegaConf

    from lit_cascades.runner.config import build

    dm = build(OmegaConf.create(corpus), "corpus")
    dm.setup()
    loader = iter(dm.test_dataloader())
    return [next(loader)["input_ids"] for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    from lit_cascades.lm_tasks import cached_pair_dir
    from lit_cascades.models.lm_pair import load_pair

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.tables_only:
        torch.set_num_threads(1)
        config_dir = ROOT / "recipes" / "configs"
        presets, blocks, corpus = {}, None, None
        for preset in [p for p in args.presets.split(",") if p]:
            pair_dir = cached_pair_dir(preset, config_dir)
            if not (pair_dir / "pair.json").exists():
                print(f"{preset}: not built (python -m recipes.lm_pair preset={preset}), skipped", flush=True)
                continue
            meta = json.loads((pair_dir / "pair.json").read_text())
            pair = load_pair(pair_dir)
            if blocks is None or meta["corpus"] != corpus:  # the same test blocks for every preset
                corpus = meta["corpus"]
                blocks = corpus_test_blocks(corpus, args.blocks)
            agreement = depth_agreement(pair.drafter, pair.large.eval(), blocks)
            presets[preset] = {"steps": meta["results"]["drafter"]["steps"], "agreement": agreement}
            print(f"{preset}: {[round(a, 3) for a in agreement]}", flush=True)
        raw = {"created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "git_commit": git_output("rev-parse", "HEAD"), "machine": machine(),
               "command": " ".join(["python -m benchmarks.feature_drafter_depth", *(sys.argv[1:] if argv is None else argv)]),
               "blocks": args.blocks, "positions": sum(b.numel() for b in blocks or []), "presets": presets}
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "raw.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_tables(OUT, tables(json.loads((OUT / "raw.json").read_text())))


if __name__ == "__main__":
    main()
