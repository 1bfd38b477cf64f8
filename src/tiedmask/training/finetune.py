"""Transfer: start from a trained run, then train fully, with LoRA, or with multi-mask LoRA,
through the ordinary training pipeline (`train` calls `prepare_finetune`). The images of the
new dataset are adapted to the pre-trained model's input by `tiedmask.training.data`.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.lora import apply_multimask_lora
from ..errors import ConfigError
from .settings import TrainConfig


def attach_adapters(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The adapter structure of `cfg.finetune` (no weights loaded); `full` changes nothing."""
    ft = cfg.finetune
    if ft.method == "full" or not ft.init_from:
        return model
    multi = ft.method == "multimask_lora"
    alpha = ft.alpha or ft.rank
    if multi and ft.rescale:
        alpha /= ft.n_masks * ft.density**2  # E[sum_i (B*M_B^i)(A*M_A^i)] = n d^2 B A
    return apply_multimask_lora(
        model, ft.targets, rank=ft.rank, alpha=alpha,
        n_masks=ft.n_masks if multi else 1, density=ft.density if multi else 1.0,
        seed=cfg.model.masks.seed, train_also=r"^head\." if ft.train_head else None)


def pretrained_defaults(run) -> dict:
    """Config values a fine-tune inherits from the pre-trained `run` (a RunDir): its model,
    and its input shape, to which the new dataset's images are adapted."""
    cfg = run.read_config()
    if cfg.task != "image":
        raise ConfigError(f"{run.path} is a language-model run; `tiedmask uptrain` trains it on (finetune takes "
                          "image runs)")
    stats = run.read_stats()
    channels, size = (stats.channels, stats.size) if stats else _legacy_shape(run)
    return {"model": dataclasses.asdict(cfg.model), "data": {"channels": channels, "image_size": size},
            "finetune": {"init_from": str(run.path)}}


def _legacy_shape(run) -> tuple[int, int]:
    """Runs of tiedmask 0.1 kept the input shape in config.json's model section."""
    model = run.raw_config().get("model", {})
    return model.get("in_channels", 3), model.get("image_size", 32)


def prepare_finetune(model: torch.nn.Module, cfg: TrainConfig,
                     state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load the pre-trained weights `state` into `model`, reset its head, attach adapters."""
    ft = cfg.finetune
    if cfg.model.external:
        raise ConfigError(f"finetune works on tiedmask's own presets, not on {cfg.model.name}; fine-tune "
                          "a library model with tiedmask.tie(..., relax='lora') or with peft directly")
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
