"""Speculative-cascade targets and the accept/reject step against hand computations, enumeration and HF."""

from __future__ import annotations

import pytest
import torch

from lit_cascades.functional.speculative import (
    ALPHA_RANGES,
    RULES,
    acceptance_probability,
    residual_distribution,
    rule_acceptance,
    scaled_probs,
    target_distribution,
    total_variation,
    verify_block,
)

Q = torch.tensor([0.6, 0.3, 0.1])
P = torch.tensor([0.2, 0.5, 0.3])


@pytest.mark.parametrize(("rule", "alpha", "expected"), [
    ("spec_decode", None, P.tolist()),
    ("drafter_only", None, Q.tolist()),
    ("chow", 0.3, P.tolist()),            # max q = 0.6 < 1 − 0.3
    ("chow", 0.5, Q.tolist()),            # 0.6 >= 0.5
    ("diff", 0.0, Q.tolist()),            # 0.6 >= 0.5 − 0
    ("diff", -0.2, P.tolist()),           # 0.6 < 0.5 + 0.2
    ("opt", 0.25, Q.tolist()),            # D_TV = 0.4: 0.6 >= 0.5 − 0.1
    ("opt", -0.5, P.tolist()),            # 0.6 < 0.5 + 0.2
    ("token_v1", 0.2, [0.62, 0.35, 0.03]),  # a = 1{q >= 0.3} = [1, 1, 0]; 0.1 of q's mass goes to p
    ("token_v2", 0.25, [0.12, 0.60, 0.28]),  # a = 1{p >= 0.25} = [0, 1, 1]; 0.6 · p
    ("token_v3", 0.5, [0.12, 0.60, 0.28]),   # a = 1{p >= 0.5 · 0.5}
    ("token_v3", 0.1, [0.14, 0.65, 0.21]),   # a = 1{p >= 0.45} = [0, 1, 0]; 0.7 · p
    ("lossy", 0.5, [0.40, 0.40, 0.20]),      # accept [2/3, 1, 1]; 0.2 rejected mass → norm(max(0, p − q))
    ("lossy", 0.0, P.tolist()),
])
def test_target_by_hand(rule, alpha, expected):
    pi = target_distribution(rule, Q, P, alpha)
    torch.testing.assert_close(pi, torch.tensor(expected), atol=1e-6, rtol=0)
    assert abs(float(pi.sum()) - 1.0) < 1e-6


def test_decision_uses_temperature_one_probabilities():
    q_raw, p_raw = Q, P
    q0, p0 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])  # T = 0 one-hots
    # the scaled q is one-hot (max 1) but Chow decides on max q̃ = 0.6 < 1 − 0.3: defer → π = p0
    torch.testing.assert_close(target_distribution("chow", q0, p0, 0.3, q_raw, p_raw), p0)
    torch.testing.assert_close(target_distribution("chow", q0, p0, 0.5, q_raw, p_raw), q0)
    # token_v3 with α = 0.1: a = [0, 1, 0] on p̃; q0 has all its mass outside a → π = p0
    torch.testing.assert_close(target_distribution("token_v3", q0, p0, 0.1, q_raw, p_raw), p0)


def test_scaled_probs():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    torch.testing.assert_close(scaled_probs(logits, 0.0), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(scaled_probs(logits, 0.5), torch.softmax(logits / 0.5, -1))
    with pytest.raises(ValueError, match="temperature"):
        scaled_probs(logits, -1.0)


def _random_dists(n: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    q = torch.distributions.Dirichlet(torch.full((v,), 0.7)).sample((n,))
    p = torch.distributions.Dirichlet(torch.full((v,), 0.7)).sample((n,))
    return q, p


def _alphas(rule: str) -> list[float | None]:
    bounds = ALPHA_RANGES[rule]
    if bounds is None:
        return [None]
    lo, hi = max(bounds[0], -2.0), min(bounds[1], 2.0)
    return [lo, (lo + hi) / 2, 0.3 * lo + 0.7 * hi, hi]


def _emitted_distribution(rule, q, p, alpha):
    """Exact distribution of the token emitted at one position (γ = 1), enumerating every draft."""
    n, v = q.shape
    drafts = torch.arange(v).repeat(n)[:, None]                      # [n·V, 1]: every candidate of every row
    qq, pp = q.repeat_interleave(v, 0)[:, None], p.repeat_interleave(v, 0)[:, None]
    accept, residual, _ = rule_acceptance(rule, drafts, qq, pp, alpha)
    accept = accept.view(n, v)
    residual = residual[:, 0].view(n, v, v)[:, 0]                    # the same for every draft of a row
    reject_mass = (q * (1 - accept)).sum(-1, keepdim=True)
    return q * accept + reject_mass * residual, reject_mass.squeeze(-1)


@pytest.mark.parametrize("rule", RULES)
def test_step_emits_the_target_exactly(rule):
    q, p = _random_dists(64, 6, 0)
    for alpha in _alphas(rule):
        pi = target_distribution(rule, q, p, alpha)
        torch.testing.assert_close(pi.sum(-1), torch.ones(64), atol=1e-5, rtol=0)
        assert bool((pi >= 0).all())
        emitted, rejection = _emitted_distribution(rule, q, p, alpha)
        torch.testing.assert_close(emitted, pi, atol=1e-5, rtol=0)
        if rule != "lossy":  # generic speculative sampling rejects with probability D_TV(q, π) (Lemma 3)
            torch.testing.assert_close(rejection, total_variation(q, pi), atol=1e-5, rtol=0)


def test_rules_keep_q_or_p_where_they_decide():
    q, p = _random_dists(200, 5, 1)
    for rule in ("chow", "diff", "opt"):
        pi = target_distribution(rule, q, p, 0.3)
        is_q = (pi - q).abs().amax(-1) < 1e-7
        is_p = (pi - p).abs().amax(-1) < 1e-7
        assert bool((is_q | is_p).all()) and bool(is_q.any()) and bool(is_p.any())
    # always-defer settings reproduce p exactly; never-defer ones reproduce q
    for rule, alpha in (("diff", -1.0), ("token_v1", -1.0), ("token_v2", -1.0), ("lossy", 0.0)):
        torch.testing.assert_close(target_distribution(rule, q, p, alpha), p)
    for rule, alpha in (("chow", 1.0), ("diff", 1.0)):
        torch.testing.assert_close(target_distribution(rule, q, p, alpha), q)


def test_speculative_decoding_matches_hf_formulas():
    q, p = _random_dists(32, 7, 2)
    draft = torch.multinomial(q, 1)
    accept = acceptance_probability(draft[:, 0], q, p)
    expected = (p.gather(-1, draft) / q.gather(-1, draft)).clamp(max=1).squeeze(-1)
    torch.testing.assert_close(accept, expected)
    res = (p - q).clamp(min=0)
    torch.testing.assert_close(residual_distribution(q, p), res / res.sum(-1, keepdim=True))


def test_verify_block_matches_hf_speculative_sampling():
    utils = pytest.importorskip("transformers.generation.utils")
    gamma, v = 4, 8
    agree = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(1000 + seed)
        draft_logits = torch.randn(1, gamma, v, generator=g)
        target_logits = torch.randn(1, gamma + 1, v, generator=g) + 1.5 * torch.nn.functional.pad(draft_logits, (0, 0, 0, 1))
        q = draft_logits.softmax(-1)
        draft = torch.multinomial(q[0], 1, generator=g).T                # [1, γ]
        torch.manual_seed(seed)
        hf_tokens, hf_n = utils._speculative_sampling(
            torch.cat([torch.zeros(1, 3, dtype=torch.long), draft], 1), draft_logits, gamma, target_logits)
        p = target_logits.softmax(-1)
        accept, residual, _ = rule_acceptance("spec_decode", draft, q, p[:, :gamma])
        torch.manual_seed(seed)  # same global stream: coins first, then the final draw
        n, nxt = verify_block(draft, accept, residual, p[:, gamma])
        assert int(n) == int(hf_n)
        assert torch.cat([draft[0, :n], nxt]).tolist() == hf_tokens[0].tolist()
        agree += int(n) < gamma
    assert agree > 5  # the test exercised rejections


def test_verify_block_is_vectorised_and_greedy_matches_argmax():
    v, gamma = 5, 3
    p_logits = torch.randn(4, gamma + 1, v, generator=torch.Generator().manual_seed(3))
    p = scaled_probs(p_logits, 0.0)
    greedy = p_logits.argmax(-1)
    draft = greedy[:, :gamma].clone()
    draft[1, 0] = (draft[1, 0] + 1) % v   # row 1 rejects its first draft
    draft[2, 2] = (draft[2, 2] + 1) % v   # row 2 its third
    q = torch.nn.functional.one_hot(draft, v).float()
    accept, residual, _ = rule_acceptance("spec_decode", draft, q, p[:, :gamma])
    n, nxt = verify_block(draft, accept, residual, p[:, gamma])
    assert n.tolist() == [3, 0, 2, 3]
    assert nxt.tolist() == [greedy[0, 3], greedy[1, 0], greedy[2, 2], greedy[3, 3]]
    # given coins: acceptance is exactly u < min(1, π/q)
    acc = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    n, _ = verify_block(torch.zeros(2, 2, dtype=torch.long), acc, torch.full((2, 2, 3), 1 / 3), torch.full((2, 3), 1 / 3),
                        uniforms=torch.tensor([[0.4, 0.6], [0.7, 0.1]]))
    assert n.tolist() == [1, 0]


def test_bad_input():
    with pytest.raises(ValueError, match="rule"):
        target_distribution("nope", Q, P, 0.1)
    with pytest.raises(ValueError, match=r"alpha.*chow"):
        target_distribution("chow", Q, P, 1.5)
    with pytest.raises(ValueError, match=r"alpha.*token_v3"):
        target_distribution("token_v3", Q, P, -0.5)
    with pytest.raises(TypeError, match="alpha"):
        target_distribution("diff", Q, P, None)
    with pytest.raises(ValueError, match="same shape"):
        target_distribution("diff", Q, P[:2], 0.1)
    with pytest.raises(ValueError, match=r"\[B, γ\]"):
        verify_block(torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2, 1, 3), torch.zeros(2, 3))


def test_defers_hand_computed():
    """The rule's deferral decision on one hand-made pair of distributions."""
    from lit_cascades.functional.speculative import defers

    q = torch.tensor([0.7, 0.2, 0.1])
    p = torch.tensor([0.1, 0.6, 0.3])
    assert bool(defers("spec_decode", q, p)) and not bool(defers("drafter_only", q, p))
    assert not bool(defers("chow", q, p, 0.4)) and bool(defers("chow", q, p, 0.2))  # max q 0.7 vs 1 - α
    assert bool(defers("diff", q, p, 0.0)) is False and bool(defers("diff", q, p, -0.2))  # 0.7 vs 0.6 - α
    assert bool(defers("token_v1", q, p, 0.0))  # a = [1, 0, 0]: 0.3 of q's mass goes to p
    assert not bool(defers("token_v1", q, p, 1.0))  # every token accepted: π = q
    assert bool(defers("lossy", q, p, 0.0))  # exact speculative decoding: π = p ≠ q
    batch = torch.stack([q, p])
    assert defers("chow", batch, batch.flip(0), 0.35).tolist() == [False, True]  # max 0.7 / 0.6 vs 0.65
