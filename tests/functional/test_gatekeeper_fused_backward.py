"""The fused CE/KL backward of ``gatekeeper_loss`` equals autograd through the plain formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_cascades.functional.gatekeeper import gatekeeper_loss
from tests.functional.gatekeeper_paths import LOSS_PATHS, select_loss_path


@pytest.fixture(autouse=True, params=LOSS_PATHS)
def loss_path(request, monkeypatch):
    """Run every test on each implementation: the NumPy path, the fused torch path and the compiled kernel."""
    select_loss_path(request.param, monkeypatch)
    return request.param



def plain(logits, target, alpha, normalize, ignore_index=-100):
    """The loss written with autograd-differentiable torch ops (the reference)."""
    c = logits.shape[-1]
    z, y = logits.reshape(-1, c), target.reshape(-1)
    valid = y != ignore_index
    ys = y.masked_fill(~valid, 0)
    log_p = F.log_softmax(z, -1)
    correct = (log_p.argmax(-1) == ys) & valid
    incorrect = valid & ~correct
    ce = -log_p.gather(-1, ys[:, None]).squeeze(-1)
    kl = (log_p.exp() * (log_p + math.log(c))).sum(-1)
    n = valid.sum()
    if normalize == "batch":
        lc, li = (ce * correct).sum() / n, (kl * incorrect).sum() / n
    else:
        lc = (ce * correct).sum() / correct.sum().clamp(min=1)
        li = (kl * incorrect).sum() / incorrect.sum().clamp(min=1)
    return alpha * lc + (1 - alpha) * li, lc, li


@pytest.mark.parametrize("normalize", ["batch", "subset"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_components_and_gradients_equal_autograd(alpha, normalize):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 3)
    target = torch.randint(0, 50, (3, 7), generator=g)
    target[:, ::2] = logits[:, ::2].argmax(-1)  # both correct and incorrect positions
    target[0, :3] = -100
    for component in range(3):  # loss, loss_correct, loss_incorrect each carry the right gradient
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        ours = gatekeeper_loss(a, target, alpha=alpha, normalize=normalize)[component]
        ref = plain(b, target, alpha, normalize)[component]
        torch.testing.assert_close(ours, ref)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_gradcheck_of_the_fused_function():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, -100])
    assert torch.autograd.gradcheck(lambda z: gatekeeper_loss(z, target, alpha=0.4).loss, (logits,))


@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_paths_match_the_plain_formula_with_any_ignore_index(ignore_index, dtype):
    """An ``ignore_index`` inside ``[0, C)`` and float32 logits take the same route as the reference."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 5, generator=g, dtype=dtype) * 2
    target = torch.randint(0, 5, (40,), generator=g)
    target[::3] = logits[::3].argmax(-1)
    target[::7] = ignore_index
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = gatekeeper_loss(a, target, alpha=0.7, ignore_index=ignore_index)
    ref = plain(b, target, 0.7, "batch", ignore_index)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(ours.loss, ref[0], **tol)
    ours.loss.backward()
    ref[0].backward()
    torch.testing.assert_close(a.grad, b.grad, **tol)
    valid = target != ignore_index
    wrong = (logits.argmax(-1) != target) & valid
    assert ours.error_rate.item() == pytest.approx(wrong.sum().item() / valid.sum().item())
    assert not ours.error_rate.requires_grad


def test_infinite_logit_is_reported():
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [2.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="finite"):
        gatekeeper_loss(logits, torch.tensor([2, 0]))


@pytest.mark.parametrize("case", ["mixed", "all_correct", "all_wrong"])
@pytest.mark.parametrize("classes", [2, 10])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_classification_sizes_match_the_plain_formula(alpha, classes, case):
    """The step-sized case (64 x C float32, [N] int targets) on both paths: every component's value and gradient,
    with both normalisations, on batches with both kinds of examples and with only one kind."""
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(64, classes, generator=g) * 2
    target = torch.randint(0, classes, (64,), generator=g)
    pred = logits.argmax(-1)
    if case == "all_correct":
        target = pred
    elif case == "all_wrong":
        target = (pred + 1) % classes
    else:
        target[::2] = pred[::2]
    for normalize in ("batch", "subset"):
        for component in range(3):
            a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
            ours = gatekeeper_loss(a, target, alpha=alpha, normalize=normalize)
            ref = plain(b, target, alpha, normalize)
            torch.testing.assert_close(ours[component], ref[component])
            ours[component].backward()
            ref[component].backward()
            torch.testing.assert_close(a.grad, b.grad)
        wrong = (pred != target).float().mean()
        torch.testing.assert_close(ours.error_rate, wrong)


def test_int32_targets_equal_int64_targets():
    g = torch.Generator().manual_seed(7)
    logits, target = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    want = gatekeeper_loss(logits, target, alpha=0.4)
    got = gatekeeper_loss(logits, target.int(), alpha=0.4)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w)
    for bad in (-1, 5):
        target32 = target.int().clone()
        target32[3] = bad
        with pytest.raises(ValueError, match="out-of-range"):
            gatekeeper_loss(logits, target32)


def test_vocabulary_sized_rows_match_the_plain_formula():
    """Inputs past ``_DOT_BLOCK_ELEMENTS`` (the torch path's row-wise dot goes in blocks of rows, the last one
    short) and with ties in the maximum (the first index counts as the prediction, as ``argmax``)."""
    import lit_cascades.functional.gatekeeper as gk

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(130, 2100, generator=g, dtype=torch.float64) * 4
    assert logits.numel() > gk._DOT_BLOCK_ELEMENTS and 130 % (gk._DOT_BLOCK_ELEMENTS // 2100)
    target = torch.randint(0, 2100, (130,), generator=g)
    target[::2] = logits[::2].argmax(-1)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1  # a tie: class 7 is the prediction, class 9 a mistake
    target[1], target[3] = 9, 3
    logits[3, 3] = logits[3, 5] = logits[3].max() + 1  # a tie won by the target
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = gatekeeper_loss(a, target, alpha=0.3)
    ref = plain(b, target, 0.3, "batch")
    for x, r in zip(ours[:3], ref, strict=True):
        torch.testing.assert_close(x, r)
    ours.loss.backward()
    ref[0].backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_rowwise_dot_in_blocks_equals_the_product_sum():
    from lit_cascades.functional.gatekeeper import _DOT_BLOCK_ELEMENTS, _rowwise_dot

    g = torch.Generator().manual_seed(5)
    for shape in ((3, 5), (301, _DOT_BLOCK_ELEMENTS // 100), (2, _DOT_BLOCK_ELEMENTS + 3)):
        x, y = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        torch.testing.assert_close(_rowwise_dot(x, y), (x.double() * y.double()).sum(-1).float())


@pytest.mark.parametrize("classes", [7, 8, 9, 4099])
def test_float32_rows_match_the_float64_formula(classes):
    """float32 logits of widths around the kernel's 8-wide vectors and of a vocabulary, with a tie in the maximum,
    an ignored row and a row spread over hundreds of nats (probabilities that underflow), against the formula in
    float64."""
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(40, classes, generator=g) * 4
    target = torch.randint(0, classes, (40,), generator=g)
    target[::2] = logits[::2].argmax(-1)
    logits[1, 2] = logits[1, 5] = logits[1].max() + 1  # a tie: class 2 is the prediction, class 5 a mistake
    target[1] = 5
    logits[3] *= 60  # e^(z - max) below float32's smallest normal for most classes
    target[7] = -100
    a, b = logits.clone().requires_grad_(True), logits.double().requires_grad_(True)
    ours = gatekeeper_loss(a, target, alpha=0.3)
    ref = plain(b, target, 0.3, "batch")
    for x, r in zip(ours[:3], ref, strict=True):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-6)
    ours.loss.backward()
    ref[0].backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)  # entries ~1/N; z up to ~300
    assert float(a.grad[7].abs().sum()) == 0.0
