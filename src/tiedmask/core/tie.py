"""Tie the repeated blocks of any PyTorch model into one shared, multi-masked block.

    model = tie(model, blocks="vit.layers", scope="multi", density=0.5)

finds a run of structurally identical blocks (an nn.ModuleList or nn.Sequential, or a slice of
one: ``"resnet.encoder.stages.1.layers[1:]"`` skips a stage's downsampling first block) and
replaces it with one shared block applied once per original position. Application i sees
every Linear and Conv weight of the shared block under its own static mask (scope ``multi``;
``same``: one mask for all; ``dense``: none), regenerated from (seed, parameter name, i) as
everywhere in tiedmask, so checkpoints hold only the shared weights. Norm layers, biases and
peft LoRA adapters may stay per application (`per_application`); they cost few parameters.

How (`tiedmask.core.tied_block`): masks and per-application tensors are `torch.nn.utils.parametrize` parametrizations of
the shared block's own parameters, and each application sets the index they read. Any block
that reads its weights through its modules works unchanged (timm, Hugging Face, your own),
with no copy of its forward code. A container that is iterated (``for layer in self.layers``)
or called (``self.blocks(x)``) keeps working: the replacement does both.

`relax` adds per-application low-rank updates to every masked weight (Relaxed Recursive
Transformers, arXiv 2410.20672): ``lora`` gives each position its own pair (``relax_init=svd``
starts it at a truncated SVD of what tying pre-trained blocks lost); ``multimask-lora`` shares
one pair across positions under a distinct mask per position (CapaBoost, arXiv 2407.01320).

Layer kinds: the weights of nn.Linear, every nn.ConvNd, transformers' Conv1D (GPT-2) and
nn.MultiheadAttention's packed projections are masked and relaxed; any other matrix of the
block (an RNN's, an embedding's) stays shared and dense and is named in a warning (`strict=True`
refuses). Norms of any class are kept per position, found by behaviour (a leaf whose parameters
are all vectors, or that keeps running statistics), not by a class list.

Decoders: every position keeps the positional indices of the block it replaced (`layer_idx`
and kin), set on the shared block while that position runs, so each application reads and
writes its own KV-cache slot and a tied decoder generates exactly like its untied twin. A block
that takes a cache but keeps no such index is refused. `group=K` loops K distinct blocks
(`strategy` cycle: 0 1 2 0 1 2, or sequence: 0 0 1 1 2 2; Relaxed Recursive Transformers).
Hugging Face's `save_pretrained` is refused on a tied model (from_pretrained would load an
untied one with random layers): tie the top-level model (``tie(lm, blocks="model.layers")``),
since only the module given to `tie` is guarded. `tiedmask.core.untie.untie` gives the plain
model back. A tied weight read outside any position has a shape, dtype and device but no values
(peft can wrap a tied layer; merging adapters into it raises: untie first).

Saving and loading: `tiedmask.core.tie_io`.

>>> from tiedmask.core.tied_block import tie_summary
>>> blocks = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
>>> tied = tie(torch.nn.Sequential(blocks), blocks="0", density=0.5)
>>> tie_summary(tied)["parameters"], tie_summary(tied)["parameters_before"]
(72, 288)
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import re
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, TiedmaskError
from ..typed import from_dict
from .channel_tie import compute_kept_rows_only
from .masks import MaskBank, num_masks
from .spec import MaskConfig, TieConfig
from .tied_block import (ApplicationIndex, LoRARelaxation, MultiMaskLoRARelaxation, PerApplication,
                         PerApplicationModule, SharedWeight, TiedBlocks)

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
WEIGHTED_TYPES = (nn.Linear, nn.modules.conv._ConvNd)  # their `weight` is masked
ADAPTER_MARK = "lora_"  # peft's adapter modules (lora_A, lora_B, lora_embedding_*)


def tie(model: nn.Module, blocks: str = "", scope: str = "multi", density: float = 0.5,
        kind: str = "unstructured", seed: int = 0, nm_m: int = 4, strict: bool = False,
        **options) -> nn.Module:
    """Replace the repeated `blocks` of `model` by one shared, masked block (in place; returns
    `model`). `options` are `TieConfig`'s: init (first | mean | fresh), per_application (norms,
    biases, adapters), relax (none | lora | multimask-lora), relax_rank, relax_density,
    relax_init (zero | svd), group (K shared blocks looped) and strategy (cycle | sequence).
    `blocks` empty: the longest run of identical blocks in the model. A weight it cannot mask
    is named in a warning; `strict=True` refuses instead (nothing changed)."""
    masks = from_dict(MaskConfig, {"kind": kind, "scope": scope, "density": density, "seed": seed,
                                   "nm_m": nm_m}, "tie.")
    masks.validate()
    cfg = from_dict(TieConfig, {"blocks": blocks, **options}, "tie.")
    cfg.validate()
    return tie_with(model, masks, cfg, strict=strict)


def select_blocks(model: nn.Module, blocks: str = "") -> tuple[str, nn.Module, int, int]:
    """(path, container, start, stop) of the blocks `blocks` names ('' = the longest run of
    identical blocks): what `tie` ties, and what an untied model's CKA traces."""
    path, span = _parse_blocks(blocks) if blocks else _longest_run(model)
    container = _container(model, path)
    start, stop, _ = span.indices(len(container))
    if start >= stop:
        raise ConfigError(f"{path}[{start}:{stop}] selects no block; {path} has {len(container)}")
    return path, container, start, stop


def tie_with(model: nn.Module, masks: MaskConfig, cfg: TieConfig, strict: bool = False) -> nn.Module:
    path, container, start, stop = select_blocks(model, cfg.blocks)
    originals = list(container)
    chosen = originals[start:stop]
    _check_identical(chosen, path, start)
    positions = loop_positions(len(chosen), cfg.group, cfg.strategy, f"{path}[{start}:{stop}]")
    check_cache_mapping(chosen[0], path)
    _check_relaxation_rank(chosen[0], cfg, path)
    unmasked = unmaskable_weights(chosen[0])
    if unmasked and strict:
        raise ConfigError(f"tie(strict=True): {path} has weights tie cannot mask: {', '.join(unmasked)}; "
                          "tie without strict to keep them shared and dense")
    if unmasked and masks.scope != "dense":
        warnings.warn(f"tie: {path}: these weights stay shared and dense (no mask, no relaxation): "
                      f"{', '.join(unmasked)}", stacklevel=3)
    members = [[p for p, (b, _) in enumerate(positions) if b == k] for k in range(cfg.group)]
    shared, states = [], []
    for k, own in enumerate(members):
        blocks = [chosen[p] for p in own]
        state = ApplicationIndex()
        block = copy.deepcopy(blocks[0])
        _share_values(block, blocks, cfg.init)
        _make_per_application(block, blocks, state, cfg)
        name = path if cfg.group == 1 else f"{path}.{k}"  # one block keeps its masks of before groups
        _mask_weights(block, blocks, state, masks, cfg, name)
        shared.append(block)
        states.append(state)
    positional = [_positional_values(shared[b], chosen[p]) for p, (b, _) in enumerate(positions)]
    settings = {"blocks": f"{path}[{start}:{stop}]", "masks": dataclasses.asdict(masks),
                "tie": dataclasses.asdict(cfg),
                "parameters_before": sum(p.numel() for b in chosen for p in b.parameters())}
    tied = TiedBlocks(shared, states, positions, positional, originals[:start], originals[stop:], settings)
    tied.container_type = type(container)  # what `untie` rebuilds
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, tied)
    _refuse_library_saving(model)
    return model


def loop_positions(count: int, group: int, strategy: str, where: str) -> list[tuple[int, int]]:
    """(shared block, its application index) for each of `count` tied positions."""
    if count % group:
        raise ConfigError(f"tie.group {group} does not divide the {count} blocks of {where}; choose a "
                          f"divisor of {count} ({', '.join(str(d) for d in range(1, count + 1) if count % d == 0)})")
    loops = count // group
    if strategy == "cycle":
        return [(p % group, p // group) for p in range(count)]
    return [(p // loops, p % loops) for p in range(count)]


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


def is_norm_like(module: nn.Module) -> bool:
    """A leaf that only scales and shifts (its parameters all vectors: LayerNorm, RMSNorm of any
    library, a layer scale) or keeps running statistics (BatchNorm): kept per application."""
    if isinstance(module, NORM_TYPES):
        return True
    if any(True for _ in module.children()) or _maskable_names(module) or isinstance(module, nn.ParameterDict):
        return False  # a ParameterDict: peft's per-adapter vectors (DoRA), handled as adapters
    params = list(module.parameters(recurse=False))
    if params:
        return all(p.dim() <= 1 for p in params)
    return any(n.startswith("running_") for n, _ in module.named_buffers(recurse=False))


def _maskable_names(module: nn.Module) -> list[str]:
    """The parameters of `module` (its own) that `tie` masks and relaxes."""
    if isinstance(module, WEIGHTED_TYPES) or _is_transformers_conv1d(module):
        return ["weight"]
    if isinstance(module, nn.MultiheadAttention):  # packed or separate projections; out_proj is a Linear
        return [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                if getattr(module, n, None) is not None]
    return []


def _is_transformers_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D is a Linear with its weight stored transposed (in, out): masked the same way.
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.")
               for c in type(module).__mro__)  # parametrized too (its class is then a subclass)


def unmaskable_weights(block: nn.Module) -> list[str]:
    """Matrices of `block` that `tie` leaves shared and dense: parameters of two or more
    dimensions outside the module kinds it masks (an RNN's, an embedding's, a custom layer's)."""
    out = []
    for name, module in block.named_modules():
        if ADAPTER_MARK in name:
            continue
        masked = set(_maskable_names(module))
        out += [".".join(filter(None, (name, n))) + f" ({type(module).__name__})"
                for n, p in module.named_parameters(recurse=False) if p.dim() >= 2 and n not in masked]
    return out


def _positional_values(shared: nn.Module, original: nn.Module) -> dict:
    """{(module path, attribute): value} of the block at one position: the indices it keeps for
    its KV-cache slot (or logging), set on the shared block while that position runs."""
    inside_copies = {n for n, m in shared.named_modules() if isinstance(m, PerApplicationModule)}
    out = {}
    for path, module in original.named_modules():
        if any(path == c or path.startswith(c + ".") for c in inside_copies):
            continue  # a per-position copy keeps its own
        for attr in POSITION_ATTRIBUTES:
            if attr in vars(module) and isinstance(vars(module)[attr], (int, type(None))):
                out[(path, attr)] = vars(module)[attr]
    return out


CACHE_ARGUMENTS = ("past_key_value", "past_key_values", "layer_past", "cache", "past")


def check_cache_mapping(block: nn.Module, path: str) -> None:
    """Refuse a block that takes a KV cache but keeps no layer index to pick its slot: its
    applications would all write one slot (each attending to the others' keys)."""
    try:
        names = set(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return
    takes = sorted(names & set(CACHE_ARGUMENTS))
    indexed = any(attr in vars(m) for m in block.modules() for attr in POSITION_ATTRIBUTES)
    if takes and not indexed:
        raise ConfigError(f"{path}: its blocks take a cache ({', '.join(takes)}) but keep no layer index "
                          f"({', '.join(POSITION_ATTRIBUTES)}), so tie cannot give each application its own "
                          "cache slot; tie a model whose layers carry their index")


def _check_relaxation_rank(block: nn.Module, cfg: TieConfig, path: str) -> None:
    """A relaxation rank above a weight's smaller side adds parameters and no expressiveness."""
    if cfg.relax == "none":
        return
    ranks = [min(w.shape[0], w[0].numel()) for _, m in block.named_modules()
             for w in (getattr(m, a) for a in _maskable_names(m))]
    if ranks and cfg.relax_rank > max(ranks):  # a thinner weight just gets its full rank
        raise ConfigError(f"tie.relax_rank {cfg.relax_rank} exceeds the rank any weight of {path} can have "
                          f"(at most {max(ranks)}); choose <= {max(ranks)}")


def _refuse_library_saving(model: nn.Module) -> None:
    """Hugging Face's save_pretrained would write the tied layout under names from_pretrained
    does not know, which then loads an untied model with those layers left random."""
    if hasattr(type(model), "save_pretrained") and hasattr(type(model), "from_pretrained"):
        model.save_pretrained = _save_pretrained_refused


def _save_pretrained_refused(*args, **kwargs):
    raise TiedmaskError("a tied model cannot be saved with save_pretrained (from_pretrained would build the "
                        "untied model and leave its tied layers random): save it with tiedmask.save_tied(model, "
                        "path) and load it with load_tied, or call tiedmask.untie(model) first for a plain model")


def _per_application_names(shared: nn.Module, cfg: TieConfig) -> tuple[set[str], set[str]]:
    """(module paths kept whole per application, parameter names kept per application)."""
    modules = {n for n, m in shared.named_modules()
               if n and "norms" in cfg.per_application and is_norm_like(m)}
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
    n_masks = num_masks(masks.scope, count)
    copies = [n for n, m in shared.named_modules() if isinstance(m, PerApplicationModule)]
    for name, module in list(shared.named_modules()):
        if ADAPTER_MARK in name or any(name == c or name.startswith(c + ".") for c in copies):
            continue
        for attr in _maskable_names(module):
            _mask_one(module, attr, name, blocks, state, masks, cfg, path, n_masks, count)


def _mask_one(module: nn.Module, attr: str, name: str, blocks: list[nn.Module], state: ApplicationIndex,
              masks: MaskConfig, cfg: TieConfig, path: str, n_masks: int, count: int) -> None:
    """Parametrize `module.attr`: application i's mask over the shared value, plus its relaxation."""
    weight = getattr(module, attr)
    full_name = ".".join(filter(None, (path, name, attr)))
    bank = None
    if n_masks:  # GPT-2's Conv1D stores (in, out): its masks are made for (out, in) (MaskBank)
        bank = MaskBank(masks.kind, tuple(weight.shape), n_masks, masks.density, masks.seed, full_name,
                        nm_m=masks.nm_m, transposed=_is_transformers_conv1d(module)).to(weight.device)
    rows, cols = weight.shape[0], weight[0].numel()
    rank = min(cfg.relax_rank, rows, cols)  # a weight thinner than the rank gets its full rank
    relaxation = None
    if cfg.relax == "lora":
        relaxation = LoRARelaxation(count, rows, cols, rank)
    elif cfg.relax == "multimask-lora":
        relaxation = MultiMaskLoRARelaxation(count, rows, cols, rank, "unstructured",
                                             cfg.relax_density, masks.seed, full_name)
    if relaxation is not None:
        relaxation.to(device=weight.device, dtype=weight.dtype)
    parametrization = SharedWeight(state, masks.scope, bank, relaxation)
    parametrize.register_parametrization(module, attr, parametrization, unsafe=True)
    if attr == "weight" and bank is not None and bank.kept_rows is not None and relaxation is None:
        compute_kept_rows_only(module)  # channel masks: the kept rows alone, as the built-in layers
    if isinstance(relaxation, LoRARelaxation) and cfg.relax_init == "svd":
        with torch.no_grad():
            original = ".".join(filter(None, (name, attr)))
            residuals = [(_get(b, original) - parametrization.masked(weight, i)).reshape(rows, cols)
                         for i, b in enumerate(blocks)]
        relaxation.fit(residuals)


