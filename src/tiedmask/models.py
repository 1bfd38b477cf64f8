"""Backbones: stem -> stages of (injection, tied cell) -> head; a registry of named presets.

Each stage runs its own cell `depth` times (weight-tied) and hands its output to a strided
convolution that doubles the width for the next stage. Only the tied cells are masked: the
stem, the downsampling convolutions and the head stay dense, as in arXiv 2307.08013.

>>> model = create_model("tied-resnet-xs", in_channels=1, mask_scope="multi")
>>> model(torch.randn(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cells import CELLS, batch_norm_if_auto, make_norm
from .errors import ConfigError
from .layers import masked_layers, masked_weights_built_once
from .masks import check_mask_settings, num_masks
from .deq import Equilibrium
from .deq.equilibrium import NO_MULTI_MASK_FIXED_POINT
from .deq.solvers import SOLVERS
from .unrolled import Unrolled, Untied
from .whitening import WHITEN_KERNEL, whitening_filters

EXECUTIONS = ("unrolled", "equilibrium", "untied")
WEIGHT_NORMS = ("none", "weight", "spectral")


@dataclass
class ModelConfig:
    """Everything that defines a model; `name` picks a preset whose values fill the defaults."""

    name: str = "tied-resnet-s"
    cell: str = "resnet"  # resnet | conv | transformer
    execution: str = "unrolled"
    width: int = 32  # channels of the first stage; each later stage doubles it
    depth: int = 4  # applications of the tied cell per stage
    stages: int = 2
    norm: str = "auto"  # auto: group for resnet, batch for conv, layer for transformer
    mask_kind: str = "unstructured"
    mask_scope: str = "multi"  # dense | same | multi
    density: float = 0.5  # kept share of each masked weight
    mask_seed: int = 0
    nm_m: int = 4  # M of N:M masks; N = density * M
    checkpointing: bool = False
    head_pool: int = 4  # resnet: average-pool to a head_pool x head_pool grid before the head
    patch_size: int = 4  # transformer: patch embedding stride
    heads: int = 4  # transformer: attention heads
    mlp_ratio: float = 2.0  # transformer: MLP hidden width / width
    image_size: int = 32  # transformer: input side (sets the number of tokens)
    weight_norm: str = "none"  # none | weight | spectral, on the tied cell's weights
    # Equilibrium (DEQ) execution; ignored when execution is unrolled.
    deq_solver: str = "anderson"  # fixed_point | anderson | broyden
    deq_grad: str = "implicit"  # implicit | phantom
    deq_train_iter: int = 20  # forward solver iterations while training
    deq_eval_iter: int = 30  # ... while evaluating
    deq_backward_iter: int = 20  # adjoint solver iterations (implicit gradient)
    deq_tol: float = 1e-3
    deq_stop_mode: str = "rel"  # rel | abs residual
    deq_anderson_m: int = 5
    deq_anderson_lam: float = 1e-4
    deq_anderson_beta: float = 1.0
    deq_damping: float = 1.0  # fixed_point: z <- (1 - d) z + d f(z)
    deq_phantom_steps: int = 5
    deq_phantom_tau: float = 0.5
    deq_jac_reg: float = 0.0  # weight of the Jacobian (Frobenius) regulariser
    in_channels: int = 3
    num_classes: int = 10


MODEL_PRESETS: dict[str, Callable[[], dict]] = {}


def register_model(fn: Callable[[], dict]) -> Callable[[], dict]:
    """Register a preset: a function named like the preset (``_`` for ``-``) returning overrides."""
    MODEL_PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


@register_model
def tied_resnet_xs() -> dict:
    """One stage, width 32, depth 4: small inputs such as 8x8 digits (the demo)."""
    return dict(width=32, depth=4, stages=1)


@register_model
def tied_resnet_s() -> dict:
    """Two stages of width 32/64, depth 4: CIFAR-scale benchmarks on a CPU."""
    return dict(width=32, depth=4, stages=2)


@register_model
def tied_resnet_deep() -> dict:
    """Deep and narrow: two stages of width 24/48, depth 8, where tied weights show their limit."""
    return dict(width=24, depth=8, stages=2)


@register_model
def tied_vit_s() -> dict:
    """Transformer-like: patch 4, width 96, 4 heads, one tied block applied 6 times."""
    return dict(cell="transformer", width=96, depth=6, stages=1, heads=4, patch_size=4)


@register_model
def tied_fast() -> dict:
    """airbench-style (whitened stem, conv-pool-BN-GELU stages, max-pooled head) with one
    masked conv per stage applied twice; widths 56/112/224, 0.89M parameters: `--recipe cifar10-fast`."""
    return dict(cell="conv", width=56, depth=2, stages=3, density=0.5)


@register_model
def tied_resnet_m() -> dict:
    """Two stages of width 64/128, depth 4: closer to the paper's CIFAR-10 setting."""
    return dict(width=64, depth=4, stages=2)


def resolve_model_config(values: dict | None = None, **overrides) -> ModelConfig:
    """Preset defaults, then `values`, then `overrides`; unknown keys and presets are errors."""
    merged = {**(values or {}), **overrides}
    name = merged.get("name", ModelConfig.name)
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {name!r}; `tiedmask models` lists: {sorted(MODEL_PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown model key(s) {unknown}; valid keys: {sorted(known)}")
    cfg = ModelConfig(**{**MODEL_PRESETS[name](), **merged})
    validate_model_config(cfg)
    return cfg


def validate_model_config(cfg: ModelConfig) -> None:
    for key in ("width", "depth", "stages", "in_channels", "num_classes", "head_pool", "patch_size",
                "heads", "image_size"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.{key} must be an integer >= 1, got {value!r}")
    if cfg.cell not in CELLS:
        raise ConfigError(f"unknown cell {cfg.cell!r}; choose one of {sorted(CELLS)}")
    if cfg.execution not in EXECUTIONS:
        raise ConfigError(f"unknown execution {cfg.execution!r}; choose one of {list(EXECUTIONS)}")
    if cfg.cell == "transformer":
        if cfg.stages != 1:
            raise ConfigError("the transformer cell runs one stage of tokens; set model.stages 1")
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
    if cfg.weight_norm not in WEIGHT_NORMS:
        raise ConfigError(f"unknown weight_norm {cfg.weight_norm!r}; choose one of {list(WEIGHT_NORMS)}")
    if cfg.execution == "untied" and cfg.mask_scope != "dense":
        raise ConfigError("untied execution gives every application weights of its own, so there "
                          "is nothing to mask per application; use mask_scope dense")
    if cfg.execution == "equilibrium":
        if cfg.cell == "conv":
            raise ConfigError("the conv cell keeps a BatchNorm per application, which has no fixed "
                              "point; use --model.cell resnet for equilibrium execution")
        if cfg.deq_solver not in SOLVERS:
            raise ConfigError(f"unknown deq_solver {cfg.deq_solver!r}; choose one of {sorted(SOLVERS)}")
        if cfg.mask_scope == "multi":
            raise ConfigError(NO_MULTI_MASK_FIXED_POINT)
        for key in ("deq_train_iter", "deq_eval_iter", "deq_backward_iter", "deq_anderson_m"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(cfg, key)}")
    check_mask_settings(cfg.mask_kind, cfg.mask_scope, cfg.density)


def make_runner(make: Callable[[], nn.Module], cfg: ModelConfig) -> nn.Module:
    """The way a stage runs its cell: unrolled `depth` times, to its fixed point, or untied
    (`depth` cells of their own); `make()` builds one cell."""
    if cfg.execution == "untied":
        return Untied([make() for _ in range(cfg.depth)], cfg.checkpointing)
    cell = make()
    if cfg.execution == "unrolled":
        return Unrolled(cell, cfg.depth, cfg.mask_scope, cfg.checkpointing)
    options = {
        "anderson": {"m": cfg.deq_anderson_m, "lam": cfg.deq_anderson_lam, "beta": cfg.deq_anderson_beta},
        "fixed_point": {"damping": cfg.deq_damping},
    }.get(cfg.deq_solver, {})
    return Equilibrium(cell, cfg.mask_scope, solver=cfg.deq_solver, grad=cfg.deq_grad,
                       train_max_iter=cfg.deq_train_iter, eval_max_iter=cfg.deq_eval_iter,
                       backward_max_iter=cfg.deq_backward_iter, tol=cfg.deq_tol,
                       stop_mode=cfg.deq_stop_mode, solver_options=options,
                       phantom_steps=cfg.deq_phantom_steps, phantom_tau=cfg.deq_phantom_tau,
                       jac_reg=cfg.deq_jac_reg)


def normalize_weights(cell: nn.Module, kind: str) -> None:
    """Weight or spectral normalisation of the cell's masked weights (a DEQ stabiliser)."""
    if kind == "none":
        return
    param = nn.utils.parametrizations
    for _, layer in masked_layers(cell):
        (param.weight_norm if kind == "weight" else param.spectral_norm)(layer, "weight")


class Stage(nn.Module):
    def __init__(self, make: Callable[[], nn.Module], cfg: ModelConfig):
        super().__init__()
        self.tied = make_runner(make, cfg)
        normalize_weights(self.tied, cfg.weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.tied, "checkpointing", False):
            # Recomputation in the backward pass must save exactly what the forward pass saved,
            # so each application masks its own weight.
            return self.tied(x)
        with masked_weights_built_once(self.tied):
            return self.tied(x)


class Backbone(nn.Module):
    """What every tied backbone shares: masks from the config, DEQ losses and statistics."""

    config: ModelConfig
    stages: nn.ModuleList

    def rebuild_masks(self) -> None:
        """(Re)generate every mask from the config; they are never stored in checkpoints."""
        cfg = self.config
        count = num_masks(cfg.mask_scope, cfg.depth)
        for name, layer in masked_layers(self):
            layer.build_masks(
                cfg.mask_kind, count, cfg.density, cfg.mask_seed, f"{name}.weight", nm_m=cfg.nm_m
            )

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation from normalised training images (default: none)."""

    def aux_loss(self) -> torch.Tensor | None:
        """Regularisers the runners add to the loss (DEQ Jacobian penalty), or None."""
        terms = [s.tied.aux_loss for s in self.stages if getattr(s.tied, "aux_loss", None) is not None]
        return sum(terms) if terms else None

    def pop_solver_stats(self):
        """(forward, backward) SolverStats since the last call; empty for unrolled models."""
        forward, backward = [], []
        for stage in self.stages:
            if isinstance(stage.tied, Equilibrium):
                f, b = stage.tied.pop_stats()
                forward += f
                backward += b
        return forward, backward


def cell_factory(cfg: ModelConfig, width: int) -> Callable[[], nn.Module]:
    """A function that builds one cell of the stage of `width` channels."""
    if cfg.cell == "transformer":
        return lambda: CELLS[cfg.cell](width, norm=cfg.norm, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio)
    if cfg.cell == "conv":  # one norm per application it runs: untied cells run once each
        applications = 1 if cfg.execution == "untied" else cfg.depth
        return lambda: CELLS[cfg.cell](width, norm=cfg.norm, depth=applications)
    return lambda: CELLS[cfg.cell](width, norm=cfg.norm)


class TiedNet(Backbone):
    """stem -> [stage, downsample]* -> average pool to a small grid -> linear head.

    The head pools to a grid rather than globally: the cell ends in a GroupNorm, which sets
    each group's mean over space to zero per image, so a global average would discard most of
    what the features say (a width-8 model did not learn the digits at all). A 4x4 grid, as in
    the DEQ ResNet recipe, keeps where things are.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        widths = [cfg.width * 2**s for s in range(cfg.stages)]
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1, bias=False),
            make_norm(cfg.norm, widths[0]),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList(Stage(cell_factory(cfg, w), cfg) for w in widths)
        self.downsamples = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(w_in, w_out, 3, stride=2, padding=1, bias=False),
                make_norm(cfg.norm, w_out),
                nn.ReLU(inplace=True),
            )
            for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.pool = nn.AdaptiveAvgPool2d(cfg.head_pool)
        self.head = nn.Linear(widths[-1] * cfg.head_pool**2, cfg.num_classes)
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

    # Small logits keep high-lr SGD stable early; measured on a 10k-image CIFAR-10 subset, 2
    # epochs: scale 1 16%, 1/2 46%, 1/4 59%, 1/8 56%, 1/16 44% test accuracy.
    logit_scale = 1 / 4

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        widths = [cfg.width * 2**s for s in range(cfg.stages)]
        whiten_width = 2 * cfg.in_channels * WHITEN_KERNEL**2  # each eigen-filter and its negative
        self.whiten = nn.Conv2d(cfg.in_channels, whiten_width, WHITEN_KERNEL)
        self.whiten.weight.requires_grad_(False)
        norm = batch_norm_if_auto(cfg.norm)
        self.entries = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w_in, w_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                          make_norm(norm, w_out), nn.GELU())
            for w_in, w_out in zip([whiten_width] + widths[:-1], widths)
        )
        self.stages = nn.ModuleList(Stage(cell_factory(cfg, w), cfg) for w in widths)
        self.head = nn.Linear(widths[-1], cfg.num_classes, bias=False)
        self.rebuild_masks()

    def init_from_data(self, images: torch.Tensor) -> None:
        with torch.no_grad():
            filters = whitening_filters(images.cpu(), WHITEN_KERNEL)
            self.whiten.weight.copy_(filters.to(self.whiten.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        for entry, stage in zip(self.entries, self.stages):
            x = stage(entry(x))
        return self.head(torch.amax(x, dim=(2, 3))) * self.logit_scale


class TiedViT(Backbone):
    """patch embedding + positions -> one tied Transformer stage -> LayerNorm, mean pool, head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        tokens = (cfg.image_size // cfg.patch_size) ** 2
        self.embed = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, tokens, cfg.width) * 0.02)
        self.stages = nn.ModuleList([Stage(cell_factory(cfg, cfg.width), cfg)])
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes)
        self.rebuild_masks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        if tokens.shape[1] != self.pos.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens for {self.pos.shape[1]} positions: "
                             f"the model was built for image_size {self.config.image_size}")
        z = self.stages[0](tokens + self.pos)
        return self.head(self.norm(z).mean(1))


def build_model(cfg: ModelConfig) -> Backbone:
    validate_model_config(cfg)
    return {"transformer": TiedViT, "conv": TiedFastNet}.get(cfg.cell, TiedNet)(cfg)


def create_model(name: str = ModelConfig.name, **overrides) -> Backbone:
    """A model from a preset name plus keyword overrides (timm-style)."""
    return build_model(resolve_model_config({"name": name}, **overrides))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
