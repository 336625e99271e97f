"""The feature-drafter γ sweep on a tiny Llama verifier with a briefly trained feature drafter: every side's tokens
are checked against the verifier's greedy ``generate`` before timing, and the statistics add up."""

from __future__ import annotations

import pytest
import torch

from benchmarks import feature_drafter_gamma as sweep
from tests.models.test_feature_drafter import train_drafter
from tests.models.test_speculative_architectures import make_pair


def test_sides_check_outputs_and_count_decoding():
    _, verifier = make_pair("llama")
    drafter, _ = train_drafter(verifier, steps=40)
    prompts = [torch.randint(6, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (4, 7)]
    fns, stats = sweep.sides(drafter, verifier, prompts, [1, 3], max_new=8)
    assert set(fns) == {"verifier_greedy", "gamma_1", "gamma_3", "adaptive"} and set(stats) == set(fns) - {
        "verifier_greedy"}
    for s in stats.values():
        assert s["tokens"] == 16 and 0 <= s["accepted"] <= s["drafted"]
        assert s["tokens_per_verifier_call"] == s["tokens"] / s["verifier_calls"]
    assert stats["gamma_1"]["drafted"] <= stats["gamma_1"]["verifier_calls"]  # at most one draft per round
    assert stats["adaptive"]["gamma"] == 3 and stats["adaptive"]["schedule"] == "heuristic"
    for fn in fns.values():
        fn()


def test_sides_refuse_outputs_that_differ_from_greedy(monkeypatch):
    """The equality check runs before any timing: a decoder that returns other tokens stops the benchmark."""
    _, verifier = make_pair("llama")
    drafter, _ = train_drafter(verifier, steps=5)
    import benchmarks.speculative as shared  # sides() decodes through benchmarks.speculative.checked_decoding

    real = shared.speculative_generate

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs)
        out.tokens[0, -1] = (out.tokens[0, -1] + 1) % 96
        return out

    monkeypatch.setattr(shared, "speculative_generate", off_by_one)
    with pytest.raises(AssertionError, match="differs from the verifier's greedy generate"):
        sweep.sides(drafter, verifier, [torch.randint(6, 96, (1, 5))], [2], max_new=6)


def test_bad_gammas_are_refused():
    with pytest.raises(SystemExit, match="--gammas must list integers >= 1"):
        sweep.main(["--gammas", "0,2"])


def test_committed_table_regenerates_from_raw():
    """Provenance of the published sweep: every side checked and timed, and the committed table is what the script
    makes of the committed JSON."""
    import json

    from benchmarks._common import ROOT

    folder = ROOT / "docs" / "results" / "benchmarks"
    raw = json.loads((folder / "feature_drafter_gamma.json").read_text())
    assert raw["command"].startswith("python -m benchmarks.feature_drafter_gamma") and len(raw["git_commit"]) == 40
    assert set(raw["ratios"]) == set(raw["decoding"]) and raw["baseline"] == "verifier_greedy"
    for name, d in raw["decoding"].items():
        assert len(raw["seconds"][name]) == raw["alternations"] >= 10
        assert d["acceptance_rate"] == d["accepted"] / d["drafted"]
    assert (folder / "feature_drafter_gamma.table.md").read_text() == sweep.render(raw)
