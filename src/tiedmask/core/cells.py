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

from ..errors import ConfigError
from .layers import MaskedConv2d, MaskedLinear

CELLS: dict[str, Callable[..., "Cell"]] = {}
NORMS = ("auto", "group", "batch", "layer", "none")  # auto: group for conv cells, layer for tokens


def register_cell(name: str):
    """Class decorator: make a cell constructible by name, ``CELLS[name](width=..., norm=...)``."""

    def wrap(cls):
        CELLS[name] = cls
        return cls

    return wrap


def make_norm(kind: str, channels: int) -> nn.Module:
    """A norm for conv feature maps [B, C, H, W]."""
    if kind in ("group", "auto"):
        # 8 groups as in the DEQ ResNet cell; gcd keeps odd widths valid.
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm {kind!r} does not fit conv cells; choose group, batch or none")


class Cell(nn.Module):
    """The contract every cell keeps with the runners (`tiedmask.core.execution`):

        forward(z, x, index, step) -> z'   z: state, x: input injection (same shape),
                                           index: mask index (None = dense), step: which
                                           application this is (0-based; for parts owned
                                           per application, such as a norm)
        extra_macs(state_shape) -> int     multiply-adds per image no Conv/Linear carries
        settings                           the model settings its constructor takes, by name
        create(width, applications, **settings)   the cell for a runner that applies it
                                           `applications` times, given only its settings
    """

    settings: tuple[str, ...] = ("norm",)

    @classmethod
    def create(cls, width: int, applications: int, **settings) -> Cell:
        return cls(width, **settings)

    def forward(self, z: torch.Tensor, x: torch.Tensor, index: int | None = None,
                step: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def extra_macs(self, state_shape: torch.Size) -> int:
        return 0


def batch_norm_if_auto(kind: str) -> str:
    """The fast conv layout's norm: BatchNorm unless another is asked for."""
    return "batch" if kind == "auto" else kind


@register_cell("resnet")
class ResNetCell(Cell):
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

    def forward(self, z: torch.Tensor, x: torch.Tensor, index: int | None = None,
                step: int = 0) -> torch.Tensor:
        y = self.norm1(F.relu(self.conv1(z, index)))
        return self.norm3(F.relu(z + self.norm2(x + self.conv2(y, index))))


@register_cell("conv")
class ConvCell(Cell):
    """One masked 3x3 convolution with a norm per application (airbench's second conv, looped):

        z' = gelu(norm_step(conv(z + x)))

    With z_0 = 0 the first application is exactly a plain conv block; later ones see the stage
    input again through the injection, which acts as a skip connection. BatchNorm statistics
    differ per application (and per mask), so each application owns its norm (2 * width
    parameters); the conv weight is the only tied weight. No fixed point: unrolled or untied.
    """

    @classmethod
    def create(cls, width: int, applications: int, **settings) -> Cell:
        return cls(width, depth=applications, **settings)  # a norm per application

    def __init__(self, width: int, norm: str = "auto", depth: int = 1):
        super().__init__()
        self.conv = MaskedConv2d(width, width, 3, padding=1, bias=False)
        self.norms = nn.ModuleList(make_norm(batch_norm_if_auto(norm), width) for _ in range(depth))

    def forward(self, z: torch.Tensor, x: torch.Tensor, index: int | None = None,
                step: int = 0) -> torch.Tensor:
        return F.gelu(self.norms[step](self.conv(z + x, index)))


@register_cell("transformer")
class TransformerCell(Cell):
    """A pre-norm Transformer block on tokens [B, N, D] with input injection:

        h  = z + x
        h  = h + proj(attention(norm1(h)))
        z' = h + fc2(gelu(fc1(norm2(h))))

    Every Linear weight (qkv, proj, fc1, fc2) is masked.
    """

    settings = ("norm", "heads", "mlp_ratio")

    def __init__(self, width: int, norm: str = "auto", heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        if norm not in ("auto", "layer", "none"):
            raise ConfigError(f"norm {norm!r} does not fit the transformer cell; use layer or none")
        if width % heads:
            raise ConfigError(f"width {width} is not divisible by heads {heads}; change one of them")
        hidden = int(round(width * mlp_ratio))
        make = (lambda: nn.LayerNorm(width)) if norm != "none" else nn.Identity
        self.heads = heads
        self.norm1, self.norm2 = make(), make()
        self.qkv = MaskedLinear(width, 3 * width)
        self.proj = MaskedLinear(width, width)
        self.fc1 = MaskedLinear(width, hidden)
        self.fc2 = MaskedLinear(hidden, width)

    def forward(self, z: torch.Tensor, x: torch.Tensor, index: int | None = None,
                step: int = 0) -> torch.Tensor:
        b, n, d = z.shape
        h = z + x
        qkv = self.qkv(self.norm1(h), index).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + self.proj(attended, index)
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h), index)), index)

    def extra_macs(self, state_shape: torch.Size) -> int:
        """Attention scores and weighted values, which no Linear layer counts: 2 N^2 D per image."""
        _, n, d = state_shape
        return 2 * n * n * d
