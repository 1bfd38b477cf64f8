"""2:4 semi-structured sparse inference for the masked Linear layers of a trained model.

A model trained with 2:4 masks (``masks: {kind: nm, nm_m: 4, density: 0.5}``) keeps two of
every four weights along each row, which is the pattern that NVIDIA's sparse tensor cores
(Ampere and newer) execute at up to twice the dense matmul rate. `to_semi_structured` replaces
each masked Linear (the Transformer cell's qkv, proj, fc1 and fc2) by compressed weights, one per
mask, with `torch.sparse.to_sparse_semi_structured`. Inference only: the compressed weights are
frozen copies. Convolutions stay dense (no semi-structured conv kernels in PyTorch).

CPU machines can call `semi_structured_problems` (what would stop a conversion) but never
convert: `to_semi_structured` says why and leaves the model untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .backbones import Backbone
from .layers import MaskedLinear

# bf16/fp16 kernels: the weight's rows must be a multiple of 32 and its columns of 64.
MIN_ROWS, MIN_COLS = 32, 64


def semi_structured_problems(model: nn.Module) -> list[str]:
    """Why `model` cannot run 2:4 sparse (empty when it can, given a suitable GPU)."""
    masks = model.config.masks if isinstance(model, Backbone) else None
    problems = []
    if masks is None or (masks.kind, masks.nm_m, masks.density) != ("nm", 4, 0.5):
        problems.append("the model must be trained with 2:4 masks: --masks.kind nm "
                        "--masks.nm_m 4 --masks.density 0.5")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedLinear)]
    if not linears:
        problems.append("the model has no masked Linear layers (2:4 kernels are matmuls; use the "
                        "transformer cell)")
    for name, layer in linears:
        rows, cols = layer.weight.shape
        if rows % MIN_ROWS or cols % MIN_COLS:
            problems.append(f"{name}: weight {rows}x{cols} must be a multiple of "
                            f"{MIN_ROWS}x{MIN_COLS}; choose a width that is a multiple of 64")
    return problems


def gpu_problem(device: torch.device) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return "2:4 sparse kernels need an NVIDIA GPU (CUDA); this model is on " + str(device)
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "2:4 sparse kernels need an Ampere or newer GPU (compute capability >= 8.0)"
    return None


class SemiStructuredLinear(nn.Module):
    """A frozen MaskedLinear whose masked weights are stored 2:4-compressed, one per mask."""

    def __init__(self, layer: MaskedLinear, dtype: torch.dtype):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        stack = layer.mask_stack()
        weights = [layer.weight.detach() * m for m in stack] if stack is not None else [layer.weight.detach()]
        self.weights = [to_sparse_semi_structured(w.to(dtype).contiguous()) for w in weights]
        self.bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        self.out_features = layer.out_features

    def forward(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        weight = self.weights[0 if index is None else index]
        flat = x.reshape(-1, x.shape[-1])
        return F.linear(flat, weight, self.bias).view(*x.shape[:-1], self.out_features)


def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Convert `model` (on a CUDA device, in eval mode) in place; raise ConfigError if it cannot."""
    device = next(model.parameters()).device
    problems = semi_structured_problems(model)
    gpu = gpu_problem(device)
    if gpu:
        problems.insert(0, gpu)
    if problems:
        raise ConfigError("cannot run 2:4 sparse: " + "; ".join(problems))
    model.eval().to(dtype)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedLinear)]:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                SemiStructuredLinear(layer, dtype))
    return model
