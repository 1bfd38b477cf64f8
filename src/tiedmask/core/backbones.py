"""Backbones: stem -> stages of (injection, runner of one cell) -> head.

Each stage runs its cell `depth` times through a runner (`tiedmask.core.execution`: tied
unrolled, untied, or to its fixed point) and hands its output on. Only the cells are masked:
stems, downsampling convolutions and heads stay dense, as in arXiv 2307.08013.

A backbone is built from its own section of the settings (`Backbone.Settings`: the fields of
the config's model section it builds from, and no other) and the `DataShape` of its input;
presets (`tiedmask.core.presets`) choose the backbone and spell out its numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .cells import CELLS, batch_norm_if_auto, make_norm
from .deq import Equilibrium
from .execution import Runner, Unrolled, Untied
from .layers import masked_layers, masked_weights_built_once
from .masks import num_masks
from .spec import DataShape, DeqConfig, MaskConfig, ModelConfig
from .whitening import WHITEN_KERNEL, whitening_filters


@dataclasses.dataclass(frozen=True, kw_only=True)
class Section:
    """A backbone's own settings: the fields of the config's model section it builds from.
    The config file keeps one flat model section (`ModelConfig`: what a user writes, what config
    hashes are taken of), and each backbone is built from its part of it only, so building and
    running it cannot read a setting it did not declare (`check`, before building, sees the
    whole section); `refuse_unread` refuses any other set away from its default."""

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Section":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopSettings(Section):
    """What every backbone of tiedmask's own reads: its cell, how it runs, its shape, masks."""

    name: str
    cell: str
    execution: str
    width: int
    depth: int
    stages: int
    norm: str
    checkpointing: bool
    weight_norm: str
    masks: MaskConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class EquilibriumSettings(LoopSettings):
    """... and, for a backbone whose stages can run to a fixed point, how they solve."""

    deq: DeqConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNetSettings(EquilibriumSettings):
    head_pool: int  # average-pool to a head_pool x head_pool grid before the head


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTSettings(EquilibriumSettings):
    patch_size: int  # patch embedding stride
    heads: int  # attention heads
    mlp_ratio: float  # MLP hidden width / width


def refuse_unread(backbone: type, cfg: ModelConfig) -> None:
    """Refuse a setting changed from its default that `backbone` never reads (`heads` on a
    ResNet, `deq` on a model that cannot run to a fixed point, `width` on a library model): it
    would be accepted and do nothing. Settings of one execution (`deq` under equilibrium,
    `checkpointing` outside it) pass under the other, so that a grid can cross executions."""
    reads = backbone.Settings.names()
    defaults = ModelConfig()
    for field in dataclasses.fields(ModelConfig):
        key = field.name
        if key in reads or getattr(cfg, key) == getattr(defaults, key):
            continue
        raise ConfigError(f"model.{key} is set, but {cfg.name} ({backbone.__name__}) never reads it, so it "
                          f"would do nothing; remove it (this model reads: {', '.join(sorted(reads))})")


def make_runner(make_cell: Callable[[], nn.Module], cfg: LoopSettings) -> Runner:
    """The way a stage runs its cell: unrolled `depth` times, untied (`depth` cells of their
    own), or to its fixed point; `make_cell()` builds one cell."""
    if cfg.execution == "untied":
        return Untied([make_cell() for _ in range(cfg.depth)], cfg.checkpointing)
    if cfg.execution == "equilibrium":
        return Equilibrium(make_cell(), cfg.masks.scope, cfg.deq)
    return Unrolled(make_cell(), cfg.depth, cfg.masks.scope, cfg.checkpointing)


def normalize_weights(module: nn.Module, kind: str) -> None:
    """Weight or spectral normalisation of the masked weights under `module` (a DEQ stabiliser)."""
    if kind == "none":
        return
    param = nn.utils.parametrizations
    for _, layer in masked_layers(module):
        (param.weight_norm if kind == "weight" else param.spectral_norm)(layer, "weight")


class Stage(nn.Module):
    """One runner; masks every weight once per forward pass where the runner allows it."""

    def __init__(self, make_cell: Callable[[], nn.Module], cfg: LoopSettings):
        super().__init__()
        # Named `tied` because mask seeds and checkpoint keys are derived from module paths.
        self.tied = make_runner(make_cell, cfg)
        normalize_weights(self.tied, cfg.weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        built_once = self.tied.builds_masked_weights_once
        with masked_weights_built_once(self.tied) if built_once else contextlib.nullcontext():
            return self.tied(x)


class Backbone(nn.Module):
    """What every backbone shares: masks from the config, runner losses, statistics, tracing.

    Subclasses set `cells` (the cell names they can run), `Settings` (their section of the
    model settings) and build `self.stages` from `self.config`, their section alone.
    """

    cells: tuple[str, ...] = ()
    Settings: type[Section] = EquilibriumSettings
    has_whitening_stem = False  # a stem whose filters are set from the data (`whitening_bias`)
    stages: nn.ModuleList

    def __init__(self, cfg: ModelConfig | Section, shape: DataShape):
        super().__init__()
        if isinstance(cfg, ModelConfig):  # checked with the data's shape, then only the section is kept
            self.check(cfg, shape)
            cfg = self.Settings.of(cfg)
        self.config, self.shape = cfg, shape

    @classmethod
    def check(cls, cfg: ModelConfig, shape: DataShape | None) -> None:
        """Refuse settings this backbone cannot build, before anything is built (`shape`
        None: what does not depend on the data's shape)."""
        cfg.validate()
        refuse_unread(cls, cfg)
        if cfg.cell not in cls.cells:
            raise ConfigError(f"{cls.__name__} runs cells {list(cls.cells)}, not "
                              f"{cfg.cell!r}; choose one of those or another model")

    def make_cell(self, width: int) -> Callable[[], nn.Module]:
        """A function that builds one cell of `width` channels (for the stage's runner)."""
        cfg = self.config
        if cfg.cell not in CELLS:
            raise ConfigError(f"unknown cell {cfg.cell!r}; choose one of {sorted(CELLS)}")
        applications = 1 if cfg.execution == "untied" else cfg.depth  # untied cells run once each
        cell = CELLS[cfg.cell]
        own = {key: getattr(cfg, key) for key in cell.settings}  # a cell sees its own settings only
        return lambda: cell.create(width, applications, **own)

    def runners(self) -> list[Runner]:
        return [stage.tied for stage in self.stages]

    def rebuild_masks(self) -> None:
        """(Re)generate every mask from the config; they are never stored in checkpoints."""
        m = self.config.masks
        count = num_masks(m.scope, self.config.depth) if self.config.execution != "untied" else 0
        for name, layer in masked_layers(self):
            layer.build_masks(m.kind, count, m.density, m.seed, f"{name}.weight", nm_m=m.nm_m)

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation from normalised training images (default: none)."""

    def whitening_bias(self) -> nn.Parameter | None:
        """The trained bias of a stem whose filters are set from the data, or None (no such stem)."""
        return None

    def aux_loss(self) -> torch.Tensor | None:
        """The runners' regularisers of the last forward pass (DEQ Jacobian penalty), or None."""
        terms = [t for t in (r.aux_loss() for r in self.runners()) if t is not None]
        return sum(terms) if terms else None

    def pop_solver_stats(self) -> tuple[list, list]:
        """(forward, backward) SolverStats since the last call; empty for unrolled models."""
        forward, backward = [], []
        for runner in self.runners():
            f, b = runner.pop_stats()
            forward += f
            backward += b
        return forward, backward

    def set_deadline(self, deadline: float | None) -> None:
        """Iterative runners stop their solves at `deadline` (time.perf_counter(); None: never)."""
        for runner in self.runners():
            runner.deadline = deadline

    @contextlib.contextmanager
    def tracing(self):
        """Within the block, yields [stage][state] lists that every forward pass fills."""
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(r.tracing()) for r in self.runners()]


class TiedNet(Backbone):
    """stem -> [stage, downsample]* -> average pool to a small grid -> linear head.

    The head pools to a grid rather than globally: the cell ends in a GroupNorm, which sets
    each group's mean over space to zero per image, so a global average would discard most of
    what the features say (a width-8 model did not learn the digits at all). A 4x4 grid, as in
    the DEQ ResNet recipe, keeps where things are.
    """

    cells = ("resnet",)
    Settings = ResNetSettings

    def __init__(self, cfg: ModelConfig | ResNetSettings, shape: DataShape = DataShape()):
        super().__init__(cfg, shape)
        cfg = self.config
        widths = [cfg.width * 2**s for s in range(cfg.stages)]
        self.stem = nn.Sequential(
            nn.Conv2d(shape.channels, widths[0], 3, padding=1, bias=False),
            make_norm(cfg.norm, widths[0]),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList(Stage(self.make_cell(w), cfg) for w in widths)
        self.downsamples = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(w_in, w_out, 3, stride=2, padding=1, bias=False),
                make_norm(cfg.norm, w_out),
                nn.ReLU(inplace=True),
            )
            for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.pool = nn.AdaptiveAvgPool2d(cfg.head_pool)
        self.head = nn.Linear(widths[-1] * cfg.head_pool**2, shape.classes)
        self.rebuild_masks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s < len(self.downsamples):
                x = self.downsamples[s](x)
        return self.head(self.pool(x).flatten(1))


class TiedFastNet(Backbone):
    """whitening stem -> [conv, max-pool, BN, GELU, tied conv cell x depth]* -> max pool -> head.

    The layout of airbench's CIFAR-10 network with each block's second convolution replaced by
    one masked convolution applied `depth` times. Only the tied convolutions are masked. The
    whitening filters are set from the data (`init_from_data`) and frozen; their bias trains.
    """

    cells = ("conv",)
    Settings = LoopSettings  # never equilibrium (check)
    has_whitening_stem = True
    # Small logits keep high-lr SGD stable early; measured on a 10k-image CIFAR-10 subset, 2
    # epochs: scale 1 16%, 1/2 46%, 1/4 59%, 1/8 56%, 1/16 44% test accuracy.
    logit_scale = 1 / 4

    @classmethod
    def check(cls, cfg: ModelConfig, shape: DataShape | None) -> None:
        super().check(cfg, shape)
        if cfg.execution == "equilibrium":
            raise ConfigError("the conv cell keeps a BatchNorm per application, which has no fixed "
                              "point; use a tied-resnet model for equilibrium execution")

    def __init__(self, cfg: ModelConfig | LoopSettings, shape: DataShape = DataShape()):
        super().__init__(cfg, shape)
        cfg = self.config
        widths = [cfg.width * 2**s for s in range(cfg.stages)]
        whiten_width = 2 * shape.channels * WHITEN_KERNEL**2  # each eigen-filter and its negative
        self.whiten = nn.Conv2d(shape.channels, whiten_width, WHITEN_KERNEL)
        self.whiten.weight.requires_grad_(False)
        norm = batch_norm_if_auto(cfg.norm)
        self.entries = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w_in, w_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                          make_norm(norm, w_out), nn.GELU())
            for w_in, w_out in zip([whiten_width] + widths[:-1], widths)
        )
        self.stages = nn.ModuleList(Stage(self.make_cell(w), cfg) for w in widths)
        self.head = nn.Linear(widths[-1], shape.classes, bias=False)
        self.rebuild_masks()

    def init_from_data(self, images: torch.Tensor) -> None:
        with torch.no_grad():
            filters = whitening_filters(images.cpu(), WHITEN_KERNEL)
            self.whiten.weight.copy_(filters.to(self.whiten.weight.device))

    def whitening_bias(self) -> nn.Parameter:
        return self.whiten.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        for entry, stage in zip(self.entries, self.stages):
            x = stage(entry(x))
        # The max in fp32: exact either way (a max of bf16 values is one of them), and torch
        # 2.13's compiled CPU kernel for a bf16 amax gave non-finite gradients (results §9).
        return self.head(torch.amax(x.float(), dim=(2, 3))) * self.logit_scale


class TiedViT(Backbone):
    """patch embedding + positions -> one tied Transformer stage -> LayerNorm, mean pool, head."""

    cells = ("transformer",)
    Settings = ViTSettings

    @classmethod
    def check(cls, cfg: ModelConfig, shape: DataShape | None) -> None:
        super().check(cfg, shape)
        if cfg.stages != 1:
            raise ConfigError("the transformer cell runs one stage of tokens; set model.stages 1")
        if shape is not None and shape.size % cfg.patch_size:
            raise ConfigError(f"images of side {shape.size} do not split into patches of "
                              f"{cfg.patch_size}; choose a patch_size that divides it")
        if cfg.width % cfg.heads:
            raise ConfigError(f"width {cfg.width} is not divisible by heads {cfg.heads}; change one of them")

    def __init__(self, cfg: ModelConfig | ViTSettings, shape: DataShape = DataShape()):
        super().__init__(cfg, shape)
        cfg = self.config
        tokens = (shape.size // cfg.patch_size) ** 2
        self.embed = nn.Conv2d(shape.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, tokens, cfg.width) * 0.02)
        self.stages = nn.ModuleList([Stage(self.make_cell(cfg.width), cfg)])
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, shape.classes)
        self.rebuild_masks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        if tokens.shape[1] != self.pos.shape[1]:
            raise ConfigError(f"{tokens.shape[1]} tokens for {self.pos.shape[1]} positions: the "
                              f"model was built for images of side {self.shape.size}")
        z = self.stages[0](tokens + self.pos)
        return self.head(self.norm(z).mean(1))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
