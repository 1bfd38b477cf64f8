"""A tied model on disk: its tensors in safetensors (masks regenerate from the seed, so they
are absent) and, in the header, how `tie` was called, so that `load_tied` ties a fresh model
the same way before loading."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from ..errors import ConfigError, TiedmaskError
from ..files import atomic_write
from ..typed import from_dict
from .spec import MaskConfig, TieConfig
from .tie import tie_with
from .tied_block import tied_containers

METADATA_KEY = "tiedmask_tie"


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


def _header_entries(text: str, path) -> list[dict]:
    """The header's list of ties, each checked for its fields' kinds (values are checked by
    MaskConfig and TieConfig as `tie` checks them)."""
    try:
        entries = json.loads(text)
    except ValueError:
        entries = None
    kinds = {"blocks": str, "masks": dict, "tie": dict}
    if not (isinstance(entries, list) and entries and all(
            isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in kinds.items())
            and isinstance(e.setdefault("root", ""), str) for e in entries)):  # files of 0.2 may lack a root
        raise TiedmaskError(f"{path}: its {METADATA_KEY} header is damaged (not a list of ties with root, blocks, "
                            "masks and tie); save the model again with save_tied")
    return entries


def load_tied(model: nn.Module, path: str | Path) -> nn.Module:
    """Tie `model` (an untied model of the same architecture) as the file says, and load it."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise TiedmaskError(f"cannot read tied model {path} ({exc})") from None
    if METADATA_KEY not in metadata:
        raise TiedmaskError(f"{path} was not saved by save_tied (no {METADATA_KEY} in its header)")
    entries = _header_entries(metadata[METADATA_KEY], path)
    with torch.random.fork_rng(devices=[]):  # re-tying resets weights the file then overwrites
        for entry in entries:
            try:
                masks = from_dict(MaskConfig, entry["masks"], "tie.")
                masks.validate()
                cfg = from_dict(TieConfig, {**entry["tie"], "blocks": entry["blocks"], "init": "fresh",
                                            "relax_init": "zero"}, "tie.")
                cfg.validate()
                root = entry["root"]
                tie_with(model.get_submodule(root) if root else model, masks, cfg)
            except (ConfigError, AttributeError) as exc:
                raise TiedmaskError(f"{path}: the tie settings in its header do not fit this model ({exc}); "
                                    "load it into the architecture it was saved from") from None
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:  # missing, unexpected or differently shaped tensors
        detail = " ".join(str(exc).split())[:300]
        raise TiedmaskError(f"{path} does not fit this model ({detail})") from None
    return model
