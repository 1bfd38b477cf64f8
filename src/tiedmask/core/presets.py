"""Model presets: functions that build a model with every number spelled out (timm's
`@register_model`, torchtune's model builders). The preset, not a config field, picks the
backbone; the caller's settings go on top of the preset's.

>>> model = create_model("tied-resnet-xs", shape=DataShape(channels=1, size=8), masks={"scope": "multi"})
>>> import torch
>>> model(torch.randn(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Callable


from ..errors import ConfigError
from ..typed import from_dict
from .backbones import Backbone, TiedFastNet, TiedNet, TiedViT
from .external import ExternalNet
from .spec import DataShape, ModelConfig

MODEL_PRESETS: dict[str, Callable[..., Backbone]] = {}


def register_model(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    """Register a preset ``fn(shape, **settings) -> Backbone`` under its name (``_`` -> ``-``)."""
    MODEL_PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


# Set by `resolve_model`: `build` then records its backbone class here instead of building
_resolving: contextvars.ContextVar[list[type[Backbone]] | None] = contextvars.ContextVar(
    "resolving", default=None)


def build(backbone: type[Backbone], shape: DataShape, settings: dict, **preset) -> Backbone:
    """`backbone` for `shape` from the preset's numbers with the caller's `settings` on top.

    Under `resolve_model` it returns the checked config, and records `backbone`, instead of
    building: a sweep resolves every grid point, and building (masks, initialisation) would cost
    0.1-0.5 s each.
    """
    values = dict(preset)
    for key, value in settings.items():  # sections merge key by key
        both_dicts = isinstance(value, dict) and isinstance(values.get(key), dict)
        values[key] = {**values[key], **value} if both_dicts else value
    cfg = from_dict(ModelConfig, values, "model.")
    resolving = _resolving.get()
    if resolving is not None:
        backbone.check(cfg, None)  # the data's shape is not known yet: checked at build
        resolving.append(backbone)
        return cfg
    return backbone(cfg, shape)


@register_model
def tied_resnet_xs(shape: DataShape = DataShape(), **settings) -> Backbone:
    """One stage, width 32, depth 4: small inputs such as 8x8 digits (the demo)."""
    return build(TiedNet, shape, settings, name="tied-resnet-xs", cell="resnet", width=32, depth=4, stages=1)


@register_model
def tied_resnet_s(shape: DataShape = DataShape(), **settings) -> Backbone:
    """Two stages of width 32/64, depth 4: CIFAR-scale benchmarks on a CPU."""
    return build(TiedNet, shape, settings, name="tied-resnet-s", cell="resnet", width=32, depth=4, stages=2)


@register_model
def tied_resnet_deep(shape: DataShape = DataShape(), **settings) -> Backbone:
    """Deep and narrow: two stages of width 24/48, depth 8, where tied weights show their limit."""
    return build(TiedNet, shape, settings, name="tied-resnet-deep", cell="resnet", width=24, depth=8,
                 stages=2)


@register_model
def tied_resnet_m(shape: DataShape = DataShape(), **settings) -> Backbone:
    """Two stages of width 64/128, depth 4: closer to the paper's CIFAR-10 setting."""
    return build(TiedNet, shape, settings, name="tied-resnet-m", cell="resnet", width=64, depth=4, stages=2)


@register_model
def tied_vit_s(shape: DataShape = DataShape(), **settings) -> Backbone:
    """Transformer-like: patch 4, width 96, 4 heads, one tied block applied 6 times."""
    return build(TiedViT, shape, settings, name="tied-vit-s", cell="transformer", width=96, depth=6,
                 stages=1, heads=4, patch_size=4, mlp_ratio=2.0, norm="auto")


@register_model
def tied_fast(shape: DataShape = DataShape(), **settings) -> Backbone:
    """airbench-style (whitened stem, conv-pool-BN-GELU stages, max-pooled head) with one
    masked conv per stage applied twice; widths 56/112/224, 0.89M parameters: `--recipe cifar10-fast`."""
    return build(TiedFastNet, shape, settings, name="tied-fast", cell="conv", width=56, depth=2, stages=3,
                 masks={"density": 0.5})


def create_model(name: str = ModelConfig.name, shape: DataShape = DataShape(), **settings) -> Backbone:
    """A model from a preset name plus settings in today's keys, by section as in a config's
    model (old spellings are read where files and arguments are, `training.migrate`).

    >>> create_model("tied-resnet-s", width=16, masks={"scope": "same"}).config.masks.scope
    'same'
    """
    if ":" in name:  # timm:NAME, hf:TYPE
        return build(ExternalNet, shape, settings, name=name)
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {name!r}; `tiedmask models` lists: {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name](shape, **settings)


def build_model(cfg: ModelConfig, shape: DataShape = DataShape()) -> Backbone:
    """The model a resolved config describes (its preset, every number as in `cfg`)."""
    values = dataclasses.asdict(cfg)
    return create_model(values.pop("name"), shape, **values)


def resolve_model(values: dict) -> tuple[ModelConfig, type[Backbone]]:
    """Every number of the model that `values` (a config's model section) asks for, as its
    preset fills them in, checked as the backbone checks them, and the backbone class that
    would build it, without building the model."""
    values = dict(values)
    name = values.pop("name", ModelConfig.name)
    backbones: list[type[Backbone]] = []
    token = _resolving.set(backbones)
    try:
        cfg = create_model(name, **values)
    finally:
        _resolving.reset(token)
    if not backbones:
        raise ConfigError(f"model preset {name!r} builds its model without `build`; a registered "
                          "preset must return build(...)")
    return cfg, backbones[0]
