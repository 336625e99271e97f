"""SpeculativeCascade as a LightningModule: predict/test steps over a DataLoader of prompts against direct decoding."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from lit_cascades.models.speculative import speculative_generate
from lit_cascades.modules.speculative_cascade import STAT_KEYS, SpeculativeCascade
from tests.models.test_speculative_generation import STOP, left_padded, random_pair


@pytest.fixture(scope="module")
def pair():
    return random_pair()


def prompt_batches() -> list[dict[str, torch.Tensor]]:
    return [dict(zip(("input_ids", "attention_mask"), left_padded(lengths, seed=s)))
            for s, lengths in enumerate([[4, 9, 2], [6, 1, 5]])]


def module(pair, **kwargs) -> SpeculativeCascade:
    drafter, verifier = pair
    kwargs = {"rule": "token_v3", "alpha": 0.3, "gamma": 3, "max_new_tokens": 12, "stop_counts": [STOP],
              "num_stops": 1, **kwargs}
    return SpeculativeCascade(drafter, verifier, **kwargs)


def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False)


def test_predict_step_records_equal_direct_decoding(pair):
    drafter, verifier = pair
    sc = module(pair)
    preds = trainer().predict(sc, dataloaders=DataLoader(prompt_batches(), batch_size=None))
    for batch, rec in zip(prompt_batches(), preds):
        ref = speculative_generate(drafter, verifier, batch["input_ids"], batch["attention_mask"], 12, rule="token_v3",
                                   alpha=0.3, gamma=3, stop_counts=[STOP], num_stops=1, pad_token_id=0)
        assert torch.equal(rec["tokens"], ref.tokens) and torch.equal(rec["mask"], ref.mask)
        for key in STAT_KEYS:
            assert torch.equal(rec[key], getattr(ref, key)), key
        assert rec["seconds"].shape == (3,) and bool((rec["seconds"] > 0).all())
        assert "text" not in rec  # no tokenizer: nothing to decode


def test_test_step_logs_batch_means(pair):
    sc = module(pair)
    logged = trainer().test(sc, dataloaders=DataLoader(prompt_batches(), batch_size=None), verbose=False)[0]
    recs = [sc.predict_step(b) for b in prompt_batches()]  # greedy: the same decoding again
    accept = [float(r["accepted"].sum() / r["drafted"].sum()) for r in recs]
    per_call = [float(r["num_tokens"].sum() / r["verifier_calls"].sum()) for r in recs]
    calls = [float(r["verifier_calls"].float().mean()) for r in recs]
    # two batches of 3 rows: the epoch value is the plain mean of the batch values
    assert logged["test/acceptance_rate"] == pytest.approx(sum(accept) / 2, rel=1e-6)
    assert logged["test/tokens_per_verifier_call"] == pytest.approx(sum(per_call) / 2, rel=1e-6)
    assert logged["test/verifier_calls"] == pytest.approx(sum(calls) / 2, rel=1e-6)
    deferral = [float(r["deferred"].sum() / r["num_tokens"].sum()) for r in recs]
    assert logged["test/deferral_rate"] == pytest.approx(sum(deferral) / 2, rel=1e-6)
    assert 0.0 < logged["test/acceptance_rate"] <= 1.0


def test_sampling_is_reproducible_after_reset(pair):
    sc = module(pair, rule="spec_decode", alpha=None, temperature=1.0)
    batch = prompt_batches()[0]
    first = sc.predict_step(batch)["tokens"]
    other = sc.predict_step(batch)["tokens"]
    sc.reset_generator()
    assert torch.equal(sc.predict_step(batch)["tokens"], first)
    assert not torch.equal(other, first)  # the generator advanced between the first two calls


def test_generate_overrides_and_bad_settings(pair):
    drafter, verifier = pair
    sc = module(pair)
    ids, mask = left_padded([5, 2])
    greedy = sc.generate(ids, mask, rule="spec_decode", alpha=None)
    ref = speculative_generate(drafter, verifier, ids, mask, 12, gamma=3, stop_counts=[STOP], pad_token_id=0)
    assert torch.equal(greedy.tokens, ref.tokens)
    penalised = sc.generate(ids, mask, rule="spec_decode", alpha=None, generation_kwargs={"repetition_penalty": 2.0},
                            output_logprobs=True)
    ref = speculative_generate(drafter, verifier, ids, mask, 12, gamma=3, stop_counts=[STOP], pad_token_id=0,
                               generation_kwargs={"repetition_penalty": 2.0}, output_logprobs=True)
    assert torch.equal(penalised.tokens, ref.tokens) and torch.equal(penalised.logprobs, ref.logprobs)
    with pytest.raises(TypeError, match="unknown generate"):
        sc.generate(ids, mask, beams=2)
    with pytest.raises(ValueError, match="gamma"):
        module(pair, gamma=0)
    with pytest.raises(ValueError, match="temperature"):
        module(pair, temperature=-0.5)
    with pytest.raises(ValueError, match="bonus"):
        module(pair, bonus="drafter")
    with pytest.raises(ValueError, match="gamma_schedule"):
        module(pair, gamma_schedule="sometimes")
    with pytest.raises(ValueError, match="newlines"):
        module(pair, stop_counts="newline")
    with pytest.raises(ValueError, match="alpha"):
        module(pair, rule="chow", alpha=1.5)
    other = build_causal_lm(gpt2_config(60, n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="vocab"):
        SpeculativeCascade(other, verifier)
