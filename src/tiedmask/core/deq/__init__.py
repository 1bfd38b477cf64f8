"""Deep equilibrium execution of any registered cell: z* = f(z*, x)."""

from .equilibrium import Equilibrium
from ..solvers import SOLVERS, SolverStats, register_solver, solve

__all__ = ["Equilibrium", "SOLVERS", "SolverStats", "register_solver", "solve"]
