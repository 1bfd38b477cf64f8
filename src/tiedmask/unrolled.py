"""Weight-tied execution, z_0 = 0, z_{l+1} = f(z_l, x; M_l), and its untied baseline, where
every application has weights of its own (the ordinary deep network of the same shape)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .masks import mask_index


class Unrolled(nn.Module):
    """Apply `cell` `depth` times with the mask that `scope` assigns to each application.

    Args:
        cell: a module ``cell(z, x, index)``.
        depth: number of applications (>= 1).
        scope: ``dense``, ``same`` or ``multi`` (see `tiedmask.masks`).
        checkpointing: recompute each application in the backward pass instead of storing
            its activations: memory stays at about one application's, for ~1.3x compute.

    Set ``trace = []`` to collect the hidden state after every application (for analysis).

    >>> from tiedmask.cells import ResNetCell
    >>> net = Unrolled(ResNetCell(8), depth=3, scope="dense")
    >>> net(torch.randn(2, 8, 4, 4)).shape
    torch.Size([2, 8, 4, 4])
    """

    def __init__(self, cell: nn.Module, depth: int, scope: str, checkpointing: bool = False):
        super().__init__()
        self.cell = cell
        self.depth = depth
        self.scope = scope
        self.checkpointing = checkpointing
        self.trace: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)
        # Cells with a norm per application (ConvCell) are also told which application runs.
        per_step = getattr(self.cell, "norm_per_application", False)
        for step in range(self.depth):
            args = (z, x, mask_index(self.scope, step)) + ((step,) if per_step else ())
            if self.checkpointing and torch.is_grad_enabled():
                z = checkpoint(self.cell, *args, use_reentrant=False)
            else:
                z = self.cell(*args)
            if self.trace is not None:
                self.trace.append(z.detach())
        return z


class Untied(nn.Module):
    """Apply `depth` separate cells once each: the untied network of the same shape.

    `cells[l]` runs application l with its own weights, so the network has `depth` times the
    tied cell's parameters at the same FLOPs. Cells with a norm per application are built for
    one application and told step 0.
    """

    def __init__(self, cells: list[nn.Module], checkpointing: bool = False):
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.depth = len(cells)
        self.checkpointing = checkpointing
        self.trace: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)
        for cell in self.cells:
            args = (z, x, None) + ((0,) if getattr(cell, "norm_per_application", False) else ())
            if self.checkpointing and torch.is_grad_enabled():
                z = checkpoint(cell, *args, use_reentrant=False)
            else:
                z = cell(*args)
            if self.trace is not None:
                self.trace.append(z.detach())
        return z
