"""Sequence deferral scores against hand computation and per-example ``torch.quantile``."""

from __future__ import annotations

import math

import pytest
import torch

from lit_cascades.functional.sequence_scores import (
    DEFAULT_QUANTILES,
    chow_average,
    chow_quantile,
    chow_sum,
    quantile_features,
    sequence_lengths,
    sequence_scores,
)

# three sequences of lengths 3, 1, 4 padded to T = 4 (padding holds garbage, even NaN)
LOGPROBS = torch.tensor([
    [-0.5, -2.0, -0.1, float("nan")],
    [-3.0, 7.0, 7.0, 7.0],
    [-1.0, -0.2, -4.0, -0.3],
])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)


def test_chow_sum_and_average_by_hand():
    assert torch.allclose(chow_sum(LOGPROBS, MASK), torch.tensor([-2.6, -3.0, -5.5]))
    assert torch.allclose(chow_average(LOGPROBS, MASK), torch.tensor([-2.6 / 3, -3.0, -5.5 / 4]))
    assert sequence_lengths(MASK).tolist() == [3, 1, 4]


def test_chow_quantile_by_hand():
    # α = 0: least likely token; α = 1: most likely; α = 0.5 of [-2, -0.5, -0.1] is -0.5,
    # of [-4, -1, -0.3, -0.2] is between -1 and -0.3: -0.65
    assert torch.allclose(chow_quantile(LOGPROBS, MASK, 0.0), torch.tensor([-2.0, -3.0, -4.0]))
    assert torch.allclose(chow_quantile(LOGPROBS, MASK, 1.0), torch.tensor([-0.1, -3.0, -0.2]))
    assert torch.allclose(chow_quantile(LOGPROBS, MASK, 0.5), torch.tensor([-0.5, -3.0, -0.65]))
    # α = 0.25 on 4 values: position 0.75 between -4 and -1 -> -1.75
    assert chow_quantile(LOGPROBS, MASK, 0.25)[2].item() == pytest.approx(-1.75)


def test_integer_mask_equals_bool_mask_and_none_means_all_valid():
    assert torch.equal(chow_sum(LOGPROBS, MASK.long()), chow_sum(LOGPROBS, MASK))
    full = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]])
    assert torch.allclose(chow_average(full), torch.tensor([-1.5, -0.375]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantiles_equal_torch_quantile_on_unpadded_rows(seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 64, 23
    logprobs = -torch.rand(b, t, generator=g, dtype=torch.float64) * 5
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    # also non-prefix masks (e.g. a prompt masked in the middle)
    mask[::3] = torch.rand(b // 3 + 1, t, generator=g) < 0.6
    mask[::3, 0] = True
    levels = (*DEFAULT_QUANTILES, 0.33, 0.77)
    feats = quantile_features(logprobs, mask, levels)
    assert feats.shape == (b, len(levels))
    for i in range(b):
        row = logprobs[i, mask[i]]
        expected = torch.quantile(row, torch.tensor(levels, dtype=torch.float64))
        torch.testing.assert_close(feats[i], expected)
        assert chow_sum(logprobs, mask)[i].item() == pytest.approx(row.sum().item())
        assert chow_average(logprobs, mask)[i].item() == pytest.approx(row.mean().item())


def test_chow_sum_length_bias_and_average_removes_it():
    # same per-token confidence, different lengths: Chow-Sum ranks the longer output lower
    logprobs = torch.full((2, 6), -0.2)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6], dtype=torch.bool)
    s = chow_sum(logprobs, mask)
    assert s[1] < s[0]
    a = chow_average(logprobs, mask)
    assert a[0].item() == pytest.approx(a[1].item())


def test_padding_values_are_ignored_even_if_nan():
    out = quantile_features(LOGPROBS, MASK)
    assert torch.isfinite(out).all()
    assert math.isfinite(chow_sum(LOGPROBS, MASK).sum().item())


def test_batched_gradient_flows_to_valid_positions_only():
    lp = LOGPROBS.nan_to_num(0.0).clone().requires_grad_(True)
    chow_average(lp, MASK).sum().backward()
    assert torch.all(lp.grad[~MASK] == 0)
    assert lp.grad[0, 0].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("logprobs", "mask", "match"),
    [
        (torch.zeros(3), None, r"shape \[B, T\]"),
        (torch.zeros(2, 3, dtype=torch.long), None, "floating-point"),
        (torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), "shape of `logprobs`"),
        (torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]), r"no valid token \(all padding\), e.g. rows \[1\]"),
        (torch.tensor([[-1.0, float("nan")]]), None, "finite at unmasked positions; got 1 non-finite values"),
        (torch.tensor([[-1.0, float("inf")]]), None, "non-finite"),
        (torch.zeros(0, 3), None, "empty"),
        (torch.zeros(2, 3), torch.full((2, 3), 2), "only 0/1"),
    ],
)
def test_bad_input(logprobs, mask, match):
    with pytest.raises((ValueError, TypeError), match=match):
        chow_sum(logprobs, mask)


def test_bad_alpha():
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0.0, 1.0\]"):
        chow_quantile(LOGPROBS, MASK, 1.5)
    with pytest.raises(ValueError, match="quantile levels"):
        quantile_features(LOGPROBS, MASK, [0.1, -0.2])
    with pytest.raises(ValueError, match="empty"):
        quantile_features(LOGPROBS, MASK, [])


def test_sequence_scores_bundle_equals_the_single_scores():
    out = sequence_scores(LOGPROBS, MASK, (0.0, 0.5))
    torch.testing.assert_close(out["chow_sum"], chow_sum(LOGPROBS, MASK))
    torch.testing.assert_close(out["chow_average"], chow_average(LOGPROBS, MASK))
    torch.testing.assert_close(out["quantiles"][:, 1], chow_quantile(LOGPROBS, MASK, 0.5))
    assert out["lengths"].tolist() == [3, 1, 4]
