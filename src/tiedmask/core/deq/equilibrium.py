"""Equilibrium execution: run a cell to its fixed point, differentiate implicitly or by phantom steps.

    forward:   z* = solve(z -> f(z, x), z_0 = 0)            without a graph (constant memory)
    implicit:  dL/dtheta = (df/dtheta)^T y,  y = (df/dz)^T y + dL/dz*   (adjoint fixed point,
               solved with the same solver)
    phantom:   k damped steps z <- (1 - tau) z + tau f(z) from z*, differentiated as usual
"""

from __future__ import annotations

import contextlib

import torch
from torch import autograd, nn

from ...errors import ConfigError, TiedmaskError
from ..execution import Runner
from ..masks import mask_index
from ..spec import NO_MULTI_MASK_FIXED_POINT, DeqConfig
from ..solvers import SolverStats, solve


class SolverDiverged(TiedmaskError):
    """The forward or backward solve went non-finite or blew up; the run is reported diverged."""


class _ImplicitGrad(autograd.Function):
    """Identity forward; backward replaces dL/dz with the adjoint fixed point y."""

    @staticmethod
    def forward(ctx, z, func, z_star, settings, record):
        ctx.func, ctx.settings, ctx.record = func, settings, record
        # Backward runs outside the caller's autocast: re-enter it, or a bf16 z* meets fp32 weights.
        kind = z.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.save_for_backward(z_star)
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        (z_star,) = ctx.saved_tensors
        h = z_star.detach().requires_grad_()
        kind, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            fh = ctx.func(h)

        def adjoint(y):
            return autograd.grad(fh, h, y, retain_graph=True)[0] + grad

        y, stats = solve(ctx.settings["solver"], adjoint, torch.zeros_like(grad),
                         max_iter=ctx.settings["max_iter"], tol=ctx.settings["tol"],
                         stop_mode=ctx.settings["stop_mode"], **ctx.settings["options"])
        ctx.record(stats)
        if stats.diverged:
            raise SolverDiverged(f"backward solve diverged: {stats.reason}")
        return y, None, None, None, None


class Equilibrium(Runner):
    """Run `cell` to z* = cell(z*, x, index) instead of unrolling it (a `Runner`).

    Args:
        cell: a `Cell` (any registered cell without per-application parts).
        scope: ``dense`` or ``same``; a fixed point of one function cannot use a mask per step.
        settings: `DeqConfig`: solver (also used for the adjoint), implicit or phantom
            gradient, iteration limits, tolerance and stop mode, solver options (passed to
            the solver unchanged), phantom steps and tau, Jacobian regulariser weight.

    >>> from tiedmask.core.cells import ResNetCell
    >>> deq = Equilibrium(ResNetCell(8), scope="dense")
    >>> deq(torch.randn(2, 8, 4, 4)).shape
    torch.Size([2, 8, 4, 4])
    """

    def __init__(self, cell: nn.Module, scope: str, settings: DeqConfig | None = None):
        super().__init__()
        if scope == "multi":
            raise ConfigError(NO_MULTI_MASK_FIXED_POINT)
        self.settings = settings or DeqConfig()
        self.settings.validate()
        self.cell, self.scope = cell, scope
        self.forward_stats: list[SolverStats] = []
        self.backward_stats: list[SolverStats] = []
        self._aux: torch.Tensor | None = None
        self._exhaustive = False  # while tracing: run every iteration (tol 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        index = mask_index(self.scope, 0)

        def func(z):
            return self.cell(z, x, index, 0)

        max_iter = s.train_iter if self.training else s.eval_iter
        tol = 0.0 if self._exhaustive else s.tol
        with torch.no_grad():
            traced = func if self._trace is None else self._tracing(func)
            z_star, stats = solve(s.solver, traced, torch.zeros_like(x), max_iter=max_iter,
                                  tol=tol, stop_mode=s.stop_mode, deadline=self.deadline,
                                  **s.solver_options)
        self.forward_stats.append(stats)
        if stats.diverged:
            raise SolverDiverged(f"forward solve diverged: {stats.reason}")
        self._aux = None
        if not (self.training and torch.is_grad_enabled()):
            return z_star
        if s.jac_reg > 0:
            self._aux = s.jac_reg * self._jacobian_penalty(func, z_star)
        if s.grad == "implicit":
            adjoint = {"solver": s.solver, "max_iter": s.backward_iter, "tol": s.tol,
                       "stop_mode": s.stop_mode, "options": {**s.solver_options, "deadline": self.deadline}}
            return _ImplicitGrad.apply(func(z_star), func, z_star, adjoint, self.backward_stats.append)
        z = z_star
        for _ in range(s.phantom_steps):
            z = (1 - s.phantom_tau) * z + s.phantom_tau * func(z)
        return z

    def aux_loss(self) -> torch.Tensor | None:
        return self._aux

    @contextlib.contextmanager
    def tracing(self):
        """Every solver iteration's state; all iterations run, so batches trace alike."""
        self._exhaustive = True
        try:
            with super().tracing() as states:
                yield states
        finally:
            self._exhaustive = False

    def _tracing(self, func):
        def traced(z):
            out = func(z)
            self._record(out)
            return out
        return traced

    @staticmethod
    def _jacobian_penalty(func, z_star: torch.Tensor) -> torch.Tensor:
        """Hutchinson: E_v ||v^T J||^2 = ||J||_F^2 for v ~ N(0, I); divided by the dimension."""
        z = z_star.detach().requires_grad_()
        fz = func(z)
        v = torch.randn_like(fz)
        vjp = autograd.grad(fz, z, v, create_graph=True)[0]
        return vjp.pow(2).sum() / v.numel()

    def pop_stats(self) -> tuple[list[SolverStats], list[SolverStats]]:
        forward, backward = self.forward_stats, self.backward_stats
        self.forward_stats, self.backward_stats = [], []
        return forward, backward
