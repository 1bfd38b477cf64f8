"""Equilibrium execution: run a cell to its fixed point, differentiate implicitly or by phantom steps.

    forward:   z* = solve(z -> f(z, x), z_0 = 0)            without a graph (constant memory)
    implicit:  dL/dtheta = (df/dtheta)^T y,  y = (df/dz)^T y + dL/dz*   (adjoint fixed point,
               solved with the same solver)
    phantom:   k damped steps z <- (1 - tau) z + tau f(z) from z*, differentiated as usual
"""

from __future__ import annotations

import torch
from torch import autograd, nn

from ..errors import ConfigError, TiedmaskError
from ..masks import mask_index
from .solvers import SolverStats, solve

GRADIENTS = ("implicit", "phantom")
NO_MULTI_MASK_FIXED_POINT = ("mask_scope 'multi' has no fixed point (each step would be another "
                             "function); use mask_scope same or dense with execution equilibrium")


class SolverDiverged(TiedmaskError):
    """The forward or backward solve went non-finite or blew up; the run is reported diverged."""


class _ImplicitGrad(autograd.Function):
    """Identity forward; backward replaces dL/dz with the adjoint fixed point y."""

    @staticmethod
    def forward(ctx, z, func, z_star, settings, record):
        ctx.func, ctx.settings, ctx.record = func, settings, record
        ctx.save_for_backward(z_star)
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        (z_star,) = ctx.saved_tensors
        h = z_star.detach().requires_grad_()
        with torch.enable_grad():
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


class Equilibrium(nn.Module):
    """Run `cell` to z* = cell(z*, x, index) instead of unrolling it.

    Args:
        cell: a module ``cell(z, x, index)`` (any registered cell).
        scope: ``dense`` or ``same``; a fixed point of one function cannot use a mask per step.
        solver: ``fixed_point``, ``anderson`` or ``broyden``; also used for the adjoint.
        grad: ``implicit`` (IFT) or ``phantom`` (k damped unrolled steps).
        train_max_iter / eval_max_iter / backward_max_iter: solver iteration limits.
        tol, stop_mode: stop when every sample's ``abs`` or ``rel`` residual is under `tol`.
        solver_options: e.g. ``{"m": 5, "lam": 1e-4, "beta": 1.0}`` for Anderson,
            ``{"damping": 0.5}`` for fixed-point iteration.
        phantom_steps, phantom_tau: k and tau of the phantom gradient.
        jac_reg: weight of the Hutchinson estimate of ||df/dz||_F^2 / dim (0 = off).

    >>> from tiedmask.cells import ResNetCell
    >>> deq = Equilibrium(ResNetCell(8), scope="dense")
    >>> deq(torch.randn(2, 8, 4, 4)).shape
    torch.Size([2, 8, 4, 4])
    """

    def __init__(self, cell: nn.Module, scope: str, solver: str = "anderson", grad: str = "implicit",
                 train_max_iter: int = 20, eval_max_iter: int = 30, backward_max_iter: int = 20,
                 tol: float = 1e-3, stop_mode: str = "rel", solver_options: dict | None = None,
                 phantom_steps: int = 5, phantom_tau: float = 0.5, jac_reg: float = 0.0):
        super().__init__()
        if scope == "multi":
            raise ConfigError(NO_MULTI_MASK_FIXED_POINT)
        if grad not in GRADIENTS:
            raise ConfigError(f"unknown DEQ gradient {grad!r}; choose one of {list(GRADIENTS)}")
        if phantom_steps < 1 or not 0 < phantom_tau <= 1:
            raise ConfigError("phantom_steps must be >= 1 and phantom_tau in (0, 1]")
        self.cell, self.scope, self.solver, self.grad = cell, scope, solver, grad
        self.train_max_iter, self.eval_max_iter = train_max_iter, eval_max_iter
        self.backward_max_iter, self.tol, self.stop_mode = backward_max_iter, tol, stop_mode
        self.solver_options = dict(solver_options or {})
        self.phantom_steps, self.phantom_tau, self.jac_reg = phantom_steps, phantom_tau, jac_reg
        self.forward_stats: list[SolverStats] = []
        self.backward_stats: list[SolverStats] = []
        self.aux_loss: torch.Tensor | None = None
        self.trace: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = mask_index(self.scope, 0)

        def func(z):
            return self.cell(z, x, index)

        max_iter = self.train_max_iter if self.training else self.eval_max_iter
        with torch.no_grad():
            traced = func if self.trace is None else self._tracing(func)
            z_star, stats = solve(self.solver, traced, torch.zeros_like(x), max_iter=max_iter,
                                  tol=self.tol, stop_mode=self.stop_mode, **self.solver_options)
        self.forward_stats.append(stats)
        if stats.diverged:
            raise SolverDiverged(f"forward solve diverged: {stats.reason}")
        self.aux_loss = None
        if not (self.training and torch.is_grad_enabled()):
            return z_star
        if self.jac_reg > 0:
            self.aux_loss = self.jac_reg * self._jacobian_penalty(func, z_star)
        if self.grad == "implicit":
            settings = {"solver": self.solver, "max_iter": self.backward_max_iter, "tol": self.tol,
                        "stop_mode": self.stop_mode, "options": self.solver_options}
            return _ImplicitGrad.apply(func(z_star), func, z_star, settings, self.backward_stats.append)
        z = z_star
        for _ in range(self.phantom_steps):
            z = (1 - self.phantom_tau) * z + self.phantom_tau * func(z)
        return z

    def _tracing(self, func):
        def traced(z):
            out = func(z)
            self.trace.append(out.detach())
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
