"""Listwise CE loss, score-distribution KL and embedding matching against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from lit_cascades.functional.score_distillation import (
    embedding_matching_loss,
    listwise_softmax_loss,
    score_distillation_loss,
    segment_mean_pool,
)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_listwise_softmax_loss_by_hand():
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    expected = (-math.log(_softmax([2.0, 0.5, -1.0])[0]) - math.log(_softmax([0.0, 3.0, 1.0])[0])) / 2
    assert listwise_softmax_loss(scores).item() == pytest.approx(expected, rel=1e-6)
    # positive elsewhere
    labels = torch.tensor([2, 1])
    expected = (-math.log(_softmax([2.0, 0.5, -1.0])[2]) - math.log(_softmax([0.0, 3.0, 1.0])[1])) / 2
    assert listwise_softmax_loss(scores, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_score_distillation_kl_direction_and_temperature_by_hand(temperature):
    s = [[1.0, -0.5, 0.3], [0.2, 0.1, -2.0]]
    t = [[3.0, 0.0, -1.0], [-1.0, 2.0, 0.5]]
    expected = 0.0
    for srow, trow in zip(s, t):
        p = _softmax([x / temperature for x in trow])  # the teacher is the target distribution
        q = _softmax([x / temperature for x in srow])
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 2 * temperature**2
    student = torch.tensor(s, requires_grad=True)
    teacher = torch.tensor(t, requires_grad=True)
    loss = score_distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # KL is not symmetric: swapping the roles gives KL(student ‖ teacher), a different number
    reverse = score_distillation_loss(torch.tensor(t), torch.tensor(s), temperature)
    assert abs(reverse.item() - expected) > 1e-3
    assert score_distillation_loss(student, teacher, temperature, scale_by_t2=False).item() == pytest.approx(
        expected / temperature**2, rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    # gradient of T² KL wrt student logits: T · (softmax(s/T) − softmax(t/T)) / B
    p = torch.softmax(torch.tensor(t) / temperature, 1)
    q = torch.softmax(torch.tensor(s) / temperature, 1)
    torch.testing.assert_close(student.grad, temperature * (q - p) / 2, rtol=1e-5, atol=1e-6)


def test_score_distillation_ignores_masked_candidates_and_is_zero_at_match():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[1.0, 2.0, float("-inf")]])
    p = _softmax([1.0, 2.0])
    q = _softmax([1.0, 2.0])  # the masked candidate is removed from the student's softmax too
    assert score_distillation_loss(s, t).item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), abs=1e-6)
    assert score_distillation_loss(t[:, :2], t[:, :2]).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="must match"):
        score_distillation_loss(s, t[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        score_distillation_loss(s, s, temperature=0.0)


def test_embedding_matching_by_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert embedding_matching_loss(a, b, "l2").item() == pytest.approx((5.0 + math.sqrt(2)) / 2)
    assert embedding_matching_loss(a, b, "mse").item() == pytest.approx((25.0 + 2.0) / 2)
    cos = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert embedding_matching_loss(cos, torch.tensor([[0.0, 2.0], [2.0, 2.0]]), "cosine").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equal D"):
        embedding_matching_loss(a, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="distance"):
        embedding_matching_loss(a, b, "dot")
    x = a.clone().requires_grad_(True)
    y = b.clone().requires_grad_(True)
    embedding_matching_loss(x, y, "mse").backward()
    assert y.grad is None  # the teacher side is detached


def test_segment_mean_pool_by_hand():
    states = torch.arange(12, dtype=torch.float).view(1, 4, 3)  # 4 tokens of width 3
    mask = torch.tensor([[1, 1, 1, 0]])
    types = torch.tensor([[0, 0, 1, 1]])
    torch.testing.assert_close(segment_mean_pool(states, mask, types, 0), states[0, :2].mean(0, keepdim=True))
    torch.testing.assert_close(segment_mean_pool(states, mask, types, 1), states[0, 2:3])  # padding excluded
