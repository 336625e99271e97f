"""Small and large image classifiers in plain torch (no torchvision), for any ``[B, C, H, W]`` input."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten → ``hidden`` ReLU layers → logits. A deliberately weak "small model" for cascades.

    Args:
        in_shape: ``(C, H, W)`` of the inputs.
        num_classes: number of output logits.
        hidden: widths of the hidden layers (empty = multinomial logistic regression).
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | list[int] = (32,)) -> None:
        super().__init__()
        dims = [int(torch.tensor(in_shape).prod()), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]``."""
        return self.net(x)


class CNN(nn.Module):
    """``depth`` blocks of (3×3 conv, normalisation, ReLU, 2×2 max-pool while the map is ≥ 4 px), pooling and a
    linear head. Width doubles every block.

    Args:
        in_shape: ``(C, H, W)`` of the inputs.
        num_classes: number of output logits.
        width: channels of the first block.
        depth: number of conv blocks.
        pool: ``"avg"`` (global average pooling, translation invariant), ``"flatten"`` (the final feature map
            flattened, which keeps *where* things are: useful for sketch/layout retrieval) or ``"both"`` (the two
            concatenated: what is there, wherever it is, and where it is).
        norm: ``"batch"`` (BatchNorm, the default), ``"group"`` (GroupNorm with up to 8 groups: per example, so
            DDP on CPU, where SyncBatchNorm is unavailable, trains exactly as one process) or ``"none"``.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 32, depth: int = 3,
                 pool: str = "avg", norm: str = "batch") -> None:
        super().__init__()
        if pool not in ("avg", "flatten", "both"):
            raise ValueError(f"`pool` must be 'avg', 'flatten' or 'both'; got {pool!r}")
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm: expected 'batch', 'group' or 'none'; got {norm!r}")
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for i in range(depth):
            out = width * 2**i
            normalise = {"batch": lambda n: nn.BatchNorm2d(n), "group": lambda n: nn.GroupNorm(math.gcd(8, n), n),
                         "none": lambda n: nn.Identity()}[norm]
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=norm == "none"), normalise(out), nn.ReLU()]
            if h >= 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = pool
        self.head = nn.Linear({"avg": c, "flatten": c * h * w, "both": c + c * h * w}[pool], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]``."""
        f = self.features(x)
        if self.pool == "avg":
            return self.head(f.mean(dim=(2, 3)))
        if self.pool == "flatten":
            return self.head(f.flatten(1))
        return self.head(torch.cat([f.mean(dim=(2, 3)), f.flatten(1)], dim=1))


ARCHITECTURES: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN}


def build_classifier(arch: str, in_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate ``ARCHITECTURES[arch](in_shape, num_classes, **kwargs)``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; available: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](tuple(in_shape), num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
