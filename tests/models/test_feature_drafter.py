"""EAGLE-style feature drafters in speculative decoding, on tiny random GPT-2, Llama, Mistral (sliding window) and
Qwen2 verifiers.

Oracles: the verifier's own greedy HF ``generate`` (speculative decoding must emit exactly its tokens whatever
the drafter), a teacher-forced verifier pass (the features the drafter reads must be the verifier's hidden states
of the preceding tokens), and the same prompts decoded one at a time (batching must not change what the drafter
sees: its log-probabilities of the emitted tokens match).
"""

from __future__ import annotations

import pytest
import torch

from lit_cascades.models.feature_drafter import FeatureDrafter, feature_drafter_loss, shift_features
from lit_cascades.models.speculative import speculative_generate
from tests.models.test_speculative_architectures import (
    ARCHS,
    EOS,
    PAD,
    VOCAB,
    hf_greedy,
    left_padded,
    make_pair,
)


def train_drafter(verifier, steps: int = 120, seed: int = 0) -> tuple[FeatureDrafter, list[float]]:
    """A feature drafter fitted to ``verifier`` on its own greedy continuations (so that it accepts some drafts)."""
    torch.manual_seed(seed)
    drafter = FeatureDrafter(verifier)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(6, VOCAB, (16, 4), generator=g)
    with torch.no_grad():
        seqs = verifier.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=20, min_new_tokens=20, pad_token_id=PAD)
        out = verifier(input_ids=seqs, output_hidden_states=True)
        feats, logits = out.hidden_states[-1], out.logits
    opt = torch.optim.Adam([p for p in drafter.parameters() if p.requires_grad], lr=3e-3)
    agreement = []
    for _ in range(steps):
        parts = feature_drafter_loss(drafter, seqs, None, feats, logits, noise=0.0)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        agreement.append(float(parts["agreement"]))
    return drafter.eval(), agreement


@pytest.fixture(scope="module", params=ARCHS)
def feature_pair(request):
    _, verifier = make_pair(request.param)
    drafter, agreement = train_drafter(verifier)
    return request.param, drafter, verifier, agreement


def test_training_raises_agreement(feature_pair):
    arch, _, _, agreement = feature_pair
    assert sum(agreement[-10:]) / 10 > sum(agreement[:10]) / 10 + 0.2, (arch, agreement[:10], agreement[-10:])


def test_drafter_does_not_own_the_verifier_tables(feature_pair):
    _, drafter, verifier, _ = feature_pair
    own = {id(p) for p in drafter.parameters()}
    assert id(verifier.get_output_embeddings().weight) not in own
    assert id(verifier.get_input_embeddings().weight) not in own
    assert drafter.get_output_embeddings() is verifier.get_output_embeddings()


@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_equals_verifier_generate_batched(feature_pair, gamma):
    arch, drafter, verifier, _ = feature_pair
    ids, mask = left_padded([9, 3, 6, 1, 7], seed=gamma)
    ref, ref_mask = hf_greedy(verifier, ids, mask, 20)
    out = speculative_generate(drafter, verifier, ids, mask, 20, gamma=gamma, pad_token_id=PAD)
    assert out.tokens.tolist() == ref.tolist(), arch
    assert out.mask.tolist() == ref_mask.tolist()
    assert 0 < float(out.acceptance_rate.mean()) < 1, arch  # rows accept different numbers: realigned


class _Spy(FeatureDrafter):
    """Records each call's fed tokens, positions, input features and predicted features."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, features=None, **kwargs):
        out = super().forward(input_ids, attention_mask, position_ids, features, **kwargs)
        self.calls.append((input_ids[0].tolist(), position_ids[0].tolist(), features[0].clone(),
                           out.hidden_states[-1][0].clone()))
        return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_features_are_the_verifiers_of_the_preceding_token(arch):
    """Batch 1: every column the drafter reads gets either the verifier's teacher-forced hidden state of the
    token before it (verified prefix) or, for a token it drafted itself in the same round, its own prediction
    for the column before; never a stale or shifted feature."""
    _, verifier = make_pair(arch)
    trained, _ = train_drafter(verifier)
    spy = _Spy(verifier)
    spy.load_state_dict(trained.state_dict())
    spy.eval().calls = []
    prompt = torch.randint(6, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    out = speculative_generate(spy, verifier, prompt, torch.ones_like(prompt), 16, gamma=3, pad_token_id=PAD,
                               stop_counts=[])
    seq = torch.cat([prompt[0], out.tokens[0]])
    with torch.no_grad():
        real = verifier(input_ids=seq[None], output_hidden_states=True).hidden_states[-1][0]
    real_in = shift_features(real[None])[0]  # column j: the verifier's feature of token j − 1
    prev_pred, n_real, n_pred = None, 0, 0
    for tokens, positions, feats, pred in spy.calls:
        for k, (tok, pos) in enumerate(zip(tokens, positions, strict=True)):
            on_path = pos < len(seq) and int(seq[pos]) == tok and all(
                int(seq[p]) == t for p, t in zip(positions[:k], tokens[:k], strict=True))
            if on_path and torch.allclose(feats[k], real_in[pos], atol=1e-4):
                n_real += 1
            else:  # a draft column: the drafter's own prediction for the previous column
                assert k == 0 and prev_pred is not None, (arch, pos, tok)
                assert torch.allclose(feats[k], prev_pred, atol=1e-6), (arch, pos)
                n_pred += 1
        prev_pred = pred[-1]
    assert n_real > len(prompt[0]) and n_pred > 0  # both kinds occur
    assert float(out.acceptance_rate[0]) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_batching_does_not_change_what_the_drafter_reads(arch):
    """The drafter's log-probabilities of the emitted tokens depend on the features it was given: in a
    left-padded batch with per-row rollbacks they equal those of each prompt decoded alone (up to the last
    rounds, where the batch's draft length cap differs from a single row's)."""
    _, verifier = make_pair(arch)
    drafter, _ = train_drafter(verifier)
    lengths, m, gamma = [7, 2, 5, 4], 18, 3
    ids, mask = left_padded(lengths, seed=6)
    kw = dict(gamma=gamma, pad_token_id=PAD, stop_counts=[], output_logprobs=True)
    batch = speculative_generate(drafter, verifier, ids, mask, m, **kw)
    assert len(set(batch.accepted.tolist())) > 1  # rows accepted different numbers of drafts
    for i, n in enumerate(lengths):
        alone = speculative_generate(drafter, verifier, ids[i:i + 1, -n:], mask[i:i + 1, -n:], m, **kw)
        assert batch.tokens[i].tolist() == alone.tokens[0].tolist()
        k = m - gamma - 2
        assert torch.allclose(batch.drafter_logprobs[i, :k], alone.drafter_logprobs[0, :k], atol=1e-4), (arch, i)


def test_save_load_round_trip_and_errors(tmp_path):
    _, verifier = make_pair("llama")
    drafter, _ = train_drafter(verifier, steps=20)
    drafter.save(tmp_path / "d")
    again = FeatureDrafter.load(tmp_path / "d", verifier)
    ids, mask = left_padded([6, 3], seed=1)
    a = speculative_generate(drafter, verifier, ids, mask, 10, gamma=2, pad_token_id=PAD, output_logprobs=True)
    b = speculative_generate(again, verifier, ids, mask, 10, gamma=2, pad_token_id=PAD, output_logprobs=True)
    assert torch.equal(a.drafter_logprobs, b.drafter_logprobs) and torch.equal(a.accepted, b.accepted)
    with pytest.raises(FileNotFoundError, match="holds no feature drafter"):
        FeatureDrafter.load(tmp_path / "missing", verifier)
    _, wide = make_pair("gpt2")  # hidden size 32 as well: make one of another width
    wide_cfg = wide.config.__class__(**{**wide.config.to_dict(), "n_embd": 48})
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(wide_cfg)
    with pytest.raises(ValueError, match="hidden size 32; this verifier's is 48"):
        FeatureDrafter.load(tmp_path / "d", other)
    with pytest.raises(ValueError, match="width 32; the verifier's are 48"):
        speculative_generate(drafter, other, ids, mask, 4, pad_token_id=PAD)
    with pytest.raises(ValueError, match="pass features"):
        drafter(input_ids=ids)
    with pytest.raises(ValueError, match="`num_layers` must be an integer >= 1"):
        FeatureDrafter(verifier, num_layers=0)


def test_eos_stops_and_one_token_prompts():
    _, verifier = make_pair("qwen2")
    drafter, _ = train_drafter(verifier, steps=20)
    ids, mask = left_padded([1, 1, 4], seed=2)
    ref, ref_mask = hf_greedy(verifier, ids, mask, 12)
    out = speculative_generate(drafter, verifier, ids, mask, 12, gamma=2, pad_token_id=PAD, stop_counts=[EOS])
    assert out.tokens.tolist() == ref.tolist() and out.mask.tolist() == ref_mask.tolist()


def test_loss_by_hand_with_padding():
    """The EAGLE objective from its definition: Smooth-L1 (β = 1) of ĥ_j − f_j averaged over the feature width,
    plus w × the cross-entropy of the drafter's token distribution to the verifier's softmax; both averaged over the
    unmasked positions only; column j reads f_{j−1} (zeros at column 0)."""
    _, verifier = make_pair("llama")
    drafter = FeatureDrafter(verifier)
    ids = torch.randint(6, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = verifier(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        feats, logits = out.hidden_states[-1], out.logits
    parts = feature_drafter_loss(drafter, ids, mask, feats, logits, cls_weight=0.3, noise=0.0)
    reg = cls = agree = 0.0
    n = 0
    for b in range(2):
        for j in range(6):
            if not mask[b, j]:
                continue
            # the predecessor's feature; zeros before a row's first token (column 0 or a padding column)
            prev = feats[b, j - 1] if j > 0 and mask[b, j - 1] else torch.zeros_like(feats[b, 0])
            inputs = torch.stack([feats[b, k - 1] if k > 0 and mask[b, k - 1] else torch.zeros_like(feats[b, 0])
                                  for k in range(6)])
            assert torch.equal(inputs[j], prev)
            with torch.no_grad():
                h = drafter(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], position_ids=pos[b:b + 1],
                            features=inputs[None]).hidden_states[-1][0, j]
            diff = (h - feats[b, j]).abs()
            reg += float(torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean())
            q = torch.log_softmax(verifier.get_output_embeddings()(h), -1)
            p = torch.softmax(logits[b, j], -1)
            cls += float(-(p * q).sum())
            agree += float(q.argmax() == p.argmax())
            n += 1
    assert float(parts["regression"]) == pytest.approx(reg / n, rel=1e-4)
    assert float(parts["classification"]) == pytest.approx(cls / n, rel=1e-4)
    assert float(parts["loss"]) == pytest.approx(reg / n + 0.3 * cls / n, rel=1e-4)
    assert float(parts["agreement"]) == pytest.approx(agree / n)


def test_unrolled_loss_by_hand_with_padding():
    """``unroll=2``: pass 2 reads, in column j, pass 1's prediction ĥ_{j−1} (zeros before a row's first token);
    the terms are the means over the passes, ``agreement_2`` is pass 2's, and gradients flow through the chained
    prediction (the parameter gradients equal those of the same computation written out per row)."""
    _, verifier = make_pair("qwen2")
    drafter = FeatureDrafter(verifier)
    ids = torch.randint(6, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = verifier(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        feats, logits = out.hidden_states[-1], out.logits
    parts = feature_drafter_loss(drafter, ids, mask, feats, logits, cls_weight=0.2, noise=0.0, unroll=2)
    parts["loss"].backward()
    grads = {k: p.grad.clone() for k, p in drafter.named_parameters() if p.requires_grad}
    drafter.zero_grad()

    def prev(x, b):  # column j <- x[j - 1], zeros where the previous column is padding or absent
        return torch.stack([x[j - 1] * mask[b, j - 1] if j > 0 else torch.zeros_like(x[0]) for j in range(7)])

    terms = {1: [0.0, 0.0, 0.0], 2: [0.0, 0.0, 0.0]}  # pass -> [regression, classification, agreement] sums
    n = int(mask.sum())
    for b in range(2):
        row = dict(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], position_ids=pos[b:b + 1])
        h1 = drafter(**row, features=prev(feats[b], b)[None]).hidden_states[-1][0]
        h2 = drafter(**row, features=prev(h1, b)[None]).hidden_states[-1][0]
        for k, h in ((1, h1), (2, h2)):
            keep = mask[b].bool()
            diff = (h - feats[b]).abs()
            terms[k][0] = terms[k][0] + torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean(-1)[keep].sum()
            q = torch.log_softmax(verifier.get_output_embeddings()(h), -1)
            terms[k][1] = terms[k][1] + (-(torch.softmax(logits[b], -1) * q).sum(-1))[keep].sum()
            terms[k][2] += float((q.argmax(-1) == logits[b].argmax(-1))[keep].sum())
    reg = (terms[1][0] + terms[2][0]) / (2 * n)
    cls = (terms[1][1] + terms[2][1]) / (2 * n)
    assert float(parts["regression"]) == pytest.approx(float(reg), rel=1e-4)
    assert float(parts["classification"]) == pytest.approx(float(cls), rel=1e-4)
    assert float(parts["agreement"]) == pytest.approx(terms[1][2] / n)
    assert float(parts["agreement_2"]) == pytest.approx(terms[2][2] / n)
    (reg + 0.2 * cls).backward()
    for k, p in drafter.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="`unroll` must be an integer >= 1"):
        feature_drafter_loss(drafter, ids, mask, feats, logits, unroll=0)


def test_lightning_module_keeps_the_verifier_out():
    from lit_cascades.modules.feature_drafter import FeatureDrafterLM

    _, verifier = make_pair("gpt2")
    module = FeatureDrafterLM(teacher=verifier, num_layers=2, noise=0.0)
    assert module.model.num_layers == 2 and "teacher" not in module.hparams
    state = module.state_dict()
    assert not any(k.startswith("teacher") for k in state)
    assert not any(v.ndim == 2 and v.shape[0] == VOCAB for v in state.values())  # no copy of its vocabulary tables
    batch = {"input_ids": torch.randint(6, VOCAB, (2, 8))}
    module.model.eval()  # GPT-2's config has dropout: compare deterministic passes
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: the logs are dropped
        loss = module.training_step(batch, 0)
    with torch.no_grad():
        out = verifier(input_ids=batch["input_ids"], output_hidden_states=True)
    expected = feature_drafter_loss(module.model, batch["input_ids"], None, out.hidden_states[-1], out.logits,
                                    noise=0.0)["loss"]
    torch.testing.assert_close(loss.detach(), expected.detach())
    loss.backward()
    assert module.model.fc.weight.grad is not None
    assert verifier.get_output_embeddings().weight.grad is None  # the verifier is frozen
    with pytest.raises(ValueError, match="`teacher`"):
        FeatureDrafterLM()
    with pytest.raises(TypeError, match="must be a FeatureDrafter"):
        FeatureDrafterLM(model=torch.nn.Linear(2, 2), teacher=verifier)
    with pytest.raises(ValueError, match="`unroll` must be an integer >= 1; got 0"):
        FeatureDrafterLM(teacher=verifier, unroll=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_teacher_dtype_rounds_the_targets_only(arch):
    """``teacher_dtype="bfloat16"``: the verifier's targets come back in float32, within bfloat16 rounding of the
    float32 pass (and not identical to it: the setting takes effect), and the verifier's own weights stay float32."""
    from lit_cascades.modules.feature_drafter import FeatureDrafterLM

    _, verifier = make_pair(arch)
    verifier.eval()
    ids = torch.randint(6, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    exact = FeatureDrafterLM(teacher=verifier).verifier_targets(ids, mask)
    rounded = FeatureDrafterLM(teacher=verifier, teacher_dtype="bfloat16").verifier_targets(ids, mask)
    for e, r in zip(exact, rounded):
        assert r.dtype == torch.float32 and r.shape == e.shape
        assert not torch.equal(e, r)
        torch.testing.assert_close(r, e, atol=0.05 * float(e.abs().max()), rtol=0.05)
    assert all(p.dtype == torch.float32 for p in verifier.parameters())
    with pytest.raises(ValueError, match="`teacher_dtype` must be one of"):
        FeatureDrafterLM(teacher=verifier, teacher_dtype="int8")
