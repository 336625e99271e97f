"""The fused CE/KL backward of ``gatekeeper_loss`` equals autograd through the plain formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_cascades.functional.gatekeeper import gatekeeper_loss


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
