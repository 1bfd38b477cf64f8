"""Multiply-accumulate counts of a model, dense and as the masks make them.

Counted by forward hooks on every Conv2d and Linear (the layers that carry the cost); a masked
layer's effective count is scaled by the density of the mask it used at that call.

>>> from tiedmask.core.presets import DataShape, create_model
>>> macs = count_macs(create_model("tied-resnet-xs", DataShape(channels=1, size=8)), (1, 8, 8))
>>> macs["effective"] < macs["dense"]
True
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .cells import Cell
from .layers import MaskedWeight
from .tied_block import shared_weight


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs for one image of `input_shape` (C, H, W): {"dense": ..., "effective": ...}."""
    totals = {"dense": 0.0, "effective": 0.0}

    def hook(module, args, output):
        per_output = module.weight[0].numel()  # in/groups * kh * kw, or in_features
        dense = output[0].numel() * per_output
        density = 1.0
        if isinstance(module, MaskedWeight):
            density = module.mask_density(args[1] if len(args) > 1 else None)
        elif (tied := shared_weight(module)) is not None:  # a block tied by `tiedmask.core.tie`
            density = tied.density()
        totals["dense"] += dense
        totals["effective"] += dense * density

    def extra(module, args, output):  # products no Conv/Linear carries (attention)
        macs = module.extra_macs(output.shape)
        totals["dense"] += macs
        totals["effective"] += macs

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles += [m.register_forward_hook(extra) for m in model.modules() if isinstance(m, Cell)]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    except RuntimeError as exc:  # e.g. more downsampling stages than the image has pixels for
        reason = str(exc).strip().splitlines()[-1][:160]
        raise ConfigError(f"the model cannot run on inputs of shape {tuple(input_shape)} ({reason}); use larger "
                          "images (--data.image_size) or fewer downsampling stages (--model.stages)") from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {k: int(round(v)) for k, v in totals.items()}
