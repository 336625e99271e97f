"""The speculative-decoding benchmark script runs end to end on the tiny pair and a random Llama pair (it checks its
own outputs against HF assisted generation before timing) and writes finite ratios and its table."""

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
    monkeypatch.setattr(speculative, "RANDOM_SIZE", {"width": 32, "layers": 2})
    monkeypatch.setattr(sys, "argv", ["speculative", "--pairs", "trained,llama_random", "--prompts", "2",
                                      "--alternations", "1", "--max-new-tokens", "6", "--gamma", "2",
                                      "--cache-batch", "5", "--batching-prompts", "3", "--rule-prompts", "4",
                                      "--alphas", "0.5", f"pair.path={tiny_pair_dir}", "task.context_tokens=32",
                                      "task.max_new_tokens=6", "task.batch_size=4"])
    speculative.main()
    out = json.loads((tmp_path / "speculative.json").read_text())["results"]
    for pair in ("trained", "llama_random"):
        hf = out["vs_hf"][pair]
        assert hf["prompts"] == 2 and hf["gamma"] == 2
        assert all(math.isfinite(v) and v > 0 for v in hf["timing"]["median_s"].values())
        assert 0 < hf["decoding"]["constant"]["tokens_per_verifier_call"] <= 3  # at most γ + 1 per call
        cache = out["cache"][pair]
        assert 0 < cache["cache_columns"] < cache["longest_row_real_tokens"]
    rules = out["rules"]["trained"]["methods"]
    assert set(rules) == {"large_only", "spec_decode", "token_v1_0.5"}
    assert rules["spec_decode"]["token_f1"] == pytest.approx(rules["large_only"]["token_f1"])  # exact at T = 0
    assert rules["spec_decode"]["deferral_rate"] == 1.0
    table = (tmp_path / "speculative.table.md").read_text()
    assert "spec_decode / HF assisted" in table and "llama_random" in table
