"""Checkpoints: safetensors for tensors, JSON for everything else.

Nothing here unpickles: loading a checkpoint a user hands us cannot run code. A checkpoint is
``checkpoint.json`` naming its tensor file ``checkpoint-<epoch>.safetensors``; the tensor file
is written first and the JSON replaced last, so a crash at any moment leaves a consistent pair.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..errors import TiedmaskError
from ..files import atomic_write, atomic_write_json, read_json
from .run_schema import CHECKPOINT_FILE, check_checkpoint, tensor_file_name


def _split_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, entries in opt_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _without_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors once each (safetensors refuses a tensor under two names, such as a language
    model's input embedding tied to its output layer), and {other name: name kept}."""
    kept, aliases, seen = {}, {}, {}
    for name, value in state.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
               value.dtype)
        if value.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = value.detach().cpu().contiguous()
    return kept, aliases


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer, state: dict) -> None:
    """Write model + optimizer tensors and the JSON `state` (epoch, metrics, ...) atomically."""
    run_dir = Path(run_dir)
    tensors, aliases = _without_aliases({f"model.{k}": v for k, v in model.state_dict().items()})
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensor_file = tensor_file_name(state["epoch"])
    atomic_write(run_dir / tensor_file, save(tensors))
    previous = run_dir / CHECKPOINT_FILE
    old_file = read_json(previous).get("tensor_file") if previous.exists() else None
    atomic_write_json(previous, {**state, "tensor_file": tensor_file, "optimizer": opt_meta,
                                 **({"aliases": aliases} if aliases else {})})
    if old_file and old_file != tensor_file:
        (run_dir / old_file).unlink(missing_ok=True)


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(model state_dict, optimizer state_dict or None, JSON state) of a run directory."""
    run_dir = Path(run_dir)
    meta = check_checkpoint(read_json(run_dir / CHECKPOINT_FILE), run_dir)
    path = run_dir / meta["tensor_file"]  # a plain file name of this epoch (checked)
    try:
        tensors = load_file(path)
    except Exception as exc:
        raise TiedmaskError(f"cannot read checkpoint tensors {path} ({exc}); the run must restart") from None
    for name, kept in meta.get("aliases", {}).items():
        if kept not in tensors or name in tensors:
            raise TiedmaskError(f"{run_dir}/checkpoint.json is damaged (alias {name} of {kept} does not match "
                                f"the tensors of {path}); the run must restart")
        tensors[name] = tensors[kept]
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optimizer_state = _join_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
    return model_state, optimizer_state, meta
