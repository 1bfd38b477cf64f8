"""Hidden states of every application of every tied cell (or every DEQ solver iteration)."""

from __future__ import annotations

import torch


@torch.no_grad()
def stage_states(model, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """[stage][application] hidden states for one batch, model in eval mode (a DEQ's runner
    traces every solver iteration; see `tiedmask.core.execution`)."""
    model.eval()
    with model.tracing() as traces:
        model(x)
        return [list(t) for t in traces]


def relative_changes(states: list[torch.Tensor]) -> list[float]:
    """||z_{l+1} - z_l|| / ||z_l|| between consecutive applications (batch norms)."""
    return [float((b - a).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(states, states[1:])]
