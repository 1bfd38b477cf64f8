"""How a stage runs its cell: the runner contract, weight-tied unrolling and its untied baseline.

Every runner (these two, `tiedmask.core.deq.Equilibrium`, and tied external blocks) keeps one
contract, written here once; backbones, training and analysis use nothing else:

    forward(x) -> z                 run the stage on its input injection x (z_0 = 0)
    cell(z, x, index, step)         how it calls a cell (`tiedmask.core.cells.Cell`)
    aux_loss() -> Tensor | None     a regulariser of the last training forward (DEQ Jacobian)
    pop_stats() -> (fwd, bwd)       solver statistics since the last call (empty lists if none)
    tracing() -> list               context: collects the state after every application or
                                    solver iteration, the same number for every batch
    deadline                        a time.perf_counter() value an iterative runner stops at
                                    (None: no bound); training sets it from the time budget
    builds_masked_weights_once      whether the stage may mask every weight once per pass
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .masks import mask_index


class Runner(nn.Module):
    """Base of every runner: the defaults of the contract above."""

    def __init__(self):
        super().__init__()
        self._trace: list[torch.Tensor] | None = None
        self.deadline: float | None = None

    @property
    def builds_masked_weights_once(self) -> bool:
        return True

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def pop_stats(self) -> tuple[list, list]:
        return [], []

    @contextlib.contextmanager
    def tracing(self):
        self._trace = []
        try:
            yield self._trace
        finally:
            self._trace = None

    def _record(self, z: torch.Tensor) -> None:
        if self._trace is not None:
            self._trace.append(z.detach())


class Unrolled(Runner):
    """Apply `cell` `depth` times with the mask that `scope` assigns to each application.

    Args:
        cell: a `Cell`.
        depth: number of applications (>= 1).
        scope: ``dense``, ``same`` or ``multi`` (see `tiedmask.core.masks`).
        checkpointing: recompute each application in the backward pass instead of storing
            its activations: memory stays at about one application's, for ~1.3x compute.

    >>> from tiedmask.core.cells import ResNetCell
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

    @property
    def builds_masked_weights_once(self) -> bool:
        # Recomputation in the backward pass must save exactly what the forward pass saved,
        # so with checkpointing each application masks its own weight.
        return not self.checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)
        for step in range(self.depth):
            z = _apply(self.cell, (z, x, mask_index(self.scope, step), step), self.checkpointing)
            self._record(z)
        return z


class Untied(Runner):
    """Apply `depth` separate cells once each: the untied network of the same shape.

    `cells[l]` runs application l with its own weights, so the network has `depth` times the
    tied cell's parameters at the same FLOPs. Each cell runs once, as its own step 0.
    """

    def __init__(self, cells: list[nn.Module], checkpointing: bool = False):
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.depth = len(cells)
        self.checkpointing = checkpointing

    @property
    def builds_masked_weights_once(self) -> bool:
        return False  # nothing is applied twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)
        for cell in self.cells:
            z = _apply(cell, (z, x, None, 0), self.checkpointing)
            self._record(z)
        return z


def _apply(cell: nn.Module, args: tuple, checkpointing: bool) -> torch.Tensor:
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(cell, *args, use_reentrant=False)
    return cell(*args)
