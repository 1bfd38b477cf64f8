"""`untie(model)`: a tied model back to a plain one of the same classes, whose outputs equal it.

Position p becomes a copy of its shared block holding p's weights as p computes them (the shared
weight under p's mask, plus p's relaxation), p's norms and biases, and p's layer index. The way to
serve a tied model anywhere (Hugging Face `save_pretrained`, export, peft merging), at the
untied model's parameter count.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .tied_block import Application, PerApplicationModule, _require_position, tied_containers


def untie(model: nn.Module) -> nn.Module:
    """Replace every tied run of `model` by plain blocks (in place; returns `model`)."""
    for name, tied in reversed(tied_containers(model)):  # inner runs first, if runs nest
        items = [*tied.before, *(plain_block(a) for a in tied.applications), *tied.after]
        kind = getattr(tied, "container_type", nn.ModuleList)
        container = kind(*items) if issubclass(kind, nn.Sequential) else kind(items)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, container)
    if not tied_containers(model):
        vars(model).pop("save_pretrained", None)  # the refusal `tie` put there
    return model


@torch.no_grad()
def plain_block(application: Application) -> nn.Module:
    """A standalone copy of the shared block as `application`'s position computes it."""
    with application.entered() as block:
        values = {(path, attr): getattr(module, attr).detach().clone()
                  for path, module in block.named_modules()
                  for attr in getattr(module, "parametrizations", {})}
        plain = copy.deepcopy(block)  # with the position's layer index in place
    for path in {p for p, _ in values}:
        module = plain.get_submodule(path)
        trainable = {a: chain.original.requires_grad for a, chain in module.parametrizations.items()}
        # By hand, not remove_parametrizations: a deep copy shares the parametrized class with the
        # tied block, and removing would delete the tied block's properties from that class too.
        module.__class__ = type(module).__bases__[0]
        del module._modules["parametrizations"]
        for attr, grad in trainable.items():
            module._parameters[attr] = nn.Parameter(values[path, attr], requires_grad=grad)
    for path, module in list(plain.named_modules()):
        if isinstance(module, PerApplicationModule):
            parent, _, attr = path.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, attr, module.copies[application.index])
    vars(plain).pop("_tiedmask_state", None)
    replay = vars(plain).get("_gradient_checkpointing_func")
    if hasattr(replay, "tiedmask_original"):  # copied while the position was entered
        plain._gradient_checkpointing_func = replay.tiedmask_original
    for key, hook in list(plain._forward_pre_hooks.items()):
        if hook is _require_position:
            del plain._forward_pre_hooks[key]
    return plain
