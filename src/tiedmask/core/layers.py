"""Conv and Linear layers whose shared weight is masked per application.

The masks are a `MaskBank` of non-persistent buffers: they are regenerated from the model
config (see `tiedmask.core.masks`), so checkpoints hold only the dense shared weights.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .masks import MaskBank


class MaskedWeight:
    """Mixin: the layer's weight under the mask of an application index, from its `MaskBank`
    (None: dense)."""

    mask_bank: MaskBank | None
    _built: torch.Tensor | None = None  # every masked weight of this forward pass, [n, *shape]

    def _init_masks(self) -> None:
        self.register_module("mask_bank", None)

    @property
    def kept_rows(self) -> torch.Tensor | None:
        """Channel masks: [n, k] indices of the kept output rows (None otherwise)."""
        return None if self.mask_bank is None else self.mask_bank.kept_rows

    def build_masks(self, kind: str, count: int, density: float, seed: int, name: str, **opts) -> None:
        """Create `count` masks for this layer's weight, named `name` in the model."""
        if count == 0:
            self.mask_bank = None
            return
        shape = tuple(self.weight.shape)
        self.mask_bank = MaskBank(kind, shape, count, density, seed, name, **opts).to(self.weight.device)

    def _kept(self, x: torch.Tensor, index: int, compute) -> torch.Tensor:
        """The output of a channel-masked layer from its kept rows alone: `compute(x, weight)`
        runs on the kept rows' weights (density d of the arithmetic, forward and backward) and
        the mask bank puts the result back among zeros, with the (unmasked) bias."""
        part = compute(x, self.weight.index_select(0, self.kept_rows[index]))
        return self.mask_bank.place(part, index, self.bias)

    def masked_weight(self, index: int | None) -> torch.Tensor:
        if index is None or self.mask_bank is None:
            return self.weight
        if self._built is not None:
            return self._built[index]
        return self.mask_bank.apply(self.weight, index)

    def build_all(self) -> None:
        """Mask the weight with every mask in one operation, for reuse by every application."""
        if self.mask_bank is not None and self.kept_rows is None:
            self._built = self.weight.unsqueeze(0) * self.mask_bank.stack()

    def mask_density(self, index: int | None) -> float:
        if index is None or self.mask_bank is None:
            return 1.0
        return self.mask_bank.density(index)

    def mask_stack(self) -> torch.Tensor | None:
        """All masks in the weight's shape, ``[n, *weight.shape]`` (None when dense)."""
        return None if self.mask_bank is None else self.mask_bank.stack()


class MaskedConv2d(nn.Conv2d, MaskedWeight):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_masks()

    def forward(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        if index is not None and self.kept_rows is not None:
            return self._kept(x, index, lambda x, w: self._conv_forward(x, w, None))
        return self._conv_forward(x, self.masked_weight(index), self.bias)


class MaskedLinear(nn.Linear, MaskedWeight):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_masks()

    def forward(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        if index is not None and self.kept_rows is not None:
            return self._kept(x, index, F.linear)
        return F.linear(x, self.masked_weight(index), self.bias)


@contextlib.contextmanager
def masked_weights_built_once(module: nn.Module):
    """Within the block, each masked layer under `module` masks its weight once for all
    applications (one fused multiply, one in the backward pass) instead of once per call:
    a same-mask model or a DEQ solve reuses one product; a multi-mask model builds all its
    masked weights together. The products are dropped on exit, so weights updated by the
    optimizer are never served stale.
    """
    layers = [layer for _, layer in masked_layers(module)]
    for layer in layers:
        layer.build_all()
    try:
        yield
    finally:
        for layer in layers:
            layer._built = None


def masked_layers(module: nn.Module) -> list[tuple[str, MaskedWeight]]:
    """(qualified name, layer) for every masked layer under `module`."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, MaskedWeight)]
