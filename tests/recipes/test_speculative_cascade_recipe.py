"""The speculative-cascade recipe's smoke preset through its real entry point, asserting on its outputs."""

from __future__ import annotations

import csv
import json

import pytest

from tests.recipes.test_lm_recipes import run_recipe


@pytest.mark.slow
def test_speculative_cascade_smoke_writes_methods_and_exact_spec_decode(tmp_path, tiny_pair_dir):
    out = tmp_path / "run"
    run_recipe("speculative_cascade", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}")
    m = json.loads((out / "metrics.json").read_text())
    methods = m["methods"]
    for name in ("spec_decode", "spec_token_v3_0.3", "spec_token_v3_0.8", "spec_lossy_0.5"):
        assert name in methods, sorted(methods)
    large = next(v for k, v in methods.items() if k.startswith("large"))
    small = next(v for k, v in methods.items() if k.startswith("small"))
    # greedy exact speculative decoding reproduces the verifier's outputs, hence its quality exactly
    assert methods["spec_decode"]["quality"] == pytest.approx(large["quality"], abs=1e-9)
    for name, row in methods.items():
        if name.startswith("spec_"):
            assert 0.0 <= row["acceptance_rate"] <= 1.0, name
            assert row["tokens_per_verifier_call"] >= 1.0 - 1e-9, name
            assert 0.0 <= row["quality"] <= 1.0, name
    assert 0.0 <= small["quality"] <= 1.0
    rows = list(csv.DictReader(open(out / "methods.csv")))
    assert {r["method"] for r in rows} == set(methods)
    assert (out / "quality_latency.png").stat().st_size > 5000
