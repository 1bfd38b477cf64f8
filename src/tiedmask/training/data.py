"""A run's data, prepared one way for every command (train, eval, analyze, finetune, bench,
sweep): load, adapt the images for transfer, take the fixed subsets, and normalisation
statistics that are computed once, saved with the run and reused, never recomputed.

>>> from tiedmask.training.settings import DataConfig
>>> data = prepare_data(DataConfig(name="digits", channels=3, image_size=16))
>>> tuple(data.test_x.shape[1:]), data.shape
((3, 16, 16), DataShape(channels=3, size=16, classes=10))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.spec import DataShape
from ..errors import ConfigError, DataError
from .datasets import Dataset, load_dataset
from .settings import DataConfig


@dataclass
class DataStats:
    """What a trained model needs to see its inputs as it saw them in training."""

    mean: list[float]  # per channel, in [0, 1] units, of the adapted training images
    std: list[float]
    channels: int
    size: int
    classes: int

    @property
    def shape(self) -> DataShape:
        return DataShape(self.channels, self.size, self.classes)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device))

    @classmethod
    def from_dict(cls, values: dict) -> DataStats:
        try:
            stats = cls(**values)
        except TypeError as exc:
            raise DataError(f"the run's data statistics are unreadable ({exc}); the run must restart") from None
        if len(stats.mean) != stats.channels or len(stats.std) != stats.channels:
            raise DataError("the run's data statistics do not match its channel count; the run must restart")
        return stats


@dataclass
class RunData:
    train_x: torch.Tensor  # uint8 [N, C, H, W], CPU
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    stats: DataStats
    augment: str  # the augmentation training uses (resolved from `auto`)
    name: str
    eval_split: str = "test"  # or "val": a split held out of the training images

    @property
    def shape(self) -> DataShape:
        return self.stats.shape


def prepare_data(cfg: DataConfig, stats: DataStats | None = None, dataset: Dataset | None = None,
                 train: bool = True) -> RunData:
    """The data of a run with settings `cfg`; `stats` of a trained run are reused as they are.

    `dataset` skips loading (a caller that holds it already); `train=False` keeps only what
    evaluation needs (the training images are dropped once the statistics exist).
    """
    ds = dataset or load_dataset(cfg.name, cfg.root, cfg.download)
    if cfg.classes:
        ds = keep_classes(ds, cfg.classes)
    train_x = adapt_images(ds.train_x, cfg.channels, cfg.image_size) if train or stats is None else None
    test_x = adapt_images(ds.test_x, cfg.channels, cfg.image_size)
    if stats is None:
        mean, std = channel_stats(train_x)
        stats = DataStats(mean.tolist(), std.tolist(), channels=test_x.shape[1], size=test_x.shape[-1],
                          classes=ds.num_classes)
    elif (stats.channels, stats.size, stats.classes) != (test_x.shape[1], test_x.shape[-1], ds.num_classes):
        raise DataError(
            f"{ds.name} as set in the run ({test_x.shape[1]} channels, side {test_x.shape[-1]}, "
            f"{ds.num_classes} classes) does not fit the model ({stats.channels} channels, side "
            f"{stats.size}, {stats.classes} classes); use the run's dataset, or fine-tune for a new one")
    train_y = ds.train_y
    if cfg.val_split:  # the evaluation set is carved from the training images; test is untouched
        if cfg.val_split >= len(ds.train_y):
            raise ConfigError(f"data.val_split {cfg.val_split} leaves no training images "
                              f"({len(ds.train_y)} in {ds.name}); choose fewer")
        train_x = train_x if train_x is not None else adapt_images(ds.train_x, cfg.channels, cfg.image_size)
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))
        held, kept = order[:cfg.val_split], order[cfg.val_split:]
        test_x, test_y = train_x[held], train_y[held]
        train_x, train_y = train_x[kept], train_y[kept]
    else:
        test_y = ds.test_y
    train_x, train_y = fixed_subset(train_x, train_y, cfg.train_subset) if train else (None, None)
    test_x, test_y = fixed_subset(test_x, test_y, cfg.test_subset)
    augment = ds.augment if cfg.augment == "auto" else cfg.augment
    return RunData(train_x, train_y, test_x, test_y, stats, augment, ds.name,
                   "val" if cfg.val_split else "test")


def keep_classes(ds: Dataset, classes: list[int]) -> Dataset:
    """`ds` with only the images of `classes`, labelled by their position in that list."""
    outside = [c for c in classes if c >= ds.num_classes]
    if outside:
        raise ConfigError(f"data.classes {outside} are not among {ds.name}'s {ds.num_classes} classes "
                          f"(0..{ds.num_classes - 1})")
    relabel = torch.full((ds.num_classes,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))

    def split(x, y):
        kept = relabel[y] >= 0
        return x[kept], relabel[y[kept]]

    (train_x, train_y), (test_x, test_y) = split(ds.train_x, ds.train_y), split(ds.test_x, ds.test_y)
    return dataclasses.replace(ds, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                               num_classes=len(classes))


def fixed_subset(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` of a seed-0 permutation: the same images for every run and variant."""
    if not n or n >= len(x):
        return x, y
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    return x[keep], y[keep]


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (sample) std of uint8 images, in [0, 1] units.

    Exact, from a 256-bin histogram per channel: a float64 copy of CIFAR-10 would take
    1.2 GB and dominate the peak memory of a small run.
    """
    counts = torch.stack([torch.bincount(images[:, c].flatten(), minlength=256)
                          for c in range(images.shape[1])]).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1)
    mean = (counts * values).sum(1) / n
    var = (counts * (values - mean[:, None]) ** 2).sum(1) / (n - 1)
    return mean.float(), var.sqrt().float().clamp_min(1e-3)


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


def normalize(batch_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = batch_uint8.float().div_(255)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment(x: torch.Tensor, kind: str, generator: torch.Generator,
            flips: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop after reflect-padding by 1/8 of the side (4 px at 32), and flips: random
    ones (`crop_flip`), or the given ones (`crop_altflip`, see `alternating_flips`).

    Batched on the tensor's device: one gather for the whole batch, no per-image Python loop.
    """
    if kind == "none":
        return x
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
    cols = (dx + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
    flat = padded.flatten(2)  # [n, c, (h+2p)*(w+2p)]
    index = (rows * (w + 2 * pad) + cols).view(n, 1, h * w).expand(n, c, h * w)
    out = flat.gather(2, index).view(n, c, h, w)
    if kind == "crop_flip":
        flips = torch.rand(n, device=x.device, generator=generator) < 0.5
    if kind == "crop_altflip" and flips is None:
        raise ValueError("crop_altflip mirrors the images it is given flips for (see alternating_flips)")
    if kind in ("crop_flip", "crop_altflip"):
        out = torch.where(flips.view(n, 1, 1, 1), out.flip(3), out)
    return out


def alternating_flips(images: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """Which training images are mirrored in `epoch` (from 1) under `crop_altflip`: a random
    half in odd epochs, the other half in even ones, so that every pair of epochs shows each
    image both ways (airbench's alternating flip; random flips repeat a view half the time)."""
    # A stream of its own: the bare seed also draws the initial weights.
    first = torch.rand(images, generator=torch.Generator().manual_seed(seed * 1_000_003 + 17)) < 0.5
    return (first ^ (epoch % 2 == 0)).to(device)
