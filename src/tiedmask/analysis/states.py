"""Hidden states of every application of every tied cell (or every DEQ solver iteration)."""

from __future__ import annotations

import contextlib

import torch


def runners(model) -> list:
    """The per-stage runners (Unrolled or Equilibrium) of a TiedNet."""
    return [stage.tied for stage in model.stages]


@contextlib.contextmanager
def tracing(model):
    """Within the block, each runner's `trace` collects its states; yields the list of traces."""
    stages = runners(model)
    for r in stages:
        r.trace = []
    try:
        yield [r.trace for r in stages]
    finally:
        for r in stages:
            r.trace = None


@torch.no_grad()
def stage_states(model, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """[stage][application] hidden states for one batch, model in eval mode."""
    model.eval()
    with tracing(model) as traces:
        model(x)
        return [list(t) for t in traces]


def relative_changes(states: list[torch.Tensor]) -> list[float]:
    """||z_{l+1} - z_l|| / ||z_l|| between consecutive applications (batch norms)."""
    return [float((b - a).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(states, states[1:])]
