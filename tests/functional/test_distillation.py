"""SALT's KD term and combined loss against hand formulas and the unchunked reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_cascades.functional.distillation import (
    kd_loss,
    kd_weight_at,
    naive_kd_loss,
    naive_salt_loss,
    salt_loss,
)


def hand_kd(z, a, target, tau, ignore_index=-100):
    """τ²·KL(softmax(a/τ) ‖ softmax(z/τ)) written out position by position, mean over counted positions."""
    total, n = 0.0, 0
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            if target is not None and int(target[b, t]) == ignore_index:
                continue
            q = [math.exp(v / tau) for v in a[b, t].tolist()]
            p = [math.exp(v / tau) for v in z[b, t].tolist()]
            sq, sp = sum(q), sum(p)
            total += tau**2 * sum(qi / sq * math.log((qi / sq) / (pi / sp)) for qi, pi in zip(q, p))
            n += 1
    return total / n


def rand_case(b=2, t=5, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    a = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (b, t), generator=g)
    return z, a, y


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_kd_equals_hand_formula_teacher_to_student_direction(tau):
    z, a, y = rand_case()
    y[0, 1] = y[1, 4] = -100
    got = kd_loss(z, a, y, temperature=tau, chunk_size=2)
    assert got.item() == pytest.approx(hand_kd(z, a, y, tau), rel=1e-9)
    # the reverse direction KL(student ‖ teacher) is a different number here: the test can tell them apart
    assert got.item() != pytest.approx(hand_kd(a, z, y, tau), rel=1e-3)


def test_kd_hand_case_two_tokens():
    # teacher (0.5, 0.5), student (e/(1+e), 1/(1+e)) at tau=1: KL = 0.5 log(0.5/p0) + 0.5 log(0.5/p1)
    z = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    a = torch.zeros(1, 1, 2, dtype=torch.float64)
    p0 = math.e / (1 + math.e)
    expected = 0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / (1 - p0))
    assert kd_loss(z, a).item() == pytest.approx(expected, rel=1e-12)
    # tau = 2: both distributions tempered, times tau^2
    p0 = math.exp(0.5) / (1 + math.exp(0.5))
    expected2 = 4 * (0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / (1 - p0)))
    assert kd_loss(z, a, temperature=2.0).item() == pytest.approx(expected2, rel=1e-12)


def test_kd_is_zero_when_student_equals_teacher():
    z, _, y = rand_case()
    assert kd_loss(z, z.clone(), y, temperature=2.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("weight,tau", [(0.0, 1.0), (0.3, 1.0), (0.7, 2.5), (1.0, 0.5)])
def test_chunked_salt_loss_matches_naive_in_value_and_gradient(chunk, weight, tau):
    z, a, y = rand_case(b=3, t=6, v=11, seed=1)
    y[1, :2] = -100
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    out = salt_loss(z1, a, y, kd_weight=weight, temperature=tau, chunk_size=chunk)
    ref = naive_salt_loss(z2, a, y, kd_weight=weight, temperature=tau)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert out.ntp.item() == pytest.approx(F.cross_entropy(z.flatten(0, 1), y.flatten()).item(), rel=1e-10)
    assert out.kd.item() == pytest.approx(naive_kd_loss(z, a, y, tau).item(), rel=1e-10)
    assert int(out.num_tokens) == 16
    out.loss.backward()
    ref.backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-12)
    assert torch.count_nonzero(z1.grad[1, :2]) == 0  # ignored positions get no gradient


def test_gradcheck_and_non_contiguous_and_low_precision_inputs():
    z, a, y = rand_case(b=2, t=4, v=5, seed=2)
    zz = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: salt_loss(x, a, y, 0.4, 1.7, chunk_size=3).loss, (zz,))
    full = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 6, 9, dtype=torch.float64)
    tgt = torch.randint(0, 9, (2, 5))
    out = salt_loss(full[:, :-1], teacher[:, :-1], tgt, 0.5, chunk_size=2).loss
    ref = naive_salt_loss(full[:, :-1].contiguous(), teacher[:, :-1], tgt, 0.5)
    assert out.item() == pytest.approx(ref.item(), rel=1e-10)
    g1, = torch.autograd.grad(out, full)
    g2, = torch.autograd.grad(ref, full)
    assert torch.allclose(g1, g2, atol=1e-12)
    half = full.detach().to(torch.bfloat16).requires_grad_(True)
    loss = salt_loss(half, teacher.to(torch.bfloat16), torch.cat([tgt, tgt[:, :1]], 1), 0.5).loss
    assert loss.dtype == torch.float32
    loss.backward()
    assert half.grad.dtype == torch.bfloat16


def test_teacher_made_under_inference_mode_gets_no_gradient():
    z, a, y = rand_case()
    with torch.inference_mode():
        teacher = a * 1.0
    zz = z.clone().requires_grad_(True)
    salt_loss(zz, teacher, y, 0.5).loss.backward()
    assert zz.grad is not None and torch.isfinite(zz.grad).all()


def test_mask_equals_ignore_index():
    z, a, y = rand_case()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, 3:] = False
    y2 = y.masked_fill(~mask, -100)
    assert kd_loss(z, a, mask=mask).item() == pytest.approx(kd_loss(z, a, y2).item(), rel=1e-12)
    assert kd_loss(z, a, mask=mask).item() == pytest.approx(hand_kd(z, a, y2, 1.0), rel=1e-9)


def test_schedule_constant_and_linear_decay():
    assert [kd_weight_at(s, 3, 0.5) for s in range(5)] == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert [kd_weight_at(s, 4, 0.8, "linear_decay") for s in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0, 0])
    assert kd_weight_at(0, 0, 0.5) == 0.0  # kd_steps=0: the baseline


def test_bad_input():
    z, a, y = rand_case()
    with pytest.raises(ValueError, match="temperature"):
        salt_loss(z, a, y, 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="kd_weight"):
        salt_loss(z, a, y, 1.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        salt_loss(z, a[..., :3], y, 0.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        salt_loss(z, None, y, 0.5)
    with pytest.raises(ValueError, match="ignore_index"):
        salt_loss(z, a, torch.full_like(y, -100), 0.5)
    with pytest.raises(ValueError, match="out-of-range"):
        salt_loss(z, a, y + 100, 0.5)
    with pytest.raises(TypeError, match="target"):
        salt_loss(z, a, y.float(), 0.5)
    with pytest.raises(ValueError, match="kd_steps"):
        kd_weight_at(0, -1, 0.5)
    with pytest.raises(ValueError, match="schedule"):
        kd_weight_at(0, 1, 0.5, "cosine")


def brute_force_score(z, y, k, ignore_index=-100):
    """Per sequence: tokens whose true id is among the k largest logits, lower median of their -log p."""
    import statistics

    scores = []
    for b in range(z.shape[0]):
        kept = []
        for t in range(z.shape[1]):
            yt = int(y[b, t])
            if yt == ignore_index:
                continue
            row = z[b, t].tolist()
            top = sorted(range(len(row)), key=lambda i: -row[i])[:k]
            if yt in top:
                kept.append(-math.log(math.exp(row[yt]) / sum(math.exp(v) for v in row)))
        scores.append(statistics.median_low(kept) if kept else float("nan"))
    return scores


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_median_score_equals_brute_force(k):
    from lit_cascades.functional.distillation import topk_median_score

    z, _, y = rand_case(b=4, t=9, v=13, seed=3)
    y[2, 5:] = -100
    z[3] = -z[3]  # make k=1 leave some sequences with nothing kept
    scores, n_kept = topk_median_score(z, y, k=k, chunk_size=4)
    expected = brute_force_score(z, y, k)
    for got, exp in zip(scores.tolist(), expected):
        assert (math.isnan(got) and math.isnan(exp)) or got == pytest.approx(exp, rel=1e-10)
    assert n_kept.tolist() == [sum(1 for t in range(9) if int(y[b, t]) != -100 and int(
        (z[b, t] > z[b, t, max(int(y[b, t]), 0)]).sum()) < k) for b in range(4)]


def test_sequence_without_learnable_tokens_scores_nan_and_is_selected_last():
    from lit_cascades.functional.distillation import select_top_fraction, topk_median_score

    z = torch.zeros(2, 3, 5)
    z[0, :, 4] = 10.0  # the model is sure of token 4
    y = torch.tensor([[0, 1, 2], [4, 4, 4]])
    scores, n_kept = topk_median_score(z, y, k=1)
    assert math.isnan(scores[0]) and n_kept.tolist() == [0, 3]
    assert select_top_fraction(scores, 0.5).tolist() == [1]
    assert select_top_fraction(torch.tensor([0.3, 0.9, 0.1, 0.5]), 0.5).tolist() == [1, 3]
    assert select_top_fraction(torch.tensor([0.3, 0.9, 0.1, 0.5]), 0.5, highest=False).tolist() == [0, 2]
    assert select_top_fraction(torch.tensor([0.3, 0.9, 0.1]), 1.0).tolist() == [0, 1, 2]
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            select_top_fraction(torch.tensor([0.3, 0.9]), bad)
