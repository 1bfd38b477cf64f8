"""Cells: one block z' = f(z, x; mask index) with shared weights and an input injection x.

The same cell object runs unrolled (weight-tied) or to its fixed point (DEQ), so every
comparison differs only in how the cell is run.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .layers import MaskedConv2d

CELLS: dict[str, Callable[..., nn.Module]] = {}
NORMS = ("group", "batch", "none")


def register_cell(name: str):
    """Class decorator: make a cell constructible by name, ``CELLS[name](width=..., norm=...)``."""

    def wrap(cls):
        CELLS[name] = cls
        return cls

    return wrap


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        # 8 groups as in the DEQ ResNet cell; gcd keeps odd widths valid.
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}; choose one of {list(NORMS)}")


@register_cell("resnet")
class ResNetCell(nn.Module):
    """The DEQ-style residual cell with input injection:

        y  = norm1(relu(conv1(z)))
        z' = norm3(relu(z + norm2(x + conv2(y))))

    Both 3x3 convolutions are masked; norms are not (they hold few parameters).
    GroupNorm is the default because it keeps a cell's output independent of the batch,
    which a fixed point needs; BatchNorm would share running statistics across applications.
    """

    def __init__(self, width: int, norm: str = "group"):
        super().__init__()
        self.conv1 = MaskedConv2d(width, width, 3, padding=1, bias=False)
        self.conv2 = MaskedConv2d(width, width, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, width)
        self.norm2 = make_norm(norm, width)
        self.norm3 = make_norm(norm, width)

    def forward(self, z: torch.Tensor, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        y = self.norm1(F.relu(self.conv1(z, index)))
        return self.norm3(F.relu(z + self.norm2(x + self.conv2(y, index))))
