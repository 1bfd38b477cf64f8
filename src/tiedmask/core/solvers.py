"""Root solvers for z = f(z): fixed-point iteration, Anderson acceleration, Broyden.

All work on a batch: residuals are per sample, ``abs = ||f(z) - z||`` and
``rel = abs / ||f(z)||``, and a solve stops once every sample is under `tol` (as torchdeq
does). Each sample returns its lowest-residual iterate. A residual that turns NaN or grows past
`diverge_factor` times the first one stops the iteration; the solve counts as diverged when it
never got below its first residual (a transient spike after progress keeps the best iterate).

>>> f = lambda z: 0.5 * z + 1.0          # fixed point 2
>>> z, stats = solve("anderson", f, torch.zeros(3, 4), max_iter=30, tol=1e-6)
>>> torch.allclose(z, torch.full((3, 4), 2.0), atol=1e-5), stats.diverged
(True, False)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError

STOP_MODES = ("abs", "rel")  # residual measured absolutely or relative to the state's size

Func = Callable[[torch.Tensor], torch.Tensor]
SOLVERS: dict[str, Callable] = {}


def register_solver(name: str):
    def wrap(fn):
        SOLVERS[name] = fn
        return fn

    return wrap


@dataclass
class SolverStats:
    iterations: int  # evaluations of f
    abs_residual: float  # worst sample, at the returned iterate
    rel_residual: float
    diverged: bool = False
    reason: str = ""
    out_of_time: bool = False  # stopped at its deadline (a run's time budget), not converged


class _Tracker:
    """Keeps each sample's best iterate and decides when to stop."""

    def __init__(self, z0: torch.Tensor, tol: float, stop_mode: str, diverge_factor: float,
                 deadline: float | None = None):
        if stop_mode not in STOP_MODES:
            raise ConfigError(f"stop_mode {stop_mode!r} must be 'abs' or 'rel'")
        self.best = z0.clone()
        self.best_abs = torch.full((z0.shape[0],), math.inf, device=z0.device, dtype=torch.float64)
        self.best_rel = self.best_abs.clone()
        self.tol, self.mode, self.factor = tol, stop_mode, diverge_factor
        self.first: float | None = None
        self.iterations = 0
        self.reason = ""  # why iteration stopped early, if it did
        self.deadline, self.out_of_time = deadline, False

    def update(self, z_next: torch.Tensor, residual: torch.Tensor) -> bool:
        """Record f(z) = z_next with residual f(z) - z (both [B, D]); True means stop."""
        self.iterations += 1
        abs_res = residual.double().norm(dim=1)
        rel_res = abs_res / (z_next.double().norm(dim=1) + 1e-9)
        if not torch.isfinite(abs_res).all():
            self.reason = f"non-finite residual at iteration {self.iterations}"
            return True
        worst = float(abs_res.max())
        self.first = worst if self.first is None else self.first
        if self.factor and self.first > 0 and worst > self.factor * max(self.first, 1e-6):
            self.reason = f"residual grew {worst / self.first:.1e}x by iteration {self.iterations}"
            return True
        score = abs_res if self.mode == "abs" else rel_res
        better = score < (self.best_abs if self.mode == "abs" else self.best_rel)
        self.best[better] = z_next[better]
        self.best_abs = torch.where(better, abs_res, self.best_abs)
        self.best_rel = torch.where(better, rel_res, self.best_rel)
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.out_of_time = True
            return True
        return bool((score < self.tol).all())

    def result(self, shape) -> tuple[torch.Tensor, SolverStats]:
        best = float(self.best_abs.max())
        no_progress = self.first is None or not best < self.first
        stats = SolverStats(self.iterations, best, float(self.best_rel.max()),
                            diverged=bool(self.reason) and no_progress, reason=self.reason,
                            out_of_time=self.out_of_time)
        return self.best.view(shape), stats


# What each solver's options may be (a value outside would divide by zero, never move, or run
# an unbounded history): checked with the settings, before any model is built.
OPTION_RANGES = {
    "fixed_point": {"damping": (lambda v: 0 < v <= 1, "in (0, 1]")},
    "anderson": {"m": (lambda v: v >= 1, ">= 1"), "lam": (lambda v: 0 <= v < float("inf"), ">= 0 and finite"),
                 "beta": (lambda v: 0 < v <= 1, "in (0, 1]")},
    "broyden": {"memory": (lambda v: v is None or v >= 1, ">= 1")},
}


def solve(name: str, f: Func, z0: torch.Tensor, max_iter: int = 30, tol: float = 1e-3,
          stop_mode: str = "rel", diverge_factor: float = 1e4, deadline: float | None = None,
          **options) -> tuple[torch.Tensor, SolverStats]:
    """Find z with f(z) = z from `z0` (any shape [B, ...]) with solver `name`; stop at
    `deadline` (a `time.perf_counter()` value) with the best iterate so far."""
    if name not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    if max_iter < 1:
        raise ConfigError(f"solver max_iter must be >= 1, got {max_iter}")
    shape = z0.shape
    flat_f = lambda z: f(z.view(shape)).reshape(shape[0], -1)  # noqa: E731
    tracker = _Tracker(z0.reshape(shape[0], -1), tol, stop_mode, diverge_factor, deadline)
    SOLVERS[name](flat_f, z0.reshape(shape[0], -1), max_iter, tracker, **options)
    return tracker.result(shape)


@register_solver("fixed_point")
def fixed_point(f: Func, z: torch.Tensor, max_iter: int, tracker: _Tracker, damping: float = 1.0):
    """z <- (1 - damping) z + damping f(z)."""
    for _ in range(max_iter):
        fz = f(z)
        if tracker.update(fz, fz - z):
            return
        z = (1 - damping) * z + damping * fz


@register_solver("anderson")
def anderson(f: Func, z: torch.Tensor, max_iter: int, tracker: _Tracker,
             m: int = 5, lam: float = 1e-4, beta: float = 1.0):
    """Anderson acceleration (type II): mix the last `m` iterates to minimise the residual.

    Solves min ||sum_i a_i g_i|| s.t. sum a_i = 1 (g_i = f(z_i) - z_i) through its bordered
    linear system, then z <- beta * sum a_i f(z_i) + (1 - beta) * sum a_i z_i.
    The Tikhonov term is `lam` times the mean of diag(G G^T), not `lam` alone: an absolute term
    swamps G G^T once residuals are small (1e-10 << 1e-4) and turns the mix into a plain
    average, which made Anderson slower than fixed-point iteration near convergence.
    """
    batch, dim = z.shape
    zs = torch.zeros(batch, m, dim, dtype=z.dtype, device=z.device)
    fs = torch.zeros_like(zs)
    for k in range(max_iter):
        fz = f(z)
        if tracker.update(fz, fz - z):
            return
        zs[:, k % m], fs[:, k % m] = z, fz
        n = min(k + 1, m)
        g = (fs[:, :n] - zs[:, :n]).double()
        system = torch.zeros(batch, n + 1, n + 1, dtype=torch.float64, device=z.device)
        system[:, 0, 1:] = system[:, 1:, 0] = 1
        gram = g @ g.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30).view(batch, 1, 1)
        system[:, 1:, 1:] = gram + lam * scale * torch.eye(n, dtype=torch.float64, device=z.device)
        rhs = torch.zeros(batch, n + 1, 1, dtype=torch.float64, device=z.device)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(system, rhs)[:, 1:, 0].to(z.dtype)  # [B, n], sums to 1
        mixed_f = (alpha.unsqueeze(1) @ fs[:, :n]).squeeze(1)
        mixed_z = (alpha.unsqueeze(1) @ zs[:, :n]).squeeze(1)
        z = beta * mixed_f + (1 - beta) * mixed_z


@register_solver("broyden")
def broyden(f: Func, z: torch.Tensor, max_iter: int, tracker: _Tracker, memory: int | None = None):
    """Broyden's ("good") method on g(z) = f(z) - z with a low-rank inverse Jacobian.

    J^-1 ~ -I + U V^T (at most `memory` rank-one terms, default max_iter; the oldest is
    dropped when full).
    Step: z <- z - J^-1 g(z); update by Sherman-Morrison so J^-1 maps the last dg onto dz.
    """
    batch, dim = z.shape
    memory = memory or max_iter
    us = torch.zeros(batch, dim, memory, dtype=z.dtype, device=z.device)
    vs = torch.zeros(batch, memory, dim, dtype=z.dtype, device=z.device)

    def inv_jac_times(x):  # (-I + U V^T) x, x: [B, D]
        return -x + (us @ (vs @ x.unsqueeze(2))).squeeze(2)

    def times_inv_jac(x):  # x^T (-I + U V^T)
        return -x + ((x.unsqueeze(1) @ us) @ vs).squeeze(1)

    fz = f(z)
    g = fz - z
    if tracker.update(fz, g):
        return
    for k in range(1, max_iter):
        dz = -inv_jac_times(g)
        z = z + dz
        fz = f(z)
        g_new = fz - z
        if tracker.update(fz, g_new):
            return
        dg = g_new - g
        g = g_new
        jdg = inv_jac_times(dg)
        v = times_inv_jac(dz)
        denom = (v * dg).sum(1, keepdim=True)
        denom = torch.where(denom.abs() < 1e-12, torch.full_like(denom, 1e-12), denom)
        u = (dz - jdg) / denom
        slot = (k - 1) % memory
        us[:, :, slot], vs[:, slot] = u, v
