"""The speculative-decoding benchmark script runs end to end on the tiny pair (it checks its own outputs against HF
assisted generation before timing) and writes finite ratios."""

from __future__ import annotations

import json
import math
import sys

import pytest

import benchmarks._common as common
from benchmarks import speculative


@pytest.mark.slow
def test_speculative_benchmark_smoke(tiny_pair_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["speculative", "--prompts", "3", "--quality-prompts", "4", "--repeats", "1",
                                      "--max-new-tokens", "6", "--alphas", "0.5", "--gamma", "2",
                                      f"pair.path={tiny_pair_dir}", "task.context_tokens=32", "task.max_new_tokens=6"])
    speculative.main()
    out = json.loads((tmp_path / "speculative.json").read_text())
    hf = out["vs_hf_assisted"]
    assert hf["prompts"] == 3 and hf["gamma"] == 2
    assert all(math.isfinite(v) and v > 0 for v in hf["seconds"].values())
    assert 0 < hf["tokens_per_verifier_call"] <= 3  # at most γ + 1 tokens per verifier call
    assert set(out["batching"]["tokens_per_second"]) == {"spec_decode_b1", "spec_decode_b8", "verifier_b1",
                                                        "verifier_b8"}
    q = out["quality_latency"]
    assert set(q["methods"]) == {"spec_decode", "token_v3_0.5"}
    assert q["methods"]["spec_decode"]["quality"] == pytest.approx(q["large_only_quality"])  # exact at T = 0
