"""LM cascade records (generation oracle: HF ``generate`` prompt by prompt) and the post-hoc deferral rule."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_cascades.data.lm import NextLineDataset, collate_prompts, newline_counts, newline_token_ids
from lit_cascades.functional import deferral_metrics
from lit_cascades.functional.sequence_scores import chow_average, chow_quantile, chow_sum
from lit_cascades.models.generation import greedy_generate, output_hidden_states
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config, load_pair
from lit_cascades.modules.lm_cascade import (
    LMCascade,
    PostHocDeferral,
    concat_records,
    golden_deferral_label,
    merge_records,
    post_hoc_dataset,
    post_hoc_features,
)
from tests.lm_helpers import single_thread, tiny_datamodule


@pytest.fixture(scope="module")
def pair(tiny_pair_dir):
    return load_pair(tiny_pair_dir)


@pytest.fixture(scope="module")
def prompts(pair):
    dm = tiny_datamodule(tokenizer=pair.tokenizer)
    ds = NextLineDataset(dm.load().docs["test"], pair.tokenizer, num_examples=6, context_tokens=40,
                         max_target_tokens=12, seed=0)
    return collate_prompts(pair.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


def test_batched_greedy_generation_equals_hf_generate_prompt_by_prompt(pair, prompts):
    """Stop at the second newline: the output equals HF greedy ``generate`` on each unpadded prompt, cut where
    its running newline count reaches 2; log-probs equal a teacher-forced forward."""
    counts = newline_counts(pair.tokenizer)
    gen = greedy_generate(pair.small, prompts["input_ids"], prompts["attention_mask"], 12, counts,
                          pair.tokenizer.pad_token_id, num_stops=2)
    assert gen.tokens.shape == gen.logprobs.shape == gen.mask.shape == (6, 12)
    for i in range(6):
        ids = prompts["input_ids"][i][prompts["attention_mask"][i] == 1][None]
        ref = pair.small.generate(ids, max_new_tokens=12, do_sample=False,
                                  pad_token_id=pair.tokenizer.pad_token_id)[0, ids.shape[1]:]
        running = counts[ref].cumsum(0)
        reached = torch.nonzero(running >= 2)
        n_expected = int(reached[0]) + 1 if reached.numel() else 12
        n = int(gen.mask[i].sum())
        assert n == n_expected and bool(gen.stopped[i]) == bool(reached.numel())
        assert torch.equal(gen.tokens[i, :n], ref[:n])
        assert (gen.tokens[i, n:] == pair.tokenizer.pad_token_id).all()
        full = torch.cat([ids[0], gen.tokens[i, :n]])[None]
        with torch.no_grad():
            logp = pair.small(full).logits.log_softmax(-1)[0, ids.shape[1] - 1: -1]
        expected = logp.gather(-1, gen.tokens[i, :n, None]).squeeze(-1)
        torch.testing.assert_close(gen.logprobs[i, :n], expected, atol=1e-5, rtol=1e-5)
        assert (gen.logprobs[i, n:] == 0).all()


def test_stop_token_ids_behave_like_hf_eos(pair, prompts):
    """A list of stop ids with one stop event is HF's own eos stopping (the oracle)."""
    stops = newline_token_ids(pair.tokenizer)
    pad = pair.tokenizer.pad_token_id
    gen = greedy_generate(pair.large, prompts["input_ids"], prompts["attention_mask"], 10, stops, pad)
    ref = pair.large.generate(prompts["input_ids"], attention_mask=prompts["attention_mask"], max_new_tokens=10,
                              do_sample=False, eos_token_id=stops, pad_token_id=pad)[:, prompts["input_ids"].shape[1]:]
    ref = torch.nn.functional.pad(ref, (0, 10 - ref.shape[1]), value=pad)
    torch.testing.assert_close(gen.tokens, ref)
    for i in range(6):
        n = int(gen.mask[i].sum())
        assert n == 10 or int(gen.tokens[i, n - 1]) in stops
    without = greedy_generate(pair.large, prompts["input_ids"], prompts["attention_mask"], 10, stops, pad,
                              include_stop=False)
    assert torch.equal(without.mask.sum(-1), gen.mask.sum(-1) - gen.stopped.long())


def test_records_hold_qualities_scores_and_embeddings(pair, prompts):
    cascade = LMCascade(pair.small, pair.large, pair.tokenizer, max_new_tokens=12, large_layer=1)
    rec = cascade.predict_step(prompts)
    for role in ("small", "large"):
        raw = pair.tokenizer.batch_decode([t[m].tolist() for t, m in zip(rec[f"{role}_tokens"], rec[f"{role}_mask"])])
        assert rec[f"{role}_text"] == [r.split("\n")[1] if "\n" in r else "" for r in raw]
        exact = torch.tensor([float(p.rstrip() == t.rstrip()) for p, t in zip(rec[f"{role}_text"], rec["target"])])
        assert torch.equal(rec[f"{role}_exact_match"], exact)
        assert ((rec[f"{role}_token_f1"] >= 0) & (rec[f"{role}_token_f1"] <= 1)).all()
        assert all("\n" not in t for t in rec[f"{role}_text"])
    assert rec["small_embed"].shape == (6, pair.small.config.n_embd)
    assert rec["large_embed"].shape == (6, pair.large.config.n_embd)
    # Embed-1 = mean final hidden state over the positions that produced the output tokens (one example by hand)
    i = 0
    ids = prompts["input_ids"][i][prompts["attention_mask"][i] == 1]
    n = int(rec["small_mask"][i].sum())
    full = torch.cat([ids, rec["small_tokens"][i, :n]])[None]
    with torch.no_grad():
        h = pair.small(full, output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(rec["small_embed"][i], h[ids.numel() - 1: ids.numel() - 1 + n].mean(0),
                               atol=1e-5, rtol=1e-5)
    out = cascade.test_step(rec)["deferral"]
    lp, mask = rec["small_logprobs"], rec["small_mask"]
    torch.testing.assert_close(out["scores"]["chow_sum"], chow_sum(lp, mask))
    torch.testing.assert_close(out["scores"]["chow_average"], chow_average(lp, mask))
    torch.testing.assert_close(out["scores"]["chow_quantile_0.25"], chow_quantile(lp, mask, 0.25))
    assert set(out["scores"]) == {"chow_sum", "chow_average", "chow_quantile_0", "chow_quantile_0.25",
                                  "chow_quantile_0.5"}
    assert torch.equal(out["small_quality"], rec["small_exact_match"])
    # re-scoring only the small model and merging with the cached large records gives the same records
    only_small = LMCascade(pair.small, pair.large, pair.tokenizer, max_new_tokens=12, large_layer=1, roles=("small",))
    large_keys = {k: v for k, v in rec.items() if k.startswith("large_") and k != "large_embed"}
    merged = merge_records(only_small.predict_step(prompts), large_keys)
    for key in ("small_tokens", "small_exact_match", "large_exact_match", "large_embed"):
        torch.testing.assert_close(merged[key], rec[key])
    both = concat_records([rec, rec])
    assert both["small_tokens"].shape[0] == 12 and len(both["target"]) == 12


def test_cascade_rejects_vocab_mismatch_and_long_prompts(pair, prompts):
    other = build_causal_lm(gpt2_config(len(pair.tokenizer) + 5, n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        LMCascade(pair.small, other, pair.tokenizer)
    cascade = LMCascade(pair.small, pair.large, pair.tokenizer, max_new_tokens=250)
    with pytest.raises(ValueError, match="exceeds the model's context window of 256 tokens"):
        cascade.predict_step(prompts)
    with pytest.raises(ValueError, match="empty"):
        greedy_generate(pair.small, prompts["input_ids"], torch.zeros_like(prompts["attention_mask"]), 4, [0], 1)
    with pytest.raises(ValueError, match="`layer` must index"):
        output_hidden_states(pair.small, prompts["input_ids"], prompts["attention_mask"],
                             prompts["input_ids"][:, :2], torch.ones(6, 2, dtype=torch.bool), layer=9)


def test_golden_labels():
    qs, ql = torch.tensor([1.0, 0.0, 0.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, 0.25])
    assert golden_deferral_label(qs, ql).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert golden_deferral_label(qs, ql, "gain").tolist() == [0.0, 1.0, 0.0, -0.25]
    with pytest.raises(ValueError, match="`label` must be one of"):
        golden_deferral_label(qs, ql, "better")


def synthetic_records(n, seed):
    """Records where deferring helps exactly when the least likely token is very unlikely (a known signal)."""
    g = torch.Generator().manual_seed(seed)
    t = 10
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    logprobs = -torch.rand(n, t, generator=g) * 0.5
    hard = torch.rand(n, generator=g) < 0.3
    pos = (torch.rand(n, generator=g) * lengths).long()
    logprobs[hard, pos[hard]] = -4.0 - torch.rand(int(hard.sum()), generator=g)
    flip = torch.rand(n, generator=g) < 0.1  # label noise
    large_better = hard ^ flip
    small_q = (~large_better).float()
    large_q = torch.ones(n)
    return {"small_logprobs": logprobs, "small_mask": mask, "small_exact_match": small_q, "large_exact_match": large_q,
            "small_embed": torch.randn(n, 4, generator=g)}


def test_post_hoc_learner_beats_a_constant_on_a_known_signal(tmp_path):
    L.seed_everything(0, verbose=False)
    train, test = synthetic_records(800, 0), synthetic_records(400, 1)
    data = post_hoc_dataset(train, "quantile")
    rule = PostHocDeferral(in_features=11, features="quantile", hidden=16, num_layers=3, lr=1e-2)
    rule.fit_normalizer(data.records["features"])
    trainer = L.Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with single_thread():
        trainer.fit(rule, DataLoader(data, batch_size=100, shuffle=True))
    rule.eval()
    with torch.no_grad():
        score = rule.deferral_score(post_hoc_features(test, "quantile"))
    qs, ql = test["small_exact_match"], test["large_exact_match"]
    learned = deferral_metrics(score, qs, ql).scalars
    constant = deferral_metrics(torch.zeros(400), qs, ql).scalars
    assert constant["auc_df"] == pytest.approx(constant["auc_random"])
    assert learned["auc_df"] > constant["auc_df"] + 0.05
    assert learned["s_d"] > 0.6
    # an embed feature set reads the extra columns
    assert post_hoc_features(test, "embed1").shape == (400, 15)
    with pytest.raises(ValueError, match="needs `large_embed`"):
        post_hoc_features(test, "embed1+2")


def test_post_hoc_bad_config():
    with pytest.raises(ValueError, match="`features` must be one of"):
        PostHocDeferral(3, features="embed3")
    with pytest.raises(ValueError, match="`label` must be one of"):
        PostHocDeferral(3, label="x")
    rule = PostHocDeferral(3)
    with pytest.raises(ValueError, match=r"`features` must be \[B, 3\]"):
        rule(torch.zeros(2, 4))


def _cascade_test(devices: int, tmp_path) -> dict:
    from lit_cascades.callbacks import DeferralCurveLogger
    from lit_cascades.data.lm import train_bpe_tokenizer
    from lit_cascades.modules.lm_cascade import RecordsDataset

    tok = train_bpe_tokenizer(["def f(x):\n    return x\n" * 10], vocab_size=270)
    models = [build_causal_lm(gpt2_config(len(tok), n_layer=1, n_embd=8, n_head=2)) for _ in range(2)]
    cascade = LMCascade(*models, tok)
    records = synthetic_records(101, 3)  # odd: the DistributedSampler pads one duplicate
    records["large_exact_match"] = (torch.rand(101, generator=torch.Generator().manual_seed(4)) < 0.7).float()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        logger=False, callbacks=[DeferralCurveLogger(output_dir=tmp_path)],
                        enable_progress_bar=False, enable_model_summary=False)
    return trainer.test(cascade, DataLoader(RecordsDataset(records), batch_size=16), verbose=False)[0]


@pytest.mark.slow
def test_cascade_rules_under_ddp_spawn_equal_single_process(tmp_path):
    single = _cascade_test(1, tmp_path / "one")
    double = _cascade_test(2, tmp_path / "two")
    for rule in ("chow_sum", "chow_average", "chow_quantile_0"):
        for metric in ("auc_df", "s_d", "auroc", "small_quality"):
            key = f"test/defer/{rule}/{metric}"
            assert single[key] == pytest.approx(double[key], abs=1e-6), key
