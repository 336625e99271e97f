import math

import pytest
import torch
import torch.nn.functional as F

from lit_cascades.functional import gatekeeper_loss, kl_to_uniform
from tests.functional.gatekeeper_paths import LOSS_PATHS, select_loss_path


@pytest.fixture(autouse=True, params=LOSS_PATHS)
def loss_path(request, monkeypatch):
    """Run every test on each implementation: the NumPy path, the fused torch path and the compiled kernel."""
    select_loss_path(request.param, monkeypatch)
    return request.param



def _hand_loss(logits, target, alpha, normalize="batch", ignore_index=-100):
    """Gatekeeper loss written out example by example from the paper's formula."""
    n_classes = logits.shape[-1]
    rows = [(z, t) for z, t in zip(logits.reshape(-1, n_classes), target.reshape(-1)) if int(t) != ignore_index]
    corr_terms, incorr_terms = [], []
    for z, t in rows:
        p = torch.softmax(z.double(), -1)
        if int(torch.argmax(p)) == int(t):
            corr_terms.append(-math.log(float(p[t])))
        else:
            incorr_terms.append(sum(float(pc) * math.log(float(pc) * n_classes) for pc in p))
    if normalize == "batch":
        lc, li = sum(corr_terms) / len(rows), sum(incorr_terms) / len(rows)
    else:
        lc = sum(corr_terms) / max(len(corr_terms), 1)
        li = sum(incorr_terms) / max(len(incorr_terms), 1)
    return alpha * lc + (1 - alpha) * li, lc, li, len(incorr_terms) / len(rows)


@pytest.mark.parametrize("normalize", ["batch", "subset"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_matches_hand_formula_classification(alpha, normalize):
    logits = torch.randn(12, 5) * 2
    target = torch.randint(0, 5, (12,))
    out = gatekeeper_loss(logits, target, alpha=alpha, normalize=normalize)
    loss, lc, li, err = _hand_loss(logits, target, alpha, normalize)
    assert 0 < err < 1, "test case must contain both correct and incorrect examples"
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    assert out.loss_correct.item() == pytest.approx(lc, rel=1e-5)
    assert out.loss_incorrect.item() == pytest.approx(li, rel=1e-5)
    assert out.error_rate.item() == pytest.approx(err)


def test_kl_direction_is_p_to_uniform():
    logits = torch.tensor([[3.0, 0.0, -1.0, 0.5]])
    log_p = F.log_softmax(logits, -1)
    p = log_p.exp()
    expected = math.log(4) + (p * log_p).sum()  # log C - H(p)
    assert kl_to_uniform(log_p).item() == pytest.approx(expected.item(), rel=1e-6)
    wrong = F.kl_div(log_p, torch.full_like(p, 0.25), reduction="sum")  # KL(U || p)
    assert abs(wrong.item() - expected.item()) > 1e-2, "the two KL directions must differ on this case"
    assert kl_to_uniform(torch.log(torch.full((1, 7), 1 / 7))).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_matches_autograd_on_formula():
    logits = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (10,))
    gatekeeper_loss(logits, target, alpha=0.4).loss.backward()
    ours = logits.grad.clone()

    logits2 = logits.detach().clone().requires_grad_(True)
    log_p = torch.log_softmax(logits2, -1)
    correct = (log_p.argmax(-1) == target).double()
    ce = -log_p[torch.arange(10), target]
    kl = (log_p.exp() * (log_p + math.log(4))).sum(-1)
    ref = 0.4 * (ce * correct).sum() / 10 + 0.6 * (kl * (1 - correct)).sum() / 10
    ref.backward()
    torch.testing.assert_close(ours, logits2.grad.to(ours.dtype), rtol=1e-5, atol=1e-7)


def test_token_level_equals_flattened_classification_with_ignore_index():
    logits = torch.randn(3, 6, 11)
    target = torch.randint(0, 11, (3, 6))
    target[0, :2] = -100  # prompt tokens
    target[2, 4:] = -100  # padding
    out = gatekeeper_loss(logits, target, alpha=0.7)
    keep = target.reshape(-1) != -100
    flat = gatekeeper_loss(logits.reshape(-1, 11)[keep], target.reshape(-1)[keep], alpha=0.7)
    torch.testing.assert_close(out.loss, flat.loss)
    loss, *_ = _hand_loss(logits, target, 0.7)
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)


def test_all_correct_and_all_wrong_extremes():
    target = torch.tensor([0, 1, 2])
    confident = torch.eye(3) * 20
    out = gatekeeper_loss(confident, target, alpha=0.5)
    assert out.error_rate.item() == 0 and out.loss_incorrect.item() == 0
    wrong = gatekeeper_loss(confident, torch.tensor([1, 2, 0]), alpha=0.5)
    assert wrong.error_rate.item() == 1 and wrong.loss_correct.item() == 0
    assert wrong.loss_incorrect.item() == pytest.approx(math.log(3), rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logits": torch.randn(4, 3), "target": torch.zeros(5, dtype=torch.long)}, "target` shape"),
        ({"logits": torch.randn(4, 3), "target": torch.tensor([0, 1, 3, 0])}, r"\[0, 3\)"),
        ({"logits": torch.randn(4, 3), "target": torch.tensor([0, 1, -2, 0])}, "out-of-range"),
        ({"logits": torch.randn(4, 3), "target": torch.zeros(4, dtype=torch.long), "alpha": 1.5}, "alpha"),
        ({"logits": torch.tensor([[float("nan"), 0.0]]), "target": torch.tensor([0])}, "finite"),
        ({"logits": torch.randn(2, 3), "target": torch.full((2,), -100)}, "ignore_index"),
        ({"logits": torch.randn(3), "target": torch.tensor(0)}, "shape"),
        ({"logits": torch.zeros(3, 0), "target": torch.full((3,), -100)}, "at least one class"),
        ({"logits": torch.zeros(2, 4, 0), "target": torch.zeros(2, 4, dtype=torch.long)}, "at least one class"),
        ({"logits": torch.randn(2, 3), "target": torch.zeros(2, dtype=torch.long), "normalize": "mean"},
         "normalize"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gatekeeper_loss(**kwargs)


def test_float_target_is_rejected():
    with pytest.raises(TypeError, match="integer"):
        gatekeeper_loss(torch.randn(2, 3), torch.zeros(2))
