"""Model presets: functions that build a model with every number spelled out (timm's
`@register_model`, torchtune's model builders). The preset, not a config field, picks the
backbone; the caller's settings go on top of the preset's.

>>> model = create_model("tied-resnet-xs", shape=DataShape(channels=1, size=8), masks={"scope": "multi"})
>>> import torch
>>> model(torch.randn(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..errors import ConfigError
from ..typed import from_dict
from .backbones import Backbone, TiedFastNet, TiedNet, TiedViT
from .external import ExternalNet
from .spec import DataShape, ModelConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a preset returns: the backbone class and its checked settings (the config's model
    section, and `settings`: the backbone's own part of it). Resolving a config (every grid
    point of a sweep) stops here; only `build` builds (masks, initialisation: 0.1-0.5 s a model)."""

    backbone: type[Backbone]
    config: ModelConfig

    @property
    def settings(self):
        """The backbone's own section (`Backbone.Settings`), all it is built from."""
        return self.backbone.Settings.of(self.config)

    def build(self, shape: DataShape = DataShape()) -> Backbone:
        return self.backbone(self.config, shape)  # checked again, now with the data's shape


MODEL_PRESETS: dict[str, Callable[..., ModelSpec]] = {}


def register_model(fn: Callable[..., ModelSpec]) -> Callable[..., ModelSpec]:
    """Register a preset ``fn(**settings) -> ModelSpec`` under its name (``_`` -> ``-``)."""
    MODEL_PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


def spec(backbone: type[Backbone], settings: dict, **preset) -> ModelSpec:
    """`backbone` with the preset's numbers and the caller's `settings` on top (sections merge
    key by key), checked as far as it can be before the data's shape is known."""
    values = dict(preset)
    for key, value in settings.items():
        both_dicts = isinstance(value, dict) and isinstance(values.get(key), dict)
        values[key] = {**values[key], **value} if both_dicts else value
    cfg = from_dict(ModelConfig, values, "model.")
    backbone.check(cfg, None)  # what depends on the data's shape is checked at build
    return ModelSpec(backbone, cfg)


@register_model
def tied_resnet_xs(**settings) -> ModelSpec:
    """One stage, width 32, depth 4: small inputs such as 8x8 digits (the demo)."""
    return spec(TiedNet, settings, name="tied-resnet-xs", cell="resnet", width=32, depth=4, stages=1)


@register_model
def tied_resnet_s(**settings) -> ModelSpec:
    """Two stages of width 32/64, depth 4: CIFAR-scale benchmarks on a CPU."""
    return spec(TiedNet, settings, name="tied-resnet-s", cell="resnet", width=32, depth=4, stages=2)


@register_model
def tied_resnet_deep(**settings) -> ModelSpec:
    """Deep and narrow: two stages of width 24/48, depth 8, where tied weights show their limit."""
    return spec(TiedNet, settings, name="tied-resnet-deep", cell="resnet", width=24, depth=8, stages=2)


@register_model
def tied_resnet_m(**settings) -> ModelSpec:
    """Two stages of width 64/128, depth 4: closer to the paper's CIFAR-10 setting."""
    return spec(TiedNet, settings, name="tied-resnet-m", cell="resnet", width=64, depth=4, stages=2)


@register_model
def tied_vit_s(**settings) -> ModelSpec:
    """Transformer-like: patch 4, width 96, 4 heads, one tied block applied 6 times."""
    return spec(TiedViT, settings, name="tied-vit-s", cell="transformer", width=96, depth=6,
                stages=1, heads=4, patch_size=4, mlp_ratio=2.0, norm="auto")


@register_model
def tied_fast(**settings) -> ModelSpec:
    """airbench-style (whitened stem, conv-pool-BN-GELU stages, max-pooled head) with one
    masked conv per stage applied twice; widths 56/112/224, 0.89M parameters: `--recipe cifar10-fast`."""
    return spec(TiedFastNet, settings, name="tied-fast", cell="conv", width=56, depth=2, stages=3,
                masks={"density": 0.5})


def resolve_model(values: dict) -> ModelSpec:
    """The spec of what `values` (a config's model section, in today's keys) asks for: every
    number as its preset fills them in, checked, nothing built."""
    values = dict(values)
    name = values.pop("name", ModelConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"model.name is {name!r}; it must be a preset name (`tiedmask models` lists them), "
                          "timm:NAME or hf:TYPE")
    if ":" in name:  # timm:NAME, hf:TYPE
        return spec(ExternalNet, values, name=name)
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {name!r}; `tiedmask models` lists: {sorted(MODEL_PRESETS)}")
    found = MODEL_PRESETS[name](**values)
    if not isinstance(found, ModelSpec):
        raise ConfigError(f"model preset {name!r} returned {type(found).__name__}, not a ModelSpec; "
                          "a registered preset must return spec(...)")
    # the config records the preset it came from, so that resume and eval rebuild through it
    return dataclasses.replace(found, config=dataclasses.replace(found.config, name=name))


def create_model(name: str = ModelConfig.name, shape: DataShape = DataShape(), **settings) -> Backbone:
    """A model from a preset name plus settings in today's keys, by section as in a config's
    model (old spellings are read where files and arguments are, `training.migrate`).

    >>> create_model("tied-resnet-s", width=16, masks={"scope": "same"}).config.masks.scope
    'same'
    """
    return resolve_model({"name": name, **settings}).build(shape)


def build_model(cfg: ModelConfig, shape: DataShape = DataShape()) -> Backbone:
    """The model a resolved config describes (its preset, every number as in `cfg`)."""
    return create_model(**dataclasses.asdict(cfg), shape=shape)
