"""Transfer: start from a trained run, adapt inputs, then train fully, with LoRA, or with
multi-mask LoRA, through the ordinary training pipeline (`train` calls `prepare_finetune`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, read_json
from .config import TrainConfig
from .data import Dataset
from .errors import ConfigError
from .lora import apply_multimask_lora


def adapt_images(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> `channels` channels and side `size` (zero-padded, or resized)."""
    if channels and x.shape[1] != channels:
        if channels == 3 and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif channels == 1:
            x = x.float().mean(1, keepdim=True).round().to(torch.uint8)
        else:
            raise ConfigError(f"cannot turn {x.shape[1]} channels into {channels}")
    if size and x.shape[-1] != size:
        if x.shape[-1] < size:  # pad: keeps pixels exact (Fashion-MNIST 28 -> 32)
            total = size - x.shape[-1]
            x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
        else:
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
    return x


def adapt_dataset(ds: Dataset, channels: int, size: int) -> Dataset:
    if not channels and not size:
        return ds
    return Dataset(ds.name, adapt_images(ds.train_x, channels, size), ds.train_y,
                   adapt_images(ds.test_x, channels, size), ds.test_y, ds.num_classes, ds.augment)


def attach_adapters(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The adapter structure of `cfg.finetune` (no weights loaded); `full` changes nothing."""
    ft = cfg.finetune
    if ft.method == "full" or not ft.init_from:
        return model
    multi = ft.method == "multimask_lora"
    return apply_multimask_lora(
        model, ft.targets, rank=ft.rank, alpha=ft.alpha or None,
        n_masks=ft.n_masks if multi else 1, density=ft.density if multi else 1.0,
        seed=cfg.model.mask_seed, train_also=r"^head\." if ft.train_head else None)


def pretrained_defaults(run_dir: str) -> dict:
    """Config values a fine-tune inherits from the pre-trained run: its model and input shape."""
    values = read_json(Path(run_dir) / "config.json")
    model = values["model"]
    return {"model": model, "data": {"channels": model["in_channels"], "image_size": model["image_size"]},
            "finetune": {"init_from": str(run_dir)}}


def prepare_finetune(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Load the pre-trained weights into `model`, reset its head, attach adapters."""
    ft = cfg.finetune
    state, _, _ = load_checkpoint(ft.init_from)
    head_keys = [k for k in state if k.startswith("head.")]
    own = model.state_dict()
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape and k not in head_keys]
    if mismatched:
        raise ConfigError(f"the pre-trained run's weights {mismatched[:3]} do not fit this model; "
                          "use the same model settings and set data.channels / data.image_size")
    model.load_state_dict({k: v for k, v in state.items() if k not in head_keys}, strict=False)
    if ft.train_head or any(own[k].shape != state[k].shape for k in head_keys):
        model.head.reset_parameters()
    elif head_keys:
        model.head.load_state_dict({k[len("head."):]: state[k] for k in head_keys})
    return attach_adapters(model, cfg)
