"""A model setting that the chosen backbone never reads is refused, not accepted to do nothing.

The reference is independent of the declared sections (`Backbone.Settings`): the fields a
backbone's code actually touches while it builds and runs a model, recorded through a proxy of
its section (a field outside the section raises there: a backbone cannot read one undeclared).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tiedmask.core.presets import MODEL_PRESETS, resolve_model
from tiedmask.core.spec import DataShape, ModelConfig
from tiedmask.errors import ConfigError

SHAPE = DataShape(channels=3, size=32, classes=4)
FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


class Recording:
    """A stand-in for a backbone's section that records which fields are read."""

    def __init__(self, cfg):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        if name in FIELDS:
            self.read.add(name)
        return getattr(self._cfg, name)


def fields_read(values: dict) -> tuple[set[str], frozenset[str]]:
    """(fields the backbone's code reads building the model and running it, fields it declares)."""
    found = resolve_model(values)
    recording = Recording(found.settings)
    model = found.backbone(recording, SHAPE)
    model(torch.randn(2, SHAPE.channels, SHAPE.size, SHAPE.size))
    return recording.read - {"name"}, found.backbone.Settings.names() - {"name"}


BUILT_IN = [(name, {}) for name in MODEL_PRESETS] + [
    ("tied-resnet-xs", {"execution": "equilibrium", "masks": {"scope": "same"}}),
    ("tied-resnet-xs", {"execution": "untied", "masks": {"scope": "dense"}}),
]


@pytest.mark.parametrize("name, settings", BUILT_IN, ids=lambda v: str(v))
def test_declared_settings_are_the_ones_the_code_reads(name, settings):
    read, declared = fields_read({"name": name, **settings})
    equilibrium = settings.get("execution") == "equilibrium"
    assert read <= declared, f"read but refused when set: {read - declared}"
    # settings of the other execution pass (a grid may cross executions); `cell`, and a ViT's
    # `stages` (one), are checked only (`Backbone.check`, before building)
    checked_only = {"cell"} | ({"stages"} if name == "tied-vit-s" else set())
    assert declared - read <= ({"checkpointing"} if equilibrium else {"deq"}) | checked_only, declared - read


def test_library_model_reads_only_its_own_settings():
    pytest.importorskip("transformers")
    values = {"name": "hf:vit", "args": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "intermediate_size": 16, "patch_size": 4}}
    read, declared = fields_read(values)
    assert read <= declared and declared - read <= {"cell"}


@pytest.mark.parametrize("name, key, value", [
    ("tied-resnet-xs", "heads", 8), ("tied-resnet-xs", "patch_size", 2), ("tied-vit-s", "head_pool", 2),
    ("tied-fast", "head_pool", 2), ("tied-resnet-xs", "tie", {"relax": "lora"}), ("tied-resnet-xs", "args", {"a": 1}),
    ("tied-fast", "deq", {"solver": "broyden"}), ("hf:vit", "width", 8), ("hf:vit", "checkpointing", True),
    ("hf:vit", "deq", {"tol": 0.1}),
])
def test_a_setting_the_model_never_reads_is_refused(name, key, value):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        resolve_model({"name": name, key: value})


def test_a_setting_left_at_its_default_is_accepted_on_every_model():
    """Stored configs spell every field; a field at its default is no request."""
    defaults = dataclasses.asdict(ModelConfig())
    for name in MODEL_PRESETS:
        spec = resolve_model({"name": name})
        unread = {k: v for k, v in defaults.items() if k not in spec.backbone.Settings.names()}
        resolve_model({"name": name, **unread})


def test_a_backbone_built_by_hand_from_a_whole_config_is_checked_and_keeps_its_section_only():
    """Building a backbone class directly (not through a preset) still refuses a bad config and
    a setting it never reads, and the model holds its own section, not the whole config."""
    from tiedmask.core.backbones import ResNetSettings, TiedNet
    from tiedmask.core.spec import MaskConfig

    with pytest.raises(ConfigError, match="density"):
        TiedNet(ModelConfig(width=8, masks=MaskConfig(density=2.0)), SHAPE)
    with pytest.raises(ConfigError, match="model.heads"):
        TiedNet(ModelConfig(width=8, heads=8), SHAPE)
    model = TiedNet(ModelConfig(width=8, depth=2), SHAPE)
    assert type(model.config) is ResNetSettings and not hasattr(model.config, "heads")
