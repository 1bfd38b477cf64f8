"""A model setting that the chosen backbone never reads is refused, not accepted to do nothing.

The reference is independent of the declared lists (`Backbone.reads`): the fields a backbone's
code actually touches while it builds and runs a model, recorded through a proxy config.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tiedmask.core import backbones, external
from tiedmask.core.presets import MODEL_PRESETS, resolve_model
from tiedmask.core.spec import DataShape, ModelConfig
from tiedmask.errors import ConfigError

SHAPE = DataShape(channels=3, size=32, classes=4)
FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


class Recording:
    """A ModelConfig stand-in that records which fields are read."""

    def __init__(self, cfg: ModelConfig):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        if name in FIELDS:
            self.read.add(name)
        return getattr(self._cfg, name)


def fields_read(values: dict, monkeypatch) -> tuple[set[str], frozenset[str]]:
    """(fields the backbone's code reads building the model and running it, fields it declares)."""
    found = resolve_model(values)
    # validation and the refusal itself look at every field; what the model is built from is the question
    monkeypatch.setattr(ModelConfig, "validate", lambda self: None)
    monkeypatch.setattr(backbones, "refuse_unread", lambda backbone, cfg: None)
    monkeypatch.setattr(external, "refuse_unread", lambda backbone, cfg: None)
    recording = Recording(found.config)
    model = found.backbone(recording, SHAPE)
    model(torch.randn(2, SHAPE.channels, SHAPE.size, SHAPE.size))
    return recording.read - {"name"}, found.backbone.reads - {"name"}


BUILT_IN = [(name, {}) for name in MODEL_PRESETS] + [
    ("tied-resnet-xs", {"execution": "equilibrium", "masks": {"scope": "same"}}),
    ("tied-resnet-xs", {"execution": "untied", "masks": {"scope": "dense"}}),
]


@pytest.mark.parametrize("name, settings", BUILT_IN, ids=lambda v: str(v))
def test_declared_settings_are_the_ones_the_code_reads(name, settings, monkeypatch):
    read, declared = fields_read({"name": name, **settings}, monkeypatch)
    equilibrium = settings.get("execution") == "equilibrium"
    assert read <= declared, f"read but refused when set: {read - declared}"
    # settings of the other execution pass (a grid may cross executions), and `cell` is checked only
    assert declared - read <= ({"checkpointing"} if equilibrium else {"deq"}) | {"cell"}, declared - read


def test_library_model_reads_only_its_own_settings(monkeypatch):
    pytest.importorskip("transformers")
    values = {"name": "hf:vit", "args": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "intermediate_size": 16, "patch_size": 4}}
    read, declared = fields_read(values, monkeypatch)
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
        unread = {k: v for k, v in defaults.items() if k not in spec.backbone.reads}
        resolve_model({"name": name, **unread})
