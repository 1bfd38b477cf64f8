"""A patch-whitening stem (as in the fast CIFAR-10 recipes of hlb-cifar10 / airbench).

The first convolution's filters are the eigenvectors of the training images' patch
covariance, scaled by 1/sqrt(eigenvalue), and their negatives (so that a following GELU keeps
both signs). Decorrelated inputs make the first few epochs of high-lr SGD much more effective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


WHITEN_KERNEL = 2  # 2x2 patches, as in airbench


def whitening_filters(images: torch.Tensor, kernel: int = WHITEN_KERNEL, eps: float = 5e-4) -> torch.Tensor:
    """``[2 * c * k * k, c, k, k]`` filters that whiten the k x k patches of `images` [N, C, H, W]."""
    c = images.shape[1]
    patches = F.unfold(images.double(), kernel).transpose(1, 2).reshape(-1, c * kernel * kernel)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    filters = (eigenvectors.T / (eigenvalues + eps).sqrt().unsqueeze(1))
    filters = filters.view(-1, c, kernel, kernel)
    return torch.cat([filters, -filters]).float()
