"""What defines a model: typed settings in three sections, each validating itself.

    ModelConfig   the architecture: preset name, cell, execution, width, depth, stages, ...
      .masks      MaskConfig: kind, scope, density, seed, N:M
      .deq        DeqConfig: solver, gradient, iteration limits, tolerance, solver options
    DataShape     what the data decides: input channels, image side, classes (not a setting)

Solver options pass through to the solver unchanged (`DeqConfig.solver_options`), checked
against the solver's own keyword arguments, so every option of every solver can be set.

>>> ModelConfig(masks=MaskConfig(density=2.0)).validate()
Traceback (most recent call last):
...
tiedmask.errors.ConfigError: density 2.0 is outside (0, 1]; set model.masks.density in (0, 1]
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..typed import check_type
from .cells import NORMS
from .masks import check_mask_settings
from .solvers import OPTION_RANGES, SOLVERS, STOP_MODES  # the registry, with any solver a user registered

EXECUTIONS = ("unrolled", "equilibrium", "untied")
WEIGHT_NORMS = ("none", "weight", "spectral")
GRADIENTS = ("implicit", "phantom")
SOLVER_ARGS = ("f", "z", "max_iter", "tracker")  # what `solve` passes itself, not options


@dataclass(frozen=True)
class DataShape:
    """The input a model is built for; set by the data, never by a config."""

    channels: int = 3
    size: int = 32
    classes: int = 10


@dataclass
class MaskConfig:
    kind: str = "unstructured"  # unstructured | nm | channel
    scope: str = "multi"  # dense | same | multi
    density: float = 0.5  # kept share of each masked weight
    seed: int = 0
    nm_m: int = 4  # M of N:M masks; N = density * M

    def validate(self) -> None:
        check_mask_settings(self.kind, self.scope, self.density)
        if self.nm_m < 1:  # N:M shapes are checked where the weights are known (at build)
            raise ConfigError(f"model.masks.nm_m must be >= 1, got {self.nm_m}")


TIE_INITS = ("mean", "first", "fresh")
PER_APPLICATION_PARTS = ("norms", "biases", "adapters")
RELAXATIONS = ("none", "lora", "multimask-lora")
LOOP_STRATEGIES = ("cycle", "sequence")  # Relaxed Recursive Transformers' names (Bae et al., 2025)
RELAX_INITS = ("zero", "svd")


@dataclass
class TieConfig:
    """How `tiedmask.core.tie` ties the repeated blocks of an existing model."""

    blocks: str = ""  # module path of the blocks, optionally sliced ('layer2[1:]'); '' = longest run
    # Shared weights from: first (block 0: right for a model built from scratch, whose blocks
    # are independent draws; their mean would shrink the weights by sqrt(n)) | mean (of trained
    # blocks, to tie a pre-trained model) | fresh (reset_parameters)
    init: str = "first"
    per_application: list = field(default_factory=lambda: ["norms", "adapters"])  # + biases
    relax: str = "none"  # none | lora (per position) | multimask-lora (one pair, masked per position)
    relax_rank: int = 4
    relax_density: float = 0.5  # multimask-lora: kept share of each (unstructured-masked) factor
    # zero: B = 0, the relaxed model starts as the tied one | svd: lora starts at the best rank-r
    # approximation of what tying lost (for pre-trained blocks; of random blocks it is noise)
    relax_init: str = "zero"
    # group K > 1 loops K distinct shared blocks over the positions: cycle 0 1 2 0 1 2 (block
    # p mod K at position p), sequence 0 0 1 1 2 2 (block p // (n / K)); K must divide n
    group: int = 1
    strategy: str = "cycle"

    def validate(self) -> None:
        for key, value, choices in (("init", self.init, TIE_INITS), ("relax", self.relax, RELAXATIONS),
                                    ("relax_init", self.relax_init, RELAX_INITS)):
            if value not in choices:
                raise ConfigError(f"tie.{key} {value!r} is not one of {list(choices)}")
        unknown = sorted(set(self.per_application) - set(PER_APPLICATION_PARTS))
        if unknown:
            raise ConfigError(f"tie.per_application has {unknown}; choose from {list(PER_APPLICATION_PARTS)}")
        if self.strategy not in LOOP_STRATEGIES:
            raise ConfigError(f"tie.strategy {self.strategy!r} is not one of {list(LOOP_STRATEGIES)}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ConfigError(f"tie.group must be a whole number >= 1, got {self.group!r}")
        if self.relax_rank < 1:
            raise ConfigError(f"tie.relax_rank must be >= 1, got {self.relax_rank}")
        if not 0 < self.relax_density <= 1:
            raise ConfigError(f"tie.relax_density {self.relax_density} is outside (0, 1]")


@dataclass
class DeqConfig:
    """Equilibrium execution; used only when model.execution is equilibrium (refused on models
    that cannot run to a fixed point: `refuse_unread`)."""

    solver: str = "anderson"  # fixed_point | anderson | broyden
    grad: str = "implicit"  # implicit | phantom
    train_iter: int = 20  # forward solver iterations while training
    eval_iter: int = 30  # ... while evaluating
    backward_iter: int = 20  # adjoint solver iterations (implicit gradient)
    tol: float = 1e-3
    stop_mode: str = "rel"  # rel | abs residual
    solver_options: dict = field(default_factory=dict)  # e.g. {m: 5, lam: 1.0e-4} for anderson
    phantom_steps: int = 5
    phantom_tau: float = 0.5
    jac_reg: float = 0.0  # weight of the Jacobian (Frobenius) regulariser

    def validate(self) -> None:

        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown deq solver {self.solver!r}; choose one of {sorted(SOLVERS)}")
        if self.grad not in GRADIENTS:
            raise ConfigError(f"unknown deq grad {self.grad!r}; choose one of {list(GRADIENTS)}")
        if self.stop_mode not in STOP_MODES:
            raise ConfigError(f"deq stop_mode {self.stop_mode!r} is not one of {list(STOP_MODES)}")
        for key in ("train_iter", "eval_iter", "backward_iter", "phantom_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.deq.{key} must be >= 1, got {getattr(self, key)}")
        if not self.tol >= 0 or not 0 < self.phantom_tau <= 1 or not self.jac_reg >= 0:
            raise ConfigError("model.deq needs tol >= 0, phantom_tau in (0, 1] and jac_reg >= 0")
        accepted = solver_options(self.solver)
        unknown = sorted(set(self.solver_options) - set(accepted))
        if unknown:
            raise ConfigError(f"solver {self.solver!r} takes no option(s) {unknown}; "
                              f"its options: {sorted(accepted)}")
        for key, value in self.solver_options.items():  # typed like the solver's default
            default = accepted[key]
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                expected = float if isinstance(default, float) else int
                self.solver_options[key] = check_type(f"model.deq.solver_options.{key}", value, expected)
        for key, value in self.solver_options.items():
            check, allowed = OPTION_RANGES.get(self.solver, {}).get(key, (lambda v: True, ""))
            if not check(value):
                raise ConfigError(f"model.deq.solver_options.{key} of {self.solver} must be {allowed}, got {value!r}")


def solver_options(solver: str) -> dict:
    """The keyword options a registered solver accepts, with their defaults (its signature
    is the truth)."""
    params = inspect.signature(SOLVERS[solver]).parameters
    return {name: p.default for name, p in params.items() if name not in SOLVER_ARGS}


@dataclass
class ModelConfig:
    """Everything that defines a model but its input shape; `name` picks the preset whose
    function builds it (and fills the values the caller left out)."""

    name: str = "tied-resnet-s"
    cell: str = "resnet"  # resnet | conv | transformer (the preset's backbone says which fit)
    execution: str = "unrolled"  # unrolled | equilibrium | untied
    width: int = 32  # channels of the first stage; each later stage doubles it
    depth: int = 4  # applications of the tied cell per stage
    stages: int = 2
    norm: str = "auto"  # auto: group for resnet, batch for conv, layer for transformer
    checkpointing: bool = False  # recompute activations in the backward pass
    head_pool: int = 4  # resnet: average-pool to a head_pool x head_pool grid before the head
    patch_size: int = 4  # transformer: patch embedding stride
    heads: int = 4  # transformer: attention heads
    mlp_ratio: float = 2.0  # transformer: MLP hidden width / width
    weight_norm: str = "none"  # none | weight | spectral, on the tied cell's weights
    masks: MaskConfig = field(default_factory=MaskConfig)
    deq: DeqConfig = field(default_factory=DeqConfig)
    # Models of other libraries (name 'timm:NAME' or 'hf:MODEL_TYPE', see core.external):
    args: dict = field(default_factory=dict)  # keyword arguments of the library's model builder
    tie: TieConfig = field(default_factory=TieConfig)  # how their repeated blocks are tied

    @property
    def external(self) -> bool:
        return ":" in self.name

    def validate(self) -> None:
        for key in ("width", "depth", "stages", "head_pool", "patch_size", "heads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key} must be an integer >= 1, got {value!r}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"unknown execution {self.execution!r}; choose one of {list(EXECUTIONS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; choose one of {list(NORMS)}")
        if self.weight_norm not in WEIGHT_NORMS:
            raise ConfigError(f"unknown weight_norm {self.weight_norm!r}; choose one of {list(WEIGHT_NORMS)}")
        self.masks.validate()
        self.tie.validate()
        if not self.external and (self.args or self.tie != TieConfig()):
            raise ConfigError(f"model.args and model.tie apply to models of other libraries "
                              f"('timm:NAME', 'hf:TYPE'), not to {self.name!r}; remove them")
        if self.execution == "untied" and self.masks.scope != "dense":
            raise ConfigError("untied execution gives every application weights of its own, so there "
                              "is nothing to mask per application; use model.masks.scope dense")
        if self.execution == "equilibrium":
            if self.masks.scope == "multi":
                raise ConfigError(NO_MULTI_MASK_FIXED_POINT)
            self.deq.validate()


NO_MULTI_MASK_FIXED_POINT = ("mask scope 'multi' has no fixed point (each step would be another "
                             "function); use model.masks.scope same or dense with execution equilibrium")


