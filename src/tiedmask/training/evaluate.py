"""Scoring a model on images: accuracy and loss over a test set, test-time augmentation views
(flip, flip + translate), and `score_run` for a saved run (`tiedmask eval`)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .data import RunData, normalize
from .distributed import Dist
from .precision import autocast_context, legacy_auto
from .rundir import load_trained
from .runtime import place, resolve_device, use_channels_last
from .settings import TTAS, TrainConfig


@torch.no_grad()
def evaluate(model, x_all, y_all, normalization: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig, device,
             ctx: Dist = Dist(), channels_last: bool = False) -> tuple[float, float]:
    """(accuracy, mean loss) over a uint8 image tensor, normalised by (mean, std) per channel;
    each process takes a slice of it."""
    mean, std = normalization
    model.eval()
    ctx.average_buffers(model)
    mine = range(ctx.rank, math.ceil(len(x_all) / cfg.eval_batch_size), ctx.world)
    correct, loss_sum = 0, 0.0
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for start in (b * cfg.eval_batch_size for b in mine):
        x = normalize(x_all[start:start + cfg.eval_batch_size].to(device), mean, std)
        x = x.contiguous(memory_format=layout)
        y = y_all[start:start + cfg.eval_batch_size].to(device)
        with autocast_context(device, cfg.precision):
            logits = tta_logits(model, x, cfg.eval_tta, layout)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    correct, loss_sum = ctx.sum(correct, loss_sum)
    return correct / len(x_all), loss_sum / len(x_all)


def score_run(run_dir, data_root: str = "", tta: str | None = None) -> tuple[float, float, TrainConfig, RunData]:
    """(accuracy, loss, settings, data) of a saved run on its evaluation images, as its training
    scored them, or with the test-time views `tta` (the run itself is not changed)."""
    if tta is not None and tta not in TTAS:  # before anything is loaded
        raise ConfigError(f"test-time augmentation {tta!r} is not one of {list(TTAS)}")
    model, cfg, data = load_trained(run_dir, data_root)
    if tta is not None:
        cfg = dataclasses.replace(cfg, eval_tta=tta)
    device = resolve_device(cfg)
    if cfg.precision == "auto":  # a run from before runs recorded their precision
        cfg = dataclasses.replace(cfg, precision=legacy_auto(device))
    mean, std = data.stats.tensors(device)
    channels_last = use_channels_last(cfg, data.shape.size)
    acc, loss = evaluate(place(model, device, channels_last), data.test_x, data.test_y, (mean, std), cfg,
                         device, channels_last=channels_last)
    return acc, loss, cfg, data


def tta_logits(model, x: torch.Tensor, tta: str, layout=torch.contiguous_format) -> torch.Tensor:
    """The model's logits for a batch in memory `layout`, averaged over the views of `tta`."""
    def mirrored(views: torch.Tensor) -> torch.Tensor:
        out = model(views).float()
        return out if tta == "none" else (out + model(views.flip(3)).float()) / 2

    logits = mirrored(x)
    if tta == "flip_translate":  # and the image shifted one pixel down-right and up-left
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = (padded[..., :h, :w], padded[..., 2:, 2:])
        logits = logits / 2 + sum(mirrored(v.contiguous(memory_format=layout)) for v in shifted) / 4
    return logits
