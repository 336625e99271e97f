"""Loops a user waits on outside ``Trainer.fit``: the same results as the plain calls, and a bar only on request."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lit_cascades._progress import progress_bar
from lit_cascades.data.lm import NextLineDataset, collate_prompts, newline_counts, train_bpe_tokenizer
from lit_cascades.models.generation import generate_batches, greedy_generate
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from lit_cascades.modules.lm_cascade import LMCascade, concat_records, predict_records

TEXT = "\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(40))


@pytest.fixture(scope="module")
def setup():
    tok = train_bpe_tokenizer([TEXT], vocab_size=300, progress=False)
    models = []
    for seed, layers in ((0, 1), (1, 2)):
        torch.manual_seed(seed)
        models.append(build_causal_lm(gpt2_config(len(tok), n_layer=layers, n_embd=16, n_head=2, n_positions=96,
                                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                                      ).eval())
    ds = NextLineDataset([("a.py", TEXT)], tok, num_examples=6, context_tokens=24, max_target_tokens=8)
    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_prompts(tok.pad_token_id))
    return tok, models, loader


def test_generate_batches_equals_greedy_generate_per_batch(setup, capsys):
    tok, (small, _), loader = setup
    counts = newline_counts(tok, len(tok))
    got = list(generate_batches(small, loader, 6, counts, tok.pad_token_id, num_stops=2, progress=False))
    assert len(got) == 2
    for (batch, gen), ref_batch in zip(got, loader):
        ref = greedy_generate(small, ref_batch["input_ids"], ref_batch["attention_mask"], 6, counts,
                              tok.pad_token_id, num_stops=2)
        assert batch["target"] == ref_batch["target"]
        assert torch.equal(gen.tokens, ref.tokens) and torch.equal(gen.mask, ref.mask)
    assert capsys.readouterr().err == ""


def test_predict_records_equals_predict_step_over_the_loader(setup, capsys):
    tok, (small, large), loader = setup
    cascade = LMCascade(small, large, tok, max_new_tokens=6)
    got = predict_records(cascade, loader, progress=False)
    want = concat_records([cascade.predict_step(b, i) for i, b in enumerate(loader)])
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value
    assert capsys.readouterr().err == ""


def test_progress_bar_writes_to_stderr_only_when_asked(capsys):
    assert list(progress_bar(range(3), desc="quiet", progress=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    assert list(progress_bar(range(3), desc="loud", progress=True)) == [0, 1, 2]
    captured = capsys.readouterr()
    assert "loud" in captured.err and captured.out == ""
