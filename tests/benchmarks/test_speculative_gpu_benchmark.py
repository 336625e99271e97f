"""The GPU speculative-decoding benchmark runs end to end on CPU with tiny pairs, so it is ready when a GPU is: in
float32 it checks ``spec_decode`` against greedy decoding before timing; in bfloat16 it records the agreement."""

from __future__ import annotations

import json
import math
import sys

import pytest

import benchmarks._common as common
from benchmarks import speculative_gpu


def test_greedy_match_counts_identical_rows_and_the_prefix_before_the_first_difference():
    assert speculative_gpu.greedy_match([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == {
        "rows_identical": 1.0, "tokens_before_first_difference": 1.0}
    # second row differs at its second token: 3 + 1 of 6 tokens come before a difference
    assert speculative_gpu.greedy_match([[1, 2, 3], [4, 9, 6]], [[1, 2, 3], [4, 5, 6]]) == {
        "rows_identical": 0.5, "tokens_before_first_difference": 4 / 6}
    with pytest.raises(ValueError, match="same rows"):
        speculative_gpu.greedy_match([[1]], [[1], [2]])


def _flip_first_token(monkeypatch) -> None:
    """Make ``spec_decode`` emit one wrong token per call (what a rounding flip would look like)."""
    real = speculative_gpu.speculative_generate

    def flipped(*args, **kwargs):
        out = real(*args, **kwargs)
        out.tokens[0, 0] = (out.tokens[0, 0] + 1) % 50
        return out

    monkeypatch.setattr(speculative_gpu, "speculative_generate", flipped)


def _run(monkeypatch, tmp_path, *args: str) -> dict:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["speculative_gpu", "--device", "cpu", "--prompts", "3", "--batch", "2",
                                      "--hf-prompts", "1", "--context-tokens", "16", "--max-new-tokens", "5",
                                      "--gamma", "2", "--alphas", "0.3", "--alternations", "1", *args])
    speculative_gpu.main()
    return json.loads((tmp_path / "speculative_gpu.json").read_text())


@pytest.mark.slow
def test_gpu_benchmark_smoke_on_cpu_float32(tiny_pair_dir, tmp_path, monkeypatch):
    out = _run(monkeypatch, tmp_path, "--verifier", str(tiny_pair_dir / "large"),
               "--drafter", str(tiny_pair_dir / "small"))
    res = out["results"]
    assert res["dtype"] == "float32" and res["gpu"] is None
    assert res["greedy_match"]["batch"] == {"rows_identical": 1.0, "tokens_before_first_difference": 1.0}
    assert res["greedy_match"]["batch1_spec_decode"]["rows_identical"] == 1.0
    assert set(res["batch_ratios_over_large_only"]) == {"large_only", "spec_decode", "token_v1_0.3", "token_v3_0.3"}
    assert 0 <= res["decoding"]["spec_decode"]["acceptance_rate"] <= 1
    assert math.isfinite(res["spec_decode_over_hf_assisted_batch1"]["median"])
    assert out["targets"][0]["what"].startswith("spec_decode / HF assisted generation, batch 1, cpu")


@pytest.mark.slow
def test_gpu_benchmark_stops_before_timing_when_float32_outputs_differ(tiny_pair_dir, tmp_path, monkeypatch):
    _flip_first_token(monkeypatch)
    with pytest.raises(AssertionError, match="differs from the verifier's greedy decoding in float32"):
        _run(monkeypatch, tmp_path, "--verifier", str(tiny_pair_dir / "large"), "--drafter", str(tiny_pair_dir / "small"))
    assert not (tmp_path / "speculative_gpu.json").exists()


@pytest.mark.slow
def test_gpu_benchmark_records_agreement_in_bfloat16_with_a_layer_cut_drafter(tiny_pair_dir, tmp_path, monkeypatch):
    """A Llama verifier with grouped-query attention, its first layer as the drafter (``layers:1``), in bfloat16:
    the run does not stop on a difference (here one flipped token per call); it records how far outputs agree."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_cascades.models.hf import load_tokenizer

    tok = load_tokenizer(tiny_pair_dir / "tokenizer")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "verifier")
    tok.save_pretrained(tmp_path / "verifier")
    _flip_first_token(monkeypatch)
    out = _run(monkeypatch, tmp_path, "--verifier", str(tmp_path / "verifier"), "--drafter", "layers:1",
               "--dtype", "bfloat16")
    res = out["results"]
    assert res["dtype"] == "bfloat16"
    match = res["greedy_match"]
    assert match["batch"]["rows_identical"] == pytest.approx(1 / 3)  # batches of 2 and 1 rows: rows 0 and 2 flipped
    assert match["batch1_spec_decode"] == {"rows_identical": 0.0, "tokens_before_first_difference": 0.0}
    assert 0 <= match["batch1_hf_assisted"]["rows_identical"] <= 1
    assert math.isfinite(res["spec_decode_over_hf_assisted_batch1"]["median"])
