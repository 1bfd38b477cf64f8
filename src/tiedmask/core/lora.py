"""Multi-mask LoRA (CapaBoost, arXiv 2407.01320) for any nn.Linear or nn.Conv2d of any model.

    delta W = (alpha / r) * sum_i (B * M_B^i) @ (A * M_A^i)

One shared dense pair A [r, in], B [out, r] and n static masks per factor (kinds, density and
seed as in `tiedmask.core.masks`, named by the module path, so they are regenerated, never stored).
Stacking the masked copies gives the same update as one LoRA of rank n*r,

    A_cat = [A * M_A^1; ...; A * M_A^n]   (n r x in),   B_cat = [B * M_B^1, ..., B * M_B^n],
    delta W = (alpha / r) * B_cat @ A_cat,

whose rank can reach n*r for the parameters of rank r. With n = 1 and density 1 it is LoRA.
On a convolution A is a conv of the base's kernel to r channels and B a 1x1 conv (peft's
layout), W and the factors flattened to matrices over (in, kh, kw).

>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> net = apply_multimask_lora(net, targets=r"^0$", rank=2, n_masks=3, density=0.5)
>>> trainable_parameters(net)
32
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from ..files import atomic_write
from ..errors import ConfigError, TiedmaskError
from .masks import MaskBank, check_mask_settings


class MaskedFactor(torch.nn.Module):
    """A shared weight and n masks, acting as the stacked matrix of its masked copies.

    `stack_dim` 0 stacks rows (A: n r x in); 1 stacks columns (B: out x n r). Exposes `weight`
    (the stacked matrix), so code that reads a Linear's weight (peft's merge) works unchanged.
    """

    def __init__(self, shape, stack_dim: int, n_masks: int, kind: str, density: float, seed: int, name: str):
        super().__init__()
        self.shared = torch.nn.Parameter(torch.zeros(shape))
        self.stack_dim = stack_dim
        self.mask_bank = MaskBank(kind, tuple(shape), n_masks, density, seed, name)

    @property
    def masks(self) -> torch.Tensor:
        """The masks, [n, *shared.shape]."""
        return self.mask_bank.stack()

    def masked(self, index: int) -> torch.Tensor:
        """The shared factor under mask `index`."""
        return self.mask_bank.apply(self.shared, index)

    @property
    def weight(self) -> torch.Tensor:
        copies = self.shared.unsqueeze(0) * self.masks.to(self.shared.dtype)
        return torch.cat(list(copies), dim=self.stack_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MultiMaskLoRA(torch.nn.Module):
    """A frozen base layer plus a multi-mask LoRA update; `merge()` folds it into the base.

    Subclasses give the factors' shapes (`factor_shapes`) and how the update acts on an input
    (`update`)."""

    def __init__(self, base: torch.nn.Module, name: str, rank: int = 4, alpha: float | None = None,
                 n_masks: int = 2, density: float = 0.5, kind: str = "unstructured", seed: int = 0):
        super().__init__()
        if rank < 1 or n_masks < 1:
            raise ConfigError(f"rank and n_masks must be >= 1, got {rank} and {n_masks}")
        check_mask_settings(kind, "multi", density)
        a_shape, b_shape = self.factor_shapes(base, rank, name)
        self.base = base
        self.rank, self.n_masks = rank, n_masks
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.lora_A = MaskedFactor(a_shape, 0, n_masks, kind, density, seed, f"{name}.lora_A")
        self.lora_B = MaskedFactor(b_shape, 1, n_masks, kind, density, seed, f"{name}.lora_B")
        torch.nn.init.kaiming_uniform_(self.lora_A.shared, a=math.sqrt(5))  # B = 0: starts as the base
        self.merged = False

    @staticmethod
    def factor_shapes(base: torch.nn.Module, rank: int, name: str) -> tuple[tuple, tuple]:
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_B.weight.flatten(1) @ self.lora_A.weight.flatten(1)
        return self.scaling * delta.view_as(self.base.weight)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        out = self.base(x, *args)  # *args: a tied layer's mask index
        if self.merged:
            return out
        return out + self.scaling * self.update(x.to(self.lora_A.shared.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if getattr(self.base, "mask_bank", None) is not None:
            raise TiedmaskError("the update is added outside the base layer's masks, so merging it into the "
                                "masked shared weight would mask it too; keep this adapter unmerged")
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


class MultiMaskLoRALinear(MultiMaskLoRA):
    """On an nn.Linear: A [r, in], B [out, r]."""

    @staticmethod
    def factor_shapes(base: torch.nn.Linear, rank: int, name: str) -> tuple[tuple, tuple]:
        return (rank, base.in_features), (base.out_features, rank)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))


class MultiMaskLoRAConv2d(MultiMaskLoRA):
    """On an nn.Conv2d (a tied MaskedConv2d too): A is a conv of the base's kernel, stride and
    padding to r channels, B a 1x1 conv back, as peft's Conv2d LoRA."""

    @staticmethod
    def factor_shapes(base: torch.nn.Conv2d, rank: int, name: str) -> tuple[tuple, tuple]:
        if base.groups != 1:
            raise ConfigError(f"{name}: LoRA on a grouped convolution (groups={base.groups}) is not supported")
        out, inp, kh, kw = base.weight.shape
        return (rank, inp, kh, kw), (out, rank, 1, 1)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        hidden = F.conv2d(x, self.lora_A.weight, None, b.stride, b.padding, b.dilation)
        return F.conv2d(hidden, self.lora_B.weight)


ADAPTERS = {torch.nn.Linear: MultiMaskLoRALinear, torch.nn.Conv2d: MultiMaskLoRAConv2d}


def adapters(model: torch.nn.Module) -> dict[str, MultiMaskLoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiMaskLoRA)}


def apply_multimask_lora(model: torch.nn.Module, targets: str, rank: int = 4, alpha: float | None = None,
                         n_masks: int = 2, density: float = 0.5, kind: str = "unstructured",
                         seed: int = 0, train_also: str | None = None) -> torch.nn.Module:
    """Wrap every nn.Linear and nn.Conv2d whose qualified name matches the regex `targets`;
    freeze the rest.

    `train_also` is a regex of parameter names left trainable (e.g. a new head: ``head``).
    """
    pattern = re.compile(targets)
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, tuple(ADAPTERS)) and not isinstance(m, MultiMaskLoRA)]
    chosen = [(n, m) for n, m in layers if pattern.search(n)]
    if not chosen:
        raise ConfigError(f"no nn.Linear or nn.Conv2d module name matches {targets!r}; "
                          f"such modules: {[n for n, _ in layers][:12]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen:
        adapter = ADAPTERS[torch.nn.Linear if isinstance(module, torch.nn.Linear) else torch.nn.Conv2d]
        wrapped = adapter(module, name, rank, alpha, n_masks, density, kind, seed)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapped.to(module.weight.device))
    if train_also:
        keep = re.compile(train_also)
        for n, p in model.named_parameters():
            if keep.search(n) and "lora_" not in n:
                p.requires_grad_(True)
    model._multimask_lora = {"targets": targets, "rank": rank, "alpha": alpha, "n_masks": n_masks,
                             "density": density, "kind": kind, "seed": seed}
    return model


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_all(model: torch.nn.Module) -> None:
    for a in adapters(model).values():
        a.merge()


def unmerge_all(model: torch.nn.Module) -> None:
    for a in adapters(model).values():
        a.unmerge()


def save_adapter(model: torch.nn.Module, path: str | Path) -> None:
    """Only the adapter tensors (safetensors) and its settings (JSON, in the header)."""
    tensors = {f"{n}.{f}": getattr(a, f).shared.detach().cpu().contiguous()
               for n, a in adapters(model).items() for f in ("lora_A", "lora_B")}
    settings = json.dumps(getattr(model, "_multimask_lora", {}))
    atomic_write(Path(path), save(tensors, metadata={"multimask_lora": settings}))


def load_adapter(model: torch.nn.Module, path: str | Path) -> None:
    """Load tensors saved by `save_adapter` into a model with the same adapters applied."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise TiedmaskError(f"cannot read adapter {path} ({exc})") from None
    found = adapters(model)
    for key, value in tensors.items():
        name, factor = key.rsplit(".", 1)
        if name not in found:
            raise TiedmaskError(f"adapter {path} has {name!r}, which this model lacks; "
                                "apply_multimask_lora with the same targets first")
        getattr(found[name], factor).shared.data.copy_(value)
