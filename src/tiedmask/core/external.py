"""Models of other libraries by name, trained, benchmarked and swept like the presets:

    timm:NAME       timm.create_model(NAME, pretrained=False, num_classes, in_chans[, img_size], **args)
    hf:MODEL_TYPE   a Hugging Face image classifier built from its config (no download):
                    AutoConfig.for_model(MODEL_TYPE, num_channels, num_labels, image_size, **args)

`model.execution` untied keeps the library's network as it is; unrolled ties its repeated
blocks with `tiedmask.core.tie` under `model.masks` and `model.tie`, so the untied network and
its tied versions are compared with one bench or sweep. timm and transformers are extras
(``pip install 'tiedmask[timm]'`` / ``'tiedmask[hf]'``).

Note: timm imports torchvision, whose wheels on PyPI are CUDA builds; with a CPU-only torch
they fail to load. Install torchvision from the CPU index that matches your torch.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from ..errors import ConfigError
from .backbones import Backbone, Section, refuse_unread
from .spec import DataShape, MaskConfig, ModelConfig, TieConfig
from .tie import select_blocks, tie_with
from .tied_block import tied_containers

LIBRARIES = ("timm", "hf")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LibrarySettings(Section):
    """What a library model reads: which model, tied or not, and how it is tied and masked."""

    name: str  # timm:NAME or hf:TYPE
    execution: str
    masks: MaskConfig
    args: dict  # keyword arguments of the library's model builder
    tie: TieConfig


class ExternalNet(Backbone):
    """A timm or Hugging Face network, tied unless the execution is untied; returns logits."""

    Settings = LibrarySettings

    def __init__(self, cfg: ModelConfig | LibrarySettings, shape: DataShape = DataShape()):
        super().__init__(cfg, shape)
        cfg = self.config
        self.net = build_external(cfg.name, shape, cfg.args)
        if cfg.execution == "unrolled":
            tie_with(self.net, cfg.masks, cfg.tie)
        self.stages = nn.ModuleList()  # no runners of tiedmask's own (no solver stats); `tracing` hooks its blocks

    @classmethod
    def check(cls, cfg: ModelConfig, shape: DataShape | None) -> None:
        cfg.validate()
        refuse_unread(cls, cfg)
        library = cfg.name.partition(":")[0]
        if library not in LIBRARIES:
            raise ConfigError(f"model {cfg.name!r}: unknown library {library!r}; use timm:NAME or hf:TYPE")
        if cfg.execution == "equilibrium":
            raise ConfigError(f"{cfg.name} runs unrolled (tied) or untied; equilibrium execution needs "
                              "one of tiedmask's cells")

    def rebuild_masks(self) -> None:
        """The tie's masks are made when it ties (from the seed), never stored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return getattr(out, "logits", out)

    def traced_blocks(self) -> list[list[nn.Module]]:
        """Per run of blocks, the modules whose outputs are its states: each tied run's
        positions, or, untied, the blocks `tie` would tie with these settings (so CKA compares
        the same positions either way)."""
        tied = tied_containers(self.net)
        if tied:
            return [list(container.applications) for _, container in tied]
        _, container, start, stop = select_blocks(self.net, self.config.tie.blocks)
        return [list(container)[start:stop]]

    @contextlib.contextmanager
    def tracing(self):
        """Within the block, yields [run][position] lists of block outputs that every forward
        pass fills (the first tensor of a block that returns a tuple, as Hugging Face's do)."""
        traces = []
        with contextlib.ExitStack() as stack:
            for blocks in self.traced_blocks():
                trace: list[torch.Tensor] = []
                traces.append(trace)
                for block in blocks:
                    handle = block.register_forward_hook(lambda module, args, out, trace=trace: trace.append(
                        (out[0] if isinstance(out, (tuple, list)) else out).detach()))
                    stack.callback(handle.remove)
            yield traces


def build_external(name: str, shape: DataShape, args: dict) -> nn.Module:
    library, _, model = name.partition(":")
    if library == "timm":
        return _timm_model(model, shape, args)
    return _hf_model(model, shape, args)


def _timm_model(name: str, shape: DataShape, args: dict) -> nn.Module:
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision built for another torch
        raise ConfigError(f"timm is not usable here ({type(exc).__name__}: {exc}); "
                          "pip install 'tiedmask[timm]' with a torchvision matching your torch") from None
    if name not in timm.list_models():
        raise ConfigError(f"timm has no model {name!r}; `python -c \"import timm; print(timm.list_models('vit*'))\"`")
    settings = {"pretrained": False, "num_classes": shape.classes, "in_chans": shape.channels, **args}
    try:
        return timm.create_model(name, img_size=shape.size, **settings)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise ConfigError(f"timm model {name}: {exc}; check model.args") from None
        return timm.create_model(name, **settings)  # convolutional networks take any size


def _hf_model(model_type: str, shape: DataShape, args: dict) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face models need transformers: pip install 'tiedmask[hf]'") from None
    try:
        config = transformers.AutoConfig.for_model(model_type, num_channels=shape.channels,
                                                   num_labels=shape.classes, image_size=shape.size, **args)
        return transformers.AutoModelForImageClassification.from_config(config)
    except TypeError as exc:  # e.g. an argument given twice (num_labels is set by the data)
        raise ConfigError(f"hf:{model_type}: {exc}; check model.args") from None
    except ValueError as exc:  # an unknown model type, or one with no image classifier
        unknown = "Unrecognized model identifier" in str(exc)
        problem = " is not a model type of transformers" if unknown else f": {str(exc).splitlines()[0][:160]}"
        raise ConfigError(f"hf:{model_type}{problem}; image classifiers include hf:vit, hf:deit, "
                          "hf:resnet, hf:convnext, hf:swin") from None
    except Exception as exc:  # transformers' own validation errors (strict config dataclasses)
        if type(exc).__module__.split(".")[0] not in ("transformers", "huggingface_hub"):
            raise
        first = " ".join(str(exc).split())[:200]
        raise ConfigError(f"hf:{model_type}: {first}; check model.args") from None
