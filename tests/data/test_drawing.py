"""Sketch generation and image utilities: Sobel vs scipy, Zhang–Suen vs a per-pixel transcription, colour-free and
deterministic sketches, conversions and drawing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from lit_cascades.data.drawing import (
    blank_sketch,
    draw_ellipse,
    draw_line,
    draw_polyline,
    edge_strokes,
    luminance,
    make_sketch,
    paste,
    resize_center_crop,
    shift,
    sobel_magnitude,
    stroke_dropout,
    thin,
    to_rgb,
)


def test_sobel_matches_scipy():
    x = np.random.default_rng(0).random((13, 17)).astype(np.float64)
    gy = ndimage.sobel(x, axis=0, mode="nearest")
    gx = ndimage.sobel(x, axis=1, mode="nearest")
    ours = sobel_magnitude(torch.from_numpy(x)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(ours, np.hypot(gx, gy), rtol=1e-10, atol=1e-12)


def _zhang_suen_reference(img: np.ndarray) -> np.ndarray:
    """Zhang & Suen (1984) transcribed pixel by pixel (background outside the image)."""
    x = np.pad(img.astype(int), 1)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            remove = []
            for i in range(1, x.shape[0] - 1):
                for j in range(1, x.shape[1] - 1):
                    if x[i, j] != 1:
                        continue
                    p = [x[i - 1, j], x[i - 1, j + 1], x[i, j + 1], x[i + 1, j + 1], x[i + 1, j], x[i + 1, j - 1],
                         x[i, j - 1], x[i - 1, j - 1]]  # P2..P9
                    b = sum(p)
                    a = sum(p[k] == 0 and p[(k + 1) % 8] == 1 for k in range(8))
                    p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
                    c = (p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0) if step == 0 else (
                        p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0)
                    if 2 <= b <= 6 and a == 1 and c:
                        remove.append((i, j))
            for i, j in remove:
                x[i, j] = 0
            changed |= bool(remove)
    return x[1:-1, 1:-1].astype(bool)


@pytest.mark.parametrize("seed", range(4))
def test_thinning_matches_reference(seed):
    rng = np.random.default_rng(seed)
    img = ndimage.binary_dilation(rng.random((20, 24)) < 0.08, iterations=2)
    ours = thin(torch.from_numpy(img)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(ours, _zhang_suen_reference(img))


def test_thinning_makes_thick_bar_one_pixel_wide():
    img = torch.zeros(1, 1, 12, 20, dtype=torch.bool)
    img[..., 4:8, 2:18] = True  # a 4-pixel-thick bar
    out = thin(img)[0, 0]
    assert out.any() and int(out.sum(0).max()) == 1  # at most one pixel per column


def _square(colour):
    img = torch.zeros(3, 24, 24)
    glyph = torch.zeros(10, 10)
    glyph[2:8, 2:8] = 1.0
    return paste(img, glyph, 7, 7, colour)


def test_sketch_is_single_channel_and_deterministic_under_a_seed():
    img = _square((1.0, 0.2, 0.1))
    a = make_sketch(img, generator=torch.Generator().manual_seed(3), keep_min=0.6, max_shift=2)
    b = make_sketch(img, generator=torch.Generator().manual_seed(3), keep_min=0.6, max_shift=2)
    c = make_sketch(img, generator=torch.Generator().manual_seed(4), keep_min=0.6, max_shift=2)
    assert a.shape == (1, 24, 24) and set(a.unique().tolist()) <= {0.0, 1.0} and a.sum() > 0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sketch_carries_no_colour():
    # the same layout in two colours of equal luminance gives the same sketch (edges of the luminance only)
    red, grey = (0.9, 0.0, 0.0), (0.299 * 0.9,) * 3
    s_red = make_sketch(_square(red), generator=torch.Generator().manual_seed(0))
    s_grey = make_sketch(_square(grey), generator=torch.Generator().manual_seed(0))
    assert torch.equal(s_red, s_grey)
    strokes = edge_strokes(_square((0.1, 0.9, 0.3)))
    assert strokes.shape == (1, 24, 24) and strokes.dtype == torch.bool


def test_stroke_dropout_keeps_a_fraction_and_never_adds_ink():
    strokes = torch.ones(64, 1, 16, 16, dtype=torch.bool)
    kept = stroke_dropout(strokes, keep_min=0.6, generator=torch.Generator().manual_seed(0))
    frac = kept.float().mean(dim=(1, 2, 3))
    assert (frac > 0.5).all() and (frac < 1.0).all() and frac.std() > 0.02  # p ~ U(0.6, 1) per sketch
    sparse = torch.zeros(1, 8, 8, dtype=torch.bool)
    sparse[0, 2, 3] = True
    assert not (stroke_dropout(sparse, 0.5) & ~sparse).any()
    assert torch.equal(stroke_dropout(sparse, 1.0), sparse)


def test_shift_moves_without_wrapping():
    x = torch.zeros(1, 5, 5)
    x[0, 0, 4] = 1
    assert shift(x, 1, -2)[0, 1, 2] == 1 and shift(x, 0, 1).sum() == 0


def test_channel_conversions():
    grey = torch.rand(1, 6, 6)
    assert torch.equal(to_rgb(grey), grey.expand(3, -1, -1))
    rgba = torch.rand(2, 4, 6, 6)
    assert torch.equal(to_rgb(rgba), rgba[:, :3])
    with pytest.raises(ValueError, match="channels"):
        to_rgb(torch.rand(2, 6, 6))
    rgb = torch.rand(3, 4, 4)
    torch.testing.assert_close(luminance(rgb)[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    out = resize_center_crop(torch.rand(3, 30, 60), 16)
    assert out.shape == (3, 16, 16)


def test_drawing_primitives():
    s = blank_sketch(20)
    draw_line(s, 2, 2, 2, 17)
    assert s[0, 2, 2:18].all() and s.sum() == 16
    draw_polyline(s, [(5, 5), (15, 5), (15, 10)])
    assert s[0, 5:16, 5].all() and s[0, 15, 5:11].all()
    e = draw_ellipse(blank_sketch(32), 16, 16, 8, 5)
    assert e[0, 8, 16] == 1 and e[0, 16, 11] == 1 and e[0, 16, 16] == 0
    with pytest.raises(ValueError, match=r"\[1, H, W\]"):
        draw_line(torch.zeros(3, 4, 4), 0, 0, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        paste(torch.zeros(3, 8, 8), torch.ones(4, 4), 6, 0)
