"""Batched speculative(-cascade) decoding against oracles: the verifier's / drafter's own greedy decoding, HF
assisted generation, per-prompt decoding, and the exact sampling distribution on a tiny vocabulary."""

from __future__ import annotations

import pytest
import torch

from lit_cascades.models.generation import greedy_generate
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config, truncated_copy
from lit_cascades.models.speculative import hf_constant_drafting, speculative_generate

STOP = 7  # a stop token (the models' eos) that random models do emit now and then


def random_pair(vocab: int = 50, layers: int = 2, seed: int = 2, n_positions: int = 64):
    """A verifier with untied, spread-out logits (no near-ties) and a drafter made of its first layer, so that
    they agree on some tokens and not on others."""
    torch.manual_seed(seed)
    config = gpt2_config(vocab, n_layer=layers, n_embd=32, n_head=2, n_positions=n_positions, eos_token_id=STOP,
                         pad_token_id=0)
    config.tie_word_embeddings = False
    config.initializer_range = 0.1
    verifier = build_causal_lm(config).eval()
    with torch.no_grad():
        verifier.lm_head.weight.normal_(0, 0.5)
    return truncated_copy(verifier, 1).eval(), verifier


def left_padded(lengths, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.fixture(scope="module")
def pair():
    return random_pair()


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_spec_decode_equals_verifier_greedy(pair, gamma):
    drafter, verifier = pair
    ids, mask = left_padded([9, 3, 6, 1, 7])
    ref = greedy_generate(verifier, ids, mask, 24, [STOP], pad_token_id=0)
    out = speculative_generate(drafter, verifier, ids, mask, 24, rule="spec_decode", gamma=gamma, temperature=0,
                               stop_counts=[STOP], pad_token_id=0)
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.mask, ref.mask)
    assert torch.equal(out.stopped, ref.stopped)
    assert 0 < float(out.acceptance_rate.mean()) < 1  # a real mix of accepted and rejected drafts
    assert bool((out.accepted <= out.drafted).all())
    assert bool((out.num_tokens <= out.verifier_calls * (gamma + 1)).all())
    assert bool((out.drafter_calls <= out.verifier_calls * gamma).all())
    if gamma > 1:
        assert float(out.tokens_per_verifier_call.mean()) > 1.0


def test_greedy_spec_decode_equals_hf_assisted_generation(pair):
    """Same tokens as HF assisted generation with the same constant γ, and the same number of verifier calls
    (HF reads its drafting policy from the assistant's ``generation_config``, set by ``hf_constant_drafting``)."""
    drafter, verifier = pair
    ids, mask = left_padded([9, 4, 6], seed=1)
    calls = []
    handle = verifier.register_forward_hook(lambda *args: calls.append(1))
    try:
        for gamma in (2, 4):
            out = speculative_generate(drafter, verifier, ids, mask, 16, gamma=gamma, stop_counts=[STOP],
                                       pad_token_id=0)
            for b in range(ids.shape[0]):
                prompt = ids[b:b + 1, mask[b].bool()]
                solo = speculative_generate(drafter, verifier, prompt, torch.ones_like(prompt), 16, gamma=gamma,
                                            stop_counts=[STOP], pad_token_id=0)
                calls.clear()
                with hf_constant_drafting(drafter, gamma):
                    hf = verifier.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=drafter,
                                           do_sample=False, max_new_tokens=16, eos_token_id=STOP,
                                           pad_token_id=0)[0, prompt.shape[1]:]
                ours = out.tokens[b, out.mask[b]]
                assert ours.tolist() == hf[: ours.numel()].tolist()
                assert ours.numel() == hf.numel() or int(hf[ours.numel()]) == 0
                assert int(solo.verifier_calls[0]) == len(calls)  # the same accept/reject rounds as HF
    finally:
        handle.remove()


def test_greedy_drafter_only_equals_drafter_greedy(pair):
    drafter, verifier = pair
    ids, mask = left_padded([5, 8, 2], seed=3)
    ref = greedy_generate(drafter, ids, mask, 20, [STOP], pad_token_id=0)
    out = speculative_generate(drafter, verifier, ids, mask, 20, rule="drafter_only", gamma=3, stop_counts=[STOP],
                               pad_token_id=0)  # default bonus: from the drafter, for drafter_only
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.mask, ref.mask)
    assert bool((out.acceptance_rate == 1).all())
    assert bool((out.deferred == 0).all())


def test_deferral_counts_follow_the_rule(pair):
    """``deferred`` counts the emitted tokens at which the rule picks the verifier: all for spec_decode, and for
    Chow (greedy, ``bonus="target"``) the positions where the drafter's max probability, in a teacher-forced pass
    over the output, is below 1 − α; it differs from the rejection count."""
    drafter, verifier = pair
    ids, mask = left_padded([6, 3, 8, 5], seed=7)
    spec = speculative_generate(drafter, verifier, ids, mask, 16, gamma=3, stop_counts=[STOP])
    assert torch.equal(spec.deferred, spec.num_tokens) and bool((spec.deferral_rate == 1).all())
    alpha = 0.6
    out = speculative_generate(drafter, verifier, ids, mask, 16, rule="chow", alpha=alpha, gamma=3,
                               stop_counts=[STOP], bonus="target")
    full = torch.cat([ids, out.tokens], 1)
    full_mask = torch.cat([mask, out.mask.long()], 1)
    with torch.no_grad():
        logits = drafter(input_ids=full, attention_mask=full_mask,
                         position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    max_q = torch.softmax(logits[:, ids.shape[1] - 1:-1].float(), -1).max(-1).values
    expected = ((max_q < 1 - alpha) & out.mask).sum(-1)
    assert out.deferred.tolist() == expected.tolist()
    assert 0 < int(out.deferred.sum()) < int(out.num_tokens.sum())
    rejected = out.drafted - out.accepted
    assert out.deferred.tolist() != rejected.tolist()


@pytest.mark.parametrize(("rule", "alpha"), [("token_v3", 0.3), ("opt", 0.5), ("chow", 0.4), ("lossy", 0.5)])
def test_batch_equals_each_prompt_alone(pair, rule, alpha):
    drafter, verifier = pair
    ids, mask = left_padded([9, 2, 5, 7], seed=4)
    out = speculative_generate(drafter, verifier, ids, mask, 18, rule=rule, alpha=alpha, gamma=3,
                               stop_counts=[STOP], pad_token_id=0)
    for b in range(ids.shape[0]):
        prompt = ids[b:b + 1, mask[b].bool()]
        alone = speculative_generate(drafter, verifier, prompt, torch.ones_like(prompt), 18, rule=rule, alpha=alpha,
                                     gamma=3, stop_counts=[STOP], pad_token_id=0)
        assert alone.tokens[0].tolist() == out.tokens[b].tolist()
        assert int(alone.accepted[0]) == int(out.accepted[b])
        assert int(alone.verifier_calls[0]) == int(out.verifier_calls[b])


def test_cascade_rules_interpolate_between_drafter_and_verifier(pair):
    drafter, verifier = pair
    ids, mask = left_padded([6, 6, 6, 6], seed=5)
    small = greedy_generate(drafter, ids, mask, 16, [STOP], pad_token_id=0).tokens
    large = greedy_generate(verifier, ids, mask, 16, [STOP], pad_token_id=0).tokens
    kwargs = dict(gamma=3, stop_counts=[STOP], pad_token_id=0, bonus="target")
    always = speculative_generate(drafter, verifier, ids, mask, 16, rule="diff", alpha=-1.0, **kwargs)
    never = speculative_generate(drafter, verifier, ids, mask, 16, rule="diff", alpha=1.0, **kwargs)
    assert torch.equal(always.tokens, large) and torch.equal(never.tokens, small)
    rates = [float(speculative_generate(drafter, verifier, ids, mask, 16, rule="token_v3", alpha=a, **kwargs)
                   .acceptance_rate.mean()) for a in (0.0, 0.5, 1.0)]
    assert rates == sorted(rates) and rates[-1] == 1.0


def _two_token_distribution(model, prompt: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    """Exact probability ``[V·V]`` of the first two tokens sampled at ``temperature`` (enumeration)."""
    with torch.no_grad():
        first = torch.softmax(model(prompt).logits[0, -1] / temperature, -1)           # [V]
        seqs = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        second = torch.softmax(model(seqs).logits[:, -1] / temperature, -1)              # [V, V]
    return (first[:, None] * second).reshape(-1)


def _chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson χ² test of ``samples`` (category ids) against ``probs``; categories with an expected count < 5
    are pooled into one."""
    stats = pytest.importorskip("scipy.stats")
    n = samples.numel()
    observed = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if float(exp[-1]) < 5:  # fold a tiny pooled bin into the smallest kept one
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[exp.argmin()] += observed[~big].sum()
        exp[exp.argmin()] += expected[~big].sum()
    exp = exp * obs.sum() / exp.sum()
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_sampling_matches_the_models_distributions():
    """Over 3000 independent rows (one batch, fixed seed), the first two emitted tokens of ``spec_decode``
    follow the verifier's exact two-token distribution, and those of ``drafter_only`` the drafter's (χ² test at
    a false-alarm rate of 1e-3 each); the test can fail: the drafter's samples are rejected against the
    verifier's distribution."""
    vocab, temperature, n = 8, 0.8, 3000
    drafter, verifier = random_pair(vocab=vocab, layers=2, seed=11)
    prompt = torch.tensor([[1, 5, 2, 3]])
    ids, mask = prompt.expand(n, -1), torch.ones(n, 4, dtype=torch.long)
    samples = {}
    for rule, bonus in (("spec_decode", "verifier"), ("drafter_only", "target")):
        out = speculative_generate(drafter, verifier, ids, mask, 2, rule=rule, gamma=2, temperature=temperature,
                                   bonus=bonus, stop_counts=[], generator=torch.Generator().manual_seed(0))
        samples[rule] = out.tokens[:, 0] * vocab + out.tokens[:, 1]
    p_two = _two_token_distribution(verifier, prompt, vocab, temperature)
    q_two = _two_token_distribution(drafter, prompt, vocab, temperature)
    assert 0.5 * float((p_two - q_two).abs().sum()) > 0.1  # the models differ enough for the test to bite
    assert _chi_square_pvalue(samples["spec_decode"], p_two) > 1e-3
    assert _chi_square_pvalue(samples["drafter_only"], q_two) > 1e-3
    assert _chi_square_pvalue(samples["drafter_only"], p_two) < 1e-3


def _processed(logits: torch.Tensor, history: torch.Tensor, temperature: float, top_k: int, top_p: float,
               repetition_penalty: float) -> torch.Tensor:
    """Hand-written HF sampling pipeline: repetition penalty on the history's tokens, temperature, top-k, top-p
    (drop the tokens whose ascending cumulative probability is <= 1 − top_p), then softmax. ``[N, V]``."""
    logits = logits.clone().float()
    for row, hist in zip(logits, history):
        seen = torch.unique(hist)
        row[seen] = torch.where(row[seen] > 0, row[seen] / repetition_penalty, row[seen] * repetition_penalty)
    logits = logits / temperature
    kth = logits.topk(top_k, -1).values[:, -1:]
    logits = logits.masked_fill(logits < kth, -float("inf"))
    sorted_logits, order = logits.sort(-1)
    cum = torch.softmax(sorted_logits, -1).cumsum(-1)
    drop_sorted = cum <= 1 - top_p
    drop_sorted[:, -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return torch.softmax(logits.masked_fill(drop, -float("inf")), -1)


def test_sampling_with_top_k_top_p_and_penalty_follows_the_processed_verifier():
    """With top-k, top-p and a repetition penalty set on the verifier's generation_config, the first two sampled
    tokens of ``spec_decode`` follow the hand-computed processed two-token distribution of the verifier (χ², 4,000
    rows), and not the unprocessed one."""
    vocab, temperature, n = 10, 0.9, 4000
    drafter, verifier = random_pair(vocab=vocab, layers=2, seed=13)
    settings = dict(top_k=6, top_p=0.85, repetition_penalty=1.6)
    prompt = torch.tensor([[1, 5, 2, 3]])
    out = speculative_generate(drafter, verifier, prompt.expand(n, -1), torch.ones(n, 4, dtype=torch.long), 2,
                               gamma=2, temperature=temperature, stop_counts=[], generation_kwargs=settings,
                               generator=torch.Generator().manual_seed(1))
    samples = out.tokens[:, 0] * vocab + out.tokens[:, 1]
    with torch.no_grad():
        first = _processed(verifier(prompt).logits[:, -1], prompt, temperature, **settings)[0]
        seqs = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        second = _processed(verifier(seqs).logits[:, -1], seqs, temperature, **settings)
    processed = (first[:, None] * second).reshape(-1)
    raw = _two_token_distribution(verifier, prompt, vocab, temperature)
    assert 0.5 * float((processed - raw).abs().sum()) > 0.1  # the controls change the distribution
    assert int((processed == 0).sum()) > 0 and int(torch.bincount(samples, minlength=vocab * vocab)[processed == 0]
                                                   .sum()) == 0  # never a token that top-k/top-p removed
    assert _chi_square_pvalue(samples, processed) > 1e-3
    assert _chi_square_pvalue(samples, raw) < 1e-3


def test_bad_input(pair):
    drafter, verifier = pair
    ids, mask = left_padded([3, 3])
    other = build_causal_lm(gpt2_config(40, n_layer=1, n_embd=32, n_head=2, n_positions=64))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(other, verifier, ids, mask, 4)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(drafter, verifier, ids, mask, 4, gamma=0)
    with pytest.raises(ValueError, match="alpha"):
        speculative_generate(drafter, verifier, ids, mask, 4, rule="chow", alpha=2.0)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(drafter, verifier, ids, mask, 4, temperature=-0.1)
    with pytest.raises(ValueError, match="context window"):
        speculative_generate(drafter, verifier, ids, mask, 62)
    with pytest.raises(ValueError, match="empty"):
        speculative_generate(drafter, verifier, ids, mask * torch.tensor([[1], [0]]), 4)
    with pytest.raises(ValueError, match="bonus"):
        speculative_generate(drafter, verifier, ids, mask, 4, bonus="nope")
