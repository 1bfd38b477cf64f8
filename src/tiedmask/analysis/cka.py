"""Linear CKA with the minibatch unbiased HSIC estimator (Nguyen, Raghu & Kornblith, 2021).

For minibatches i with linear Gram matrices K_i = X_i X_i^T and L_i = Y_i Y_i^T,

    CKA = sum_i HSIC_1(K_i, L_i) / sqrt(sum_i HSIC_1(K_i, K_i) * sum_i HSIC_1(L_i, L_i))

with the unbiased HSIC_1 of Song et al. (2012). Unlike the plain (biased) estimator, it does
not drift upward with feature dimension when batches are small, and it accumulates over
batches, so a whole test set never needs to sit in memory. Everything is in float64.

>>> x = torch.randn(64, 10)
>>> round(float(linear_cka([x, 3 * x])[0, 1]), 6)
1.0
"""

from __future__ import annotations

import torch


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """HSIC_1 of two n x n Gram matrices (n >= 4)."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples per batch, got {n}")
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    trace = (k * l.T).sum()
    sums = (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
    cross = (ones.T @ k @ l @ ones) * 2 / (n - 2)
    return ((trace + sums - cross) / (n * (n - 3))).squeeze()


class MinibatchCKA:
    """Accumulates HSIC_1 between every pair of `n` representations, batch by batch.

    >>> acc = MinibatchCKA(2)
    >>> for _ in range(3):
    ...     x = torch.randn(32, 5)
    ...     acc.update([x, x @ torch.linalg.qr(torch.randn(5, 5))[0]])
    >>> bool(torch.allclose(acc.compute(), torch.ones(2, 2, dtype=torch.float64)))
    True
    """

    def __init__(self, n: int):
        self.hsic = torch.zeros(n, n, dtype=torch.float64)

    def update(self, features: list[torch.Tensor]) -> None:
        grams = [f.detach().flatten(1).double().cpu() for f in features]
        grams = [g @ g.T for g in grams]
        for i in range(len(grams)):
            for j in range(i, len(grams)):
                value = unbiased_hsic(grams[i], grams[j])
                self.hsic[i, j] += value
                if i != j:
                    self.hsic[j, i] += value

    def compute(self) -> torch.Tensor:
        diag = self.hsic.diagonal().clamp_min(1e-30).sqrt()
        return self.hsic / (diag[:, None] * diag[None, :])


def linear_cka(features: list[torch.Tensor]) -> torch.Tensor:
    """CKA matrix of representations of one batch (each [n, ...])."""
    acc = MinibatchCKA(len(features))
    acc.update(features)
    return acc.compute()
