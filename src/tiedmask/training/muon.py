"""Orthogonalised updates for convolution filters (Muon, Jordan et al. 2024, as the fast CIFAR-10
records use it) and Nesterov SGD for every other parameter, in one optimizer.

A filter bank's update is the Nesterov momentum of its gradient, flattened to a matrix
[out, in * k * k] and replaced by a near-orthogonal matrix with the same row and column spaces
(a quintic Newton-Schulz iteration): every direction the gradient spans moves at about the same
rate. The update rule is torch.optim.Muon's; torch's class is not used because it accepts 2-D
parameters only and runs the iteration in bfloat16, which CPUs without native bf16 emulate at a
tenth of fp32's speed (docs/results.md §6). Other parameters get torch.optim.SGD's Nesterov
update. tests/test_muon.py checks both halves against torch's own optimizers.

>>> import torch
>>> g = torch.tensor([[3.0, 0.0], [0.0, 0.1]])
>>> [round(v, 1) for v in torch.linalg.svdvals(orthogonalize(g)).tolist()]  # 3 and 0.1 -> about 1
[1.1, 0.7]
"""

from __future__ import annotations

import math

import torch

# torch.optim.Muon's defaults: a quintic whose slope at 0 is as large as possible, so that small
# singular values grow fast; the result has singular values in about [0.7, 1.2], not exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of g = U S V^T (a 2-D matrix), by Newton-Schulz iteration in fp32."""
    x = g.float()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Groups with ``orthogonal: True`` take Muon steps at ``lr * lr_scale`` (the training
    schedule sets ``lr`` for every group alike); the others take Nesterov SGD steps at ``lr``."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "orthogonal": False, "lr_scale": 1.0})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = group["lr"] * group["lr_scale"]
            update = self._muon if group["orthogonal"] else self._nesterov
            for p in group["params"]:
                if p.grad is not None:
                    update(p, self.state[p], lr, group["momentum"], group["weight_decay"])

    @staticmethod
    def _nesterov(p, state, lr, momentum, weight_decay) -> None:
        """torch.optim.SGD(nesterov=True, dampening=0)'s step (weight decay added to the gradient)."""
        d = p.grad.add(p, alpha=weight_decay) if weight_decay else p.grad
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = d.clone()
        else:
            state["momentum_buffer"].mul_(momentum).add_(d)
        p.add_(d.add(state["momentum_buffer"], alpha=momentum), alpha=-lr)

    @staticmethod
    def _muon(p, state, lr, momentum, weight_decay) -> None:
        """torch.optim.Muon's step on p flattened to [out, rest] (decoupled weight decay)."""
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - momentum)
        nesterov = p.grad.lerp(buf, momentum).reshape(p.size(0), -1)
        rows, cols = nesterov.shape
        p.mul_(1 - lr * weight_decay)
        p.add_(orthogonalize(nesterov).reshape(p.shape), alpha=-lr * math.sqrt(max(1.0, rows / cols)))
