"""The speculative-cascade recipe's smoke preset through the runner, and its config errors."""

from __future__ import annotations

import csv
import json

import pytest

from tests.recipes.test_lm_recipes import check_pair_quality, config_error, run_lm_recipe


@pytest.mark.slow
def test_speculative_cascade_smoke_writes_methods_and_exact_spec_decode(tmp_path, tiny_pair_dir):
    out = tmp_path / "run"
    run_lm_recipe("speculative_cascade", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}")
    m = json.loads((out / "metrics.json").read_text())
    methods = m["methods"]
    for name in ("spec_decode", "spec_token_v3_0.3", "spec_token_v3_0.8", "spec_lossy_0.5"):
        assert name in methods, sorted(methods)
        assert (out / "decode" / name / "records.pt").exists() and (out / "decode" / name / "metrics.json").exists()
    large, small = methods["large_only"], methods["small_only"]
    # greedy exact speculative decoding reproduces the verifier's outputs, hence its quality exactly
    assert methods["spec_decode"]["quality"] == pytest.approx(large["quality"], abs=1e-9)
    for name, row in methods.items():
        if name.startswith("spec_"):
            assert 0.0 <= row["acceptance_rate"] <= 1.0, name
            assert row["tokens_per_verifier_call"] >= 1.0 - 1e-9, name
            assert 0.0 <= row["quality"] <= 1.0, name
    assert 0.0 <= small["quality"] <= 1.0 and m["task"]["n_test"] == 16
    check_pair_quality(small["quality"], large["quality"])
    assert {r["method"] for r in csv.DictReader(open(out / "methods.csv"))} == set(methods)
    assert (out / "quality_latency.png").stat().st_size > 5000


def test_speculative_cascade_rejects_bad_values_before_work(tmp_path, tiny_pair_dir, capsys):
    cases = [(["cascade.gamma=0"], "error: cascade.gamma:"), (["rule=foo"], "error: rule: unknown rule"),
             (["rule=token_v3", "alpha=7.0"], "error: alpha:"), (["task.split=train"], "error: task.split:"),
             (["task.quality=x"], "error: task.quality: unknown config key"),
             (["drafter=foo"], "error: drafter: unknown drafter 'foo'"),
             (["drafter=feature"], "error: drafter: the pair")]  # the tiny pair has no feature drafter
    for i, (args, expected) in enumerate(cases):
        out = tmp_path / f"run{i}"
        line = config_error("speculative_cascade", capsys, "preset=smoke", f"pair.path={tiny_pair_dir}",
                            f"output_dir={out}", *args)
        assert line.startswith(expected), line
        assert not out.exists()
