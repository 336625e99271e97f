"""Image utilities in plain torch (no torchvision): colour handling, resizing, compositing, synthetic sketches
from images, and drawing primitives for sketches made by hand as arrays.

Synthetic sketch (TASK-former trains on sketches generated from the images, Sangkloy et al., ECCV 2022;
arXiv:2208.03354): luminance → optional Gaussian blur → Sobel gradient magnitude → threshold
at ``edge_threshold × max`` → Zhang–Suen thinning to one-pixel strokes → stroke dropout (each stroke pixel kept
with probability ``p ~ U(keep_min, 1)``, the reimplementations' augmentation). The result is one channel of
ink (1 = stroke, 0 = paper) and carries no colour: it depends on the image only through its luminance (and,
for constructed scenes, through a colour-free intensity layer). The official pipeline used PhotoSketch, a
learned generator (not available offline); edges + thinning are the classic stand-in.

Shapes: images ``[C, H, W]`` or batches ``[B, C, H, W]`` with values in ``[0, 1]``; sketches ``[1, H, W]`` /
``[B, 1, H, W]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")


# --------------------------------------------------------------------------------------------------------
# channels, sizes, compositing
# --------------------------------------------------------------------------------------------------------
def _batched(x: Tensor, name: str) -> tuple[Tensor, bool]:
    if x.ndim == 3:
        return x[None], True
    if x.ndim == 4:
        return x, False
    raise ValueError(f"`{name}` must be [C, H, W] or [B, C, H, W]; got shape {tuple(x.shape)}")


def to_rgb(x: Tensor) -> Tensor:
    """Grey ``[.., 1, H, W]`` → RGB by repetition; RGB passes through; RGBA drops alpha. Other channel counts
    raise ``ValueError``."""
    xb, single = _batched(x, "image")
    c = xb.shape[1]
    if c == 1:
        xb = xb.expand(-1, 3, -1, -1)
    elif c == 4:
        xb = xb[:, :3]
    elif c != 3:
        raise ValueError(f"images must have 1 (grey), 3 (RGB) or 4 (RGBA) channels; got {c} in shape {tuple(x.shape)}")
    return xb[0] if single else xb


def luminance(x: Tensor) -> Tensor:
    """``[.., C, H, W]`` (C = 1 or 3) → ``[.., 1, H, W]`` luminance (BT.601 weights)."""
    xb, single = _batched(x, "image")
    if xb.shape[1] == 3:
        w = torch.tensor(LUMA, dtype=xb.dtype, device=xb.device).view(1, 3, 1, 1)
        xb = (xb * w).sum(1, keepdim=True)
    elif xb.shape[1] != 1:
        raise ValueError(f"`image` must have 1 or 3 channels; got {xb.shape[1]}")
    return xb[0] if single else xb


def resize(x: Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize ``[.., C, H, W]`` to ``size`` (antialiased when shrinking)."""
    xb, single = _batched(x, "image")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(xb.shape[-2:]) != size:
        kwargs = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
        xb = F.interpolate(xb.float(), size=size, mode=mode, **kwargs).clamp(0, 1)
    return xb[0] if single else xb


def resize_center_crop(x: Tensor, size: int) -> Tensor:
    """Resize the shorter side to ``size`` then crop the centre ``size × size`` (CLIP's evaluation transform)."""
    xb, single = _batched(x, "image")
    h, w = xb.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    xb = resize(xb, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    xb = xb[..., top : top + size, left : left + size]
    return xb[0] if single else xb


def paste(canvas: Tensor, glyph: Tensor, top: int, left: int, colour: Sequence[float] | Tensor | None = None) -> Tensor:
    """Composite ``glyph`` (``[h, w]`` alpha/intensity in ``[0, 1]``) over ``canvas [C, H, W]`` in place.

    ``canvas = canvas · (1 − α) + colour · α`` inside the glyph's box (``colour`` defaults to white). Returns
    ``canvas``. The box must lie inside the canvas.
    """
    c, hh, ww = canvas.shape
    h, w = glyph.shape
    if top < 0 or left < 0 or top + h > hh or left + w > ww:
        raise ValueError(f"glyph of size {h}×{w} at ({top}, {left}) does not fit a {hh}×{ww} canvas")
    col = torch.ones(c) if colour is None else torch.as_tensor(colour, dtype=canvas.dtype)
    if col.shape != (c,):
        raise ValueError(f"`colour` must have {c} values (the canvas channels); got {tuple(col.shape)}")
    a = glyph.to(canvas.dtype)[None]
    region = canvas[:, top : top + h, left : left + w]
    region.mul_(1 - a).add_(col.view(c, 1, 1) * a)
    return canvas


# --------------------------------------------------------------------------------------------------------
# edges, thinning, dropout: synthetic sketches
# --------------------------------------------------------------------------------------------------------
def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (replicate padding); ``sigma <= 0`` returns ``x``."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def sobel_magnitude(x: Tensor) -> Tensor:
    """Gradient magnitude ``sqrt(g_x² + g_y²)`` of ``[B, 1, H, W]`` with 3×3 Sobel kernels (replicate border,
    the "nearest" mode of ``scipy.ndimage.sobel``)."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=x.dtype, device=x.device)
    k = torch.stack([kx, kx.T])[:, None]  # [2, 1, 3, 3]
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(1, keepdim=True).sqrt()


def _neighbours(x: Tensor) -> list[Tensor]:
    """The 8 neighbours P2..P9 (N, NE, E, SE, S, SW, W, NW) of every pixel of ``[B, 1, H, W]`` (zero border)."""
    p = F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    at = lambda dy, dx: p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]  # noqa: E731
    return [at(-1, 0), at(-1, 1), at(0, 1), at(1, 1), at(1, 0), at(1, -1), at(0, -1), at(-1, -1)]


def thin(mask: Tensor, max_iter: int = 100) -> Tensor:
    """Zhang–Suen thinning (Zhang & Suen, CACM 1984) of a binary ``[B, 1, H, W]`` mask to one-pixel strokes.

    Each iteration runs the two sub-steps of the paper; pixels outside the image count as background.
    """
    x = (mask > 0).to(torch.uint8)
    for _ in range(max_iter):
        changed = False
        for step in (0, 1):
            n = _neighbours(x)
            p2, _, p4, _, p6, _, p8, _ = n
            b = sum(v.int() for v in n)
            seq = [*n, p2]
            a = sum(((seq[i] == 0) & (seq[i + 1] == 1)).int() for i in range(8))
            if step == 0:
                c1, c2 = p2 * p4 * p6, p4 * p6 * p8
            else:
                c1, c2 = p2 * p4 * p8, p2 * p6 * p8
            remove = (x == 1) & (b >= 2) & (b <= 6) & (a == 1) & (c1 == 0) & (c2 == 0)
            if bool(remove.any()):
                x = x.masked_fill(remove, 0)
                changed = True
        if not changed:
            break
    return x.bool()


def edge_strokes(x: Tensor, *, edge_threshold: float = 0.3, blur_sigma: float = 0.0, thinning: bool = True) -> Tensor:
    """Binary one-pixel edge strokes ``[.., 1, H, W]`` of images ``[.., C, H, W]`` (C = 1 or 3).

    A pixel is an edge when its Sobel magnitude (of the optionally blurred luminance) exceeds
    ``edge_threshold ×`` the image's largest magnitude; flat images have no edges.
    """
    xb, single = _batched(x, "image")
    if not 0 < edge_threshold < 1:
        raise ValueError(f"`edge_threshold` must be in (0, 1); got {edge_threshold}")
    mag = sobel_magnitude(gaussian_blur(luminance(xb.float()), blur_sigma))
    peak = mag.amax(dim=(1, 2, 3), keepdim=True)
    edges = (mag > edge_threshold * peak) & (peak > 1e-6)
    if thinning:
        edges = thin(edges)
    return edges[0] if single else edges


def stroke_dropout(strokes: Tensor, keep_min: float = 0.6, generator: torch.Generator | None = None) -> Tensor:
    """Keep each stroke pixel with probability ``p ~ U(keep_min, 1)`` drawn once per sketch.

    Args:
        strokes: ``[B, 1, H, W]`` (or ``[1, H, W]``) binary ink.
        keep_min: lower end of the keep probability (1 disables dropout).
        generator: random generator (for deterministic sketches).
    """
    if not 0 < keep_min <= 1:
        raise ValueError(f"`keep_min` must be in (0, 1]; got {keep_min}")
    xb, single = _batched(strokes, "strokes")
    if keep_min < 1:
        p = keep_min + (1 - keep_min) * torch.rand(xb.shape[0], 1, 1, 1, generator=generator)
        xb = xb.bool() & (torch.rand(xb.shape, generator=generator) < p)
    return (xb[0] if single else xb).bool()


def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """Translate ``[.., H, W]`` by ``(dy, dx)`` pixels, filling with zeros (no wrap-around)."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def make_sketch(
    image: Tensor,
    *,
    generator: torch.Generator | None = None,
    edge_threshold: float = 0.3,
    blur_sigma: float = 0.0,
    keep_min: float = 0.6,
    max_shift: int = 0,
) -> Tensor:
    """Synthetic sketch(es) ``[.., 1, H, W]`` (float ink in {0, 1}) of ``image [.., C, H, W]``: edge strokes,
    stroke dropout and a random translation of up to ``max_shift`` pixels (a hand-drawn sketch is not pixel
    aligned with its photo). Deterministic given ``generator``'s seed.
    """
    strokes = edge_strokes(image, edge_threshold=edge_threshold, blur_sigma=blur_sigma)
    strokes = stroke_dropout(strokes, keep_min, generator)
    if max_shift > 0:
        xb, single = _batched(strokes, "strokes")
        d = torch.randint(-max_shift, max_shift + 1, (xb.shape[0], 2), generator=generator)
        xb = torch.stack([shift(s, int(a), int(b)) for s, (a, b) in zip(xb, d)])
        strokes = xb[0] if single else xb
    return strokes.float()


# --------------------------------------------------------------------------------------------------------
# drawing by hand (sketch queries as arrays)
# --------------------------------------------------------------------------------------------------------
def blank_sketch(size: int | tuple[int, int]) -> Tensor:
    """An empty sketch ``[1, H, W]`` (no ink)."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.zeros(1, h, w)


def draw_line(sketch: Tensor, y0: float, x0: float, y1: float, x1: float, width: int = 1) -> Tensor:
    """Draw a straight stroke from ``(y0, x0)`` to ``(y1, x1)`` (pixel coordinates) on ``sketch [1, H, W]``
    in place; returns it."""
    n = int(max(abs(y1 - y0), abs(x1 - x0))) * 2 + 1
    t = torch.linspace(0, 1, n)
    return _stamp(sketch, y0 + (y1 - y0) * t, x0 + (x1 - x0) * t, width)


def draw_polyline(sketch: Tensor, points: Sequence[tuple[float, float]], width: int = 1) -> Tensor:
    """Draw connected strokes through ``points`` ``[(y, x), ...]`` on ``sketch [1, H, W]`` in place."""
    for (y0, x0), (y1, x1) in itertools.pairwise(points):
        draw_line(sketch, y0, x0, y1, x1, width)
    return sketch


def draw_ellipse(sketch: Tensor, cy: float, cx: float, ry: float, rx: float, width: int = 1) -> Tensor:
    """Draw the outline of an axis-aligned ellipse (centre ``(cy, cx)``, radii ``ry, rx``) in place."""
    n = int(4 * math.pi * max(ry, rx)) + 8
    t = torch.linspace(0, 2 * math.pi, n)
    return _stamp(sketch, cy + ry * torch.sin(t), cx + rx * torch.cos(t), width)


def _stamp(sketch: Tensor, ys: Tensor, xs: Tensor, width: int) -> Tensor:
    if sketch.ndim != 3 or sketch.shape[0] != 1:
        raise ValueError(f"`sketch` must be [1, H, W]; got shape {tuple(sketch.shape)}")
    h, w = sketch.shape[-2:]
    lo, hi = -(width // 2), width - width // 2
    for dy in range(lo, hi):
        for dx in range(lo, hi):
            y = (ys.round().long() + dy).clamp(0, h - 1)
            x = (xs.round().long() + dx).clamp(0, w - 1)
            sketch[0, y, x] = 1.0
    return sketch
