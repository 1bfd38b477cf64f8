"""Tied layers under channel masks compute only their kept rows, as the built-in layers do.

`tie` reads a tied weight through a `SharedWeight` parametrization: under channel masks that is
the whole weight times a mask of zero rows, and the layer computes every row. For a Linear,
Conv2d or Hugging Face Conv1D, `compute_kept_rows_only` gives the layer's parametrized class
(torch's parametrize makes one class per module, so no other module changes, and untying
restores the layer's own class) a forward that computes the running application's kept rows
from the shared weight and places them among zeros (`MaskBank.place`): density d of the
arithmetic, forward and backward. Outside a position, or with a relaxation (a low-rank update
changes every row), the layer's own forward runs on the parametrized weight.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .masks import MaskBank, mask_index
from .tied_block import shared_weight


def _kept_rows(module: nn.Module) -> tuple[MaskBank, torch.Tensor, int] | None:
    """(mask bank, kept rows, mask index) of the running application, or None where every row
    is computed."""
    found = shared_weight(module)
    if found is None or found.relaxation is not None or found.state.index is None:
        return None
    if list(module.parametrizations.weight) != [found]:  # another parametrization of the weight
        return None                                      # (weight or spectral norm): the masked-weight path
    which = mask_index(found.scope, found.state.index)
    if which is None or found.mask_bank is None or found.mask_bank.kept_rows is None:
        return None
    return found.mask_bank, found.mask_bank.kept_rows[which], which


def _forward_of(compute: Callable) -> Callable:
    """A layer forward: `compute(module, x, weight_part, rows)` on the kept rows, else the layer's own."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # torch's name: layer(input=...) works
        found = _kept_rows(self)
        if found is None:
            return type(self).__bases__[0].forward(self, input)
        bank, rows, which = found
        part = compute(self, input, self.parametrizations.weight.original, rows)
        return bank.place(part, which, self.bias)

    return forward


def _linear(module, x, shared, rows):
    return F.linear(x, shared.index_select(0, rows))


def _conv2d(module, x, shared, rows):
    return module._conv_forward(x, shared.index_select(0, rows), None)


def _conv1d(module, x, shared, rows):  # transformers' Conv1D stores (in, out): y = x @ W + b
    return x @ shared.index_select(1, rows)


def compute_kept_rows_only(module: nn.Module) -> bool:
    """Give a tied, channel-masked layer the kept-rows forward; False for a layer it does not
    know (a subclass with a forward of its own, a grouped convolution, whose filters belong to
    groups), which keeps computing every row."""
    base = type(module).__bases__[0]
    if issubclass(base, nn.Linear) and base.forward is nn.Linear.forward:
        forward = _forward_of(_linear)
    elif issubclass(base, nn.Conv2d) and base.forward is nn.Conv2d.forward and module.groups == 1:
        forward = _forward_of(_conv2d)
    elif base.__name__ == "Conv1D" and base.__module__.startswith("transformers"):
        forward = _forward_of(_conv1d)
    else:
        return False
    type(module).forward = forward
    return True
