"""Tie the repeated blocks of any PyTorch model into one shared, multi-masked block.

    model = tie(model, blocks="vit.layers", scope="multi", density=0.5)

finds a run of structurally identical blocks (an nn.ModuleList or nn.Sequential, or a slice of
one: ``"resnet.encoder.stages.1.layers[1:]"`` skips a stage's downsampling first block) and
replaces it with one shared block applied once per original position. Application i sees
every Linear and Conv weight of the shared block under its own static mask (scope ``multi``;
``same``: one mask for all; ``dense``: none), regenerated from (seed, parameter name, i) as
everywhere in tiedmask, so checkpoints hold only the shared weights. Norm layers, biases and
peft LoRA adapters may stay per application (`per_application`); they cost few parameters.

How: masks and per-application tensors are `torch.nn.utils.parametrize` parametrizations of
the shared block's own parameters, and each application sets the index they read. Any block
that reads its weights through its modules works unchanged (timm, Hugging Face, your own),
with no copy of its forward code. A container that is iterated (``for layer in self.layers``)
or called (``self.blocks(x)``) keeps working: the replacement does both.

`relax` adds per-application low-rank updates to every masked weight (Relaxed Recursive
Transformers, arXiv 2410.20672): ``lora`` gives each position its own pair (``relax_init=svd``
starts it at a truncated SVD of what tying pre-trained blocks lost); ``multimask-lora`` shares
one pair across positions under a distinct mask per position (CapaBoost, arXiv 2407.01320).

Limits: only the `weight` of nn.Linear and Conv modules is masked (`tie_summary` lists other
weights left shared and dense, e.g. nn.MultiheadAttention's in_proj_weight); per-position
norms are torch's norm classes. Positional indices (`layer_idx`) are not compared: the shared
block runs with block 0's, so tie encoders, not decoders with KV caches.

>>> blocks = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
>>> tied = tie(torch.nn.Sequential(blocks), blocks="0", density=0.5)
>>> tie_summary(tied)["parameters"], tie_summary(tied)["parameters_before"]
(72, 288)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, TiedmaskError
from ..files import atomic_write
from ..typed import from_dict
from .lora import MaskedFactor
from .masks import make_mask, mask_index, num_masks
from .spec import MaskConfig, TieConfig

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
WEIGHTED_TYPES = (nn.Linear, nn.modules.conv._ConvNd)  # their `weight` is masked
ADAPTER_MARK = "lora_"  # peft's adapter modules (lora_A, lora_B, lora_embedding_*)
METADATA_KEY = "tiedmask_tie"


class ApplicationIndex:
    """Which application of the shared block is running; read by its parametrizations."""

    def __init__(self):
        self.index: int | None = None

    def current(self) -> int:
        if self.index is None:
            raise TiedmaskError("a tied block's weights were read outside an application; call "
                                "the tied container (or one of its items), not the shared block")
        return self.index

    @contextlib.contextmanager
    def applying(self, index: int):
        previous, self.index = self.index, index
        try:
            yield
        finally:
            self.index = previous


class SharedWeight(nn.Module):
    """Parametrization: the shared weight under application i's mask, plus i's relaxation."""

    def __init__(self, state: ApplicationIndex, scope: str, masks: torch.Tensor | None,
                 relaxation: nn.Module | None):
        super().__init__()
        self.state, self.scope, self.relaxation = state, scope, relaxation
        # Flat [n, numel]: 5-D buffers would break model.to(memory_format=channels_last).
        self.register_buffer("masks", masks, persistent=False)

    def density(self) -> float:
        """The kept share of the weight in the running application."""
        which = mask_index(self.scope, self.state.current())
        return 1.0 if self.masks is None or which is None else float(self.masks[which].float().mean())

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        i = self.state.current()
        which = mask_index(self.scope, i)
        weight = shared if self.masks is None or which is None else shared * self.masks[which].view_as(shared)
        if self.relaxation is not None:
            weight = weight + self.relaxation.delta(i).view_as(weight).to(weight.dtype)
        return weight


def shared_weight(module: nn.Module) -> SharedWeight | None:
    """The `SharedWeight` parametrization of `module.weight`, if `tie` put one there."""
    chains = getattr(module, "parametrizations", {})
    chain = chains["weight"] if "weight" in chains else []
    return next((p for p in chain if isinstance(p, SharedWeight)), None)


class PerApplication(nn.Module):
    """Parametrization: one value per application, stacked on a leading axis."""

    def __init__(self, state: ApplicationIndex, count: int):
        super().__init__()
        self.state, self.count = state, count

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return stacked[self.state.current()]

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value.unsqueeze(0).repeat(self.count, *([1] * value.dim()))


class PerApplicationModule(nn.Module):
    """A module (a norm layer, with its running statistics) kept once per application."""

    def __init__(self, state: ApplicationIndex, copies: list[nn.Module]):
        super().__init__()
        self.state = state
        self.copies = nn.ModuleList(copies)

    def forward(self, *args, **kwargs):
        return self.copies[self.state.current()](*args, **kwargs)

    def __getattr__(self, name: str):  # e.g. `norm.eps` read by the surrounding code
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):  # copy/pickle protocols look these up: never lend them
                raise
            return getattr(self.copies[0], name)


class LoRARelaxation(nn.Module):
    """A low-rank update of its own for every application: delta_i = B_i @ A_i."""

    def __init__(self, count: int, rows: int, cols: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(count, rank, cols))
        self.B = nn.Parameter(torch.zeros(count, rows, rank))  # B = 0: starts as the tied block
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self, i: int) -> torch.Tensor:
        return self.B[i] @ self.A[i]

    @torch.no_grad()
    def fit(self, residuals: list[torch.Tensor]) -> None:
        """Start each update at the best rank-r approximation of what tying lost (its SVD)."""
        rank = self.A.shape[1]
        for i, residual in enumerate(residuals):
            u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
            root = s[:rank].sqrt()
            self.B[i].zero_()[:, : len(root)] = (u[:, :rank] * root).to(self.B.dtype)
            self.A[i].zero_()[: len(root)] = (root[:, None] * vh[:rank]).to(self.A.dtype)


class MultiMaskLoRARelaxation(nn.Module):
    """One low-rank pair shared by every application, under a distinct mask per application:
    delta_i = (B * M_B^i) @ (A * M_A^i), the parameters of one LoRA (CapaBoost)."""

    def __init__(self, count: int, rows: int, cols: int, rank: int, kind: str, density: float,
                 seed: int, name: str):
        super().__init__()
        self.A = MaskedFactor((rank, cols), 0, count, kind, density, seed, f"{name}.relax_A")
        self.B = MaskedFactor((rows, rank), 1, count, kind, density, seed, f"{name}.relax_B")
        nn.init.kaiming_uniform_(self.A.shared, a=math.sqrt(5))  # B = 0: starts as the tied block

    def delta(self, i: int) -> torch.Tensor:
        return (self.B.shared * self.B.masks[i]) @ (self.A.shared * self.A.masks[i])


class Application(nn.Module):
    """Position i of a tied run: calls the shared block with application i's masks and parts.

    It owns nothing (the shared block is not registered here, so it is stored once), and lends
    the shared block's attributes, so code that reads ``layers[i].attention`` still works.
    """

    def __init__(self, owner: "TiedBlocks", index: int):
        super().__init__()
        object.__setattr__(self, "owner", owner)
        self.index = index

    def forward(self, *args, **kwargs):
        with self.owner.state.applying(self.index):
            return self.owner.shared(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "owner":  # copy/pickle protocols: never lend them
                raise
            return getattr(self.owner.shared, name)


class TiedBlocks(nn.Module):
    """What replaces the run of blocks: untouched blocks `before`, the shared block applied
    once per tied position, untouched blocks `after`. Iterate it like the ModuleList it
    replaces, or call it like the Sequential."""

    def __init__(self, shared: nn.Module, count: int, state: ApplicationIndex, before: list[nn.Module],
                 after: list[nn.Module], settings: dict):
        super().__init__()
        self.shared = shared
        self.before, self.after = nn.ModuleList(before), nn.ModuleList(after)
        self.state, self.settings = state, settings
        self.applications = [Application(self, i) for i in range(count)]  # a list: not registered

    def _items(self) -> list[nn.Module]:
        return [*self.before, *self.applications, *self.after]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self.before) + len(self.applications) + len(self.after)

    def __getitem__(self, index):
        items = self._items()
        return nn.ModuleList(items[index]) if isinstance(index, slice) else items[index]

    def forward(self, x):
        for block in self:
            x = block(x)
        return x


def tie(model: nn.Module, blocks: str = "", scope: str = "multi", density: float = 0.5,
        kind: str = "unstructured", seed: int = 0, nm_m: int = 4, **options) -> nn.Module:
    """Replace the repeated `blocks` of `model` by one shared, masked block (in place; returns
    `model`). `options` are `TieConfig`'s: init (first | mean | fresh), per_application (norms,
    biases, adapters), relax (none | lora | multimask-lora), relax_rank, relax_density,
    relax_init (zero | svd).
    `blocks` empty: the longest run of identical blocks in the model."""
    masks = from_dict(MaskConfig, {"kind": kind, "scope": scope, "density": density, "seed": seed,
                                   "nm_m": nm_m}, "tie.")
    masks.validate()
    cfg = from_dict(TieConfig, {"blocks": blocks, **options}, "tie.")
    cfg.validate()
    return tie_with(model, masks, cfg)


def tie_with(model: nn.Module, masks: MaskConfig, cfg: TieConfig) -> nn.Module:
    path, span = _parse_blocks(cfg.blocks) if cfg.blocks else _longest_run(model)
    container = _container(model, path)
    originals = list(container)
    start, stop, _ = span.indices(len(originals))
    chosen = originals[start:stop]
    if not chosen:
        raise ConfigError(f"{path}[{start}:{stop}] selects no block; {path} has {len(originals)}")
    _check_identical(chosen, path, start)
    state = ApplicationIndex()
    shared = copy.deepcopy(chosen[0])
    settings = {"blocks": f"{path}[{start}:{stop}]", "masks": dataclasses.asdict(masks),
                "tie": dataclasses.asdict(cfg),
                "parameters_before": sum(p.numel() for b in chosen for p in b.parameters())}
    _share_values(shared, chosen, cfg.init)
    _make_per_application(shared, chosen, state, cfg)
    _mask_weights(shared, chosen, state, masks, cfg, path)
    tied = TiedBlocks(shared, len(chosen), state, originals[:start], originals[stop:], settings)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, tied)
    return model


def _parse_blocks(spec: str) -> tuple[str, slice]:
    match = re.fullmatch(r"([\w.]+)(?:\[((?:-?\d+)?):((?:-?\d+)?)\])?", spec.strip())
    if not match:
        raise ConfigError(f"blocks {spec!r} is not a module path with an optional slice, "
                          "e.g. 'blocks' or 'layer2[1:]'")
    name, lo, hi = match.groups()
    return name, slice(int(lo) if lo else None, int(hi) if hi else None)


def _container(model: nn.Module, path: str) -> nn.Module:
    try:
        found = model.get_submodule(path)
    except AttributeError:
        found = None
    if not isinstance(found, (nn.ModuleList, nn.Sequential)):
        what = "is not an nn.ModuleList or nn.Sequential" if found is not None else "is not in the model"
        runs = ", ".join(f"{p} ({n} x {t})" for p, n, t in repeated_blocks(model)[:6]) or "none"
        raise ConfigError(f"blocks {path!r} {what}; runs of identical blocks here: {runs}")
    return found


# Positional indices a block keeps for caches or logging; a tied block runs with block 0's.
POSITION_ATTRIBUTES = ("layer_idx", "layer_id", "layer_index", "block_idx", "idx")
SCALARS = (bool, int, float, str, type(None))


def _settings(module: nn.Module) -> tuple:
    """A module's plain settings (window shift, drop-path rate, eps...), which tying would make
    block 0's for every position."""
    out = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or key == "training" or key in POSITION_ATTRIBUTES:
            continue
        if isinstance(value, SCALARS) or (isinstance(value, tuple) and all(isinstance(v, SCALARS) for v in value)):
            out.append((key, value))
    return tuple(out)


def _signature(block: nn.Module) -> tuple:
    return (type(block),
            tuple((n, type(m)) for n, m in block.named_modules()),
            tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()),
            tuple((n, tuple(b.shape)) for n, b in block.named_buffers()),
            tuple((n, _settings(m)) for n, m in block.named_modules()))


def _check_identical(blocks: list[nn.Module], path: str, start: int) -> None:
    first = _signature(blocks[0])
    for offset, block in enumerate(blocks[1:], 1):
        other = _signature(block)
        if other != first:
            part = next(i for i, (a, b) in enumerate(zip(first, other)) if a != b)
            what = ("class", "submodules", "parameter shapes", "buffers", "settings")[part]
            if part == 4:
                name, a, b = next((n, a, b) for (n, a), (_, b) in zip(first[4], other[4]) if a != b)
                key, x, y = next((k, x, y) for (k, x), (_, y) in zip(a, b) if x != y)
                what = f"setting {'.'.join(filter(None, (name, key)))} ({x!r} against {y!r})"
            raise ConfigError(
                f"{path}[{start + offset}] differs from {path}[{start}] in its {what}, so one shared "
                f"block cannot stand for both; tie a run of identical blocks (e.g. '{path}[{start + offset}:]'"
                f" if the rest are alike, or '{path}[{start}:{start + offset}]')")


def repeated_blocks(model: nn.Module) -> list[tuple[str, int, str]]:
    """(path with slice, count, block class) of every run of >= 2 identical consecutive blocks
    in a ModuleList or Sequential, longest first."""
    runs = []
    tied = [n for n, m in model.named_modules() if isinstance(m, TiedBlocks)]
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue  # the root cannot be replaced in place
        if any(name == t or name.startswith(t + ".") for t in tied):
            continue
        items = list(module)
        signatures = [_signature(m) for m in items]
        i = 0
        for sig, group in itertools.groupby(signatures):
            n = len(list(group))
            if n >= 2 and any(True for _ in items[i].parameters()):
                span = "" if n == len(items) else f"[{i}:{i + n}]"
                runs.append((f"{name}{span}", n, type(items[i]).__name__))
            i += n
    return sorted(runs, key=lambda r: -r[1])


def _longest_run(model: nn.Module) -> tuple[str, slice]:
    runs = repeated_blocks(model)
    if not runs:
        raise ConfigError("no run of identical blocks found in this model; name one with blocks=...")
    return _parse_blocks(runs[0][0])


def _per_application_names(shared: nn.Module, cfg: TieConfig) -> tuple[set[str], set[str]]:
    """(module paths kept whole per application, parameter names kept per application)."""
    modules = {n for n, m in shared.named_modules()
               if n and "norms" in cfg.per_application and isinstance(m, NORM_TYPES)}
    inside = lambda name: any(name == m or name.startswith(m + ".") for m in modules)  # noqa: E731
    params = set()
    for name, _ in shared.named_parameters():
        if inside(name.rpartition(".")[0]):
            continue
        adapter = ADAPTER_MARK in name and "adapters" in cfg.per_application
        if adapter or (name.endswith("bias") and "biases" in cfg.per_application):
            params.add(name)
    return modules, params


@torch.no_grad()
def _share_values(shared: nn.Module, blocks: list[nn.Module], init: str) -> None:
    if init == "fresh":
        for m in shared.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    elif init == "mean":
        tensors = itertools.chain(shared.named_parameters(), shared.named_buffers())
        for name, tensor in tensors:
            if tensor.is_floating_point():
                tensor.copy_(torch.stack([_get(b, name) for b in blocks]).mean(0))


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


@torch.no_grad()
def _make_per_application(shared: nn.Module, blocks: list[nn.Module], state: ApplicationIndex,
                          cfg: TieConfig) -> None:
    modules, params = _per_application_names(shared, cfg)
    fresh = cfg.init == "fresh"
    for path in sorted(modules, key=len, reverse=True):
        copies = [copy.deepcopy(b.get_submodule(path)) for b in blocks]
        for c in copies:
            if fresh and hasattr(c, "reset_parameters"):
                c.reset_parameters()
        owner, _, attr = path.rpartition(".")
        setattr(shared.get_submodule(owner) if owner else shared, attr, PerApplicationModule(state, copies))
    for name in params:
        owner_path, _, attr = name.rpartition(".")
        owner = shared.get_submodule(owner_path) if owner_path else shared
        vector = _get(shared, name).dim() < 2
        parametrize.register_parametrization(owner, attr, PerApplication(state, len(blocks)), unsafe=True)
        stacked = owner.parametrizations[attr].original
        stacked.no_weight_decay = vector  # a stack of biases is 2-D but still biases
        if not fresh:
            stacked.copy_(torch.stack([_get(b, name) for b in blocks]))


def _mask_weights(shared: nn.Module, blocks: list[nn.Module], state: ApplicationIndex, masks: MaskConfig,
                  cfg: TieConfig, path: str) -> None:
    count = len(blocks)
    for name, module in list(shared.named_modules()):
        if not isinstance(module, WEIGHTED_TYPES) or ADAPTER_MARK in name:
            continue
        weight = module.weight
        full_name = ".".join(filter(None, (path, name, "weight")))
        stack = None
        n_masks = num_masks(masks.scope, count)
        if n_masks:
            stack = torch.stack([make_mask(masks.kind, tuple(weight.shape), masks.density, masks.seed,
                                           full_name, i, nm_m=masks.nm_m).flatten() for i in range(n_masks)])
            stack = stack.to(weight.device)
        rows, cols = weight.shape[0], weight[0].numel()
        relaxation = None
        if cfg.relax == "lora":
            relaxation = LoRARelaxation(count, rows, cols, cfg.relax_rank)
        elif cfg.relax == "multimask-lora":
            relaxation = MultiMaskLoRARelaxation(count, rows, cols, cfg.relax_rank, "unstructured",
                                                 cfg.relax_density, masks.seed, full_name)
        if relaxation is not None:
            relaxation.to(device=weight.device, dtype=weight.dtype)
        parametrization = SharedWeight(state, masks.scope, stack, relaxation)
        parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
        if isinstance(relaxation, LoRARelaxation) and cfg.relax_init == "svd":
            with torch.no_grad(), _without_relaxation(parametrization):
                tied = [_weight_at(module, state, i) for i in range(count)]
            residuals = [(_get(b, f"{name}.weight") - t).reshape(rows, cols) for b, t in zip(blocks, tied)]
            relaxation.fit(residuals)


@contextlib.contextmanager
def _without_relaxation(parametrization: SharedWeight):
    saved, parametrization.relaxation = parametrization.relaxation, None
    try:
        yield
    finally:
        parametrization.relaxation = saved


def _weight_at(module: nn.Module, state: ApplicationIndex, i: int) -> torch.Tensor:
    with state.applying(i):
        return module.weight


def tied_containers(model: nn.Module) -> list[tuple[str, TiedBlocks]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TiedBlocks)]


def tie_summary(model: nn.Module) -> dict:
    """Parameter counts of a tied model: now, before tying, and per tied run of blocks."""
    total = sum(p.numel() for p in model.parameters())
    runs, saved = [], 0
    for name, tied in tied_containers(model):
        parts = _parameter_parts(tied.shared)
        count = {part: sum(p.numel() for p in params) for part, params in parts.items()}
        before = tied.settings["parameters_before"]
        saved += before - sum(count.values())
        unmasked = [n for n, p in tied.shared.named_parameters()
                    if p.dim() >= 2 and id(p) in {id(q) for q in parts["shared"]} and n.endswith("weight")
                    and ".parametrizations." not in n]
        runs.append({"blocks": name, "applications": len(tied.applications), **count, "parameters_before": before,
                     "masks": tied.settings["masks"]["scope"], "density": tied.settings["masks"]["density"],
                     "masked_weights": sum(shared_weight(m) is not None for m in tied.shared.modules()),
                     "unmasked_weights": unmasked})
    return {"parameters": total, "parameters_before": total + saved, "runs": runs}


def _parameter_parts(shared: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The shared block's parameters by role: shared, per_application, relaxation."""
    role: dict[int, str] = {}
    for module in shared.modules():
        if isinstance(module, PerApplicationModule):
            role.update((id(p), "per_application") for p in module.parameters())
        for attr, chain in getattr(module, "parametrizations", {}).items():
            for step in chain:
                if isinstance(step, PerApplication):
                    role[id(chain.original)] = "per_application"
                elif isinstance(step, SharedWeight) and step.relaxation is not None:
                    role.update((id(p), "relaxation") for p in step.relaxation.parameters())
    parts = {"shared": [], "per_application": [], "relaxation": []}
    for p in shared.parameters():
        parts[role.get(id(p), "shared")].append(p)
    return parts


def tie_settings(model: nn.Module) -> list[dict]:
    """What `tie` was called with, in order: enough to tie a fresh copy of the model again.
    `root` is the module `tie` was given (mask names are relative to it)."""
    out = []
    for name, tied in tied_containers(model):
        container = tied.settings["blocks"].partition("[")[0]
        out.append({"root": name[: len(name) - len(container)].rstrip("."), **tied.settings})
    return out


def save_tied(model: nn.Module, path: str | Path) -> None:
    """The tied model's tensors (safetensors; masks are regenerated, so absent) and how it
    was tied (in the header)."""
    # clone: tensors sharing storage (tied embeddings) cannot be saved as views of each other
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(tie_settings(model))}
    atomic_write(Path(path), save(tensors, metadata=metadata))


def load_tied(model: nn.Module, path: str | Path) -> nn.Module:
    """Tie `model` (an untied model of the same architecture) as the file says, and load it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise TiedmaskError(f"cannot read tied model {path} ({exc})") from None
    if METADATA_KEY not in metadata:
        raise TiedmaskError(f"{path} was not saved by save_tied (no {METADATA_KEY} in its header)")
    with torch.random.fork_rng(devices=[]):  # re-tying resets weights the file then overwrites
        for entry in json.loads(metadata[METADATA_KEY]):
            masks = from_dict(MaskConfig, entry["masks"], "tie.")
            cfg = from_dict(TieConfig, {**entry["tie"], "blocks": entry["blocks"], "init": "fresh",
                                        "relax_init": "zero"}, "tie.")
            root = entry.get("root", "")
            tie_with(model.get_submodule(root) if root else model, masks, cfg)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:  # missing, unexpected or differently shaped tensors
        detail = " ".join(str(exc).split())[:300]
        raise TiedmaskError(f"{path} does not fit this model ({detail})") from None
    return model
