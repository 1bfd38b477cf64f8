"""Static boolean masks for shared weights.

A mask is a pure function of (seed, parameter name, application index): it is regenerated,
never stored, and is the same on every machine, in every process and on every device, whatever
order the model was built in. Scores come from a CPU generator seeded by a hash of that triple;
the mask keeps the highest-scoring entries under the rule of its kind.

Kinds (registry `MASK_KINDS`):
    unstructured  exactly round(density * numel) kept entries (at least one)
    nm            N:M along the reduction axis (in_features or in_channels*kh*kw), N = density*M
    channel       round(density * out) whole output filters kept

Scopes: ``dense`` (no mask), ``same`` (one mask for every application), ``multi`` (a distinct
mask per application).

>>> m = make_mask("unstructured", (8, 8), density=0.25, seed=0, name="w", index=0)
>>> int(m.sum())
16
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

MaskFn = Callable[[torch.Tensor, float, dict], torch.Tensor]
MASK_KINDS: dict[str, MaskFn] = {}
MASK_SCOPES = ("dense", "same", "multi")


def register_mask_kind(name: str) -> Callable[[MaskFn], MaskFn]:
    """Add a mask rule ``fn(scores, density, options) -> bool mask`` to the registry."""

    def wrap(fn: MaskFn) -> MaskFn:
        MASK_KINDS[name] = fn
        return fn

    return wrap


def stream_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed from (seed, name, index); blake2b makes it stable across Python runs."""
    digest = hashlib.blake2b(f"{seed}/{name}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def mask_scores(shape: tuple[int, ...], seed: int, name: str, index: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(stream_seed(seed, name, index))
    return torch.rand(shape, generator=generator, device="cpu")  # also under a meta-device build


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(k).indices] = True
    return mask.view_as(scores)


@register_mask_kind("unstructured")
def unstructured_mask(scores: torch.Tensor, density: float, options: dict) -> torch.Tensor:
    return _keep_top(scores, max(1, round(density * scores.numel())))


@register_mask_kind("nm")
def nm_mask(scores: torch.Tensor, density: float, options: dict) -> torch.Tensor:
    m = int(options.get("nm_m", 4))
    n = density * m
    if abs(n - round(n)) > 1e-9 or round(n) < 1:
        raise ConfigError(
            f"density {density} gives no whole N for N:M masks with M={m}; "
            f"use a multiple of 1/{m} (e.g. 0.5 for 2:{m}) or change model.nm_m"
        )
    rows = scores.reshape(scores.shape[0], -1)
    if rows.shape[1] % m:
        raise ConfigError(
            f"a weight of shape {tuple(scores.shape)} has {rows.shape[1]} inputs per output, "
            f"not a multiple of M={m}; choose a width divisible by {m} or another mask kind"
        )
    groups = rows.reshape(rows.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(round(n), dim=-1).indices, True)
    return keep.reshape(scores.shape)


@register_mask_kind("channel")
def channel_mask(scores: torch.Tensor, density: float, options: dict) -> torch.Tensor:
    per_filter = scores.reshape(scores.shape[0], -1)[:, 0]
    keep = _keep_top(per_filter, max(1, round(density * scores.shape[0])))
    return keep.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores).clone()


def make_mask(
    kind: str,
    shape: tuple[int, ...],
    density: float,
    seed: int,
    name: str,
    index: int,
    **options,
) -> torch.Tensor:
    """The boolean mask of `kind` for one parameter at one application index (on the CPU)."""
    check_mask_settings(kind, "multi", density)
    return MASK_KINDS[kind](mask_scores(tuple(shape), seed, name, index), density, options)


class MaskBank(nn.Module):
    """The static masks of one weight, one per mask index, as every masked weight keeps them:
    built-in layers (`core.layers`), weights tied by `core.tie` and multi-mask LoRA factors.

    Made from (kind, seed, name, index), never stored: the buffers are not persistent, so
    checkpoints hold weights only. Kept flat, ``[n, numel]``: a conv weight's stack would be
    5-D, and ``model.to(memory_format=torch.channels_last)`` fails on 5-D tensors. Channel
    masks also keep the indices of their kept output rows (``kept_rows``, ``[n, k]``), so a
    layer can compute those rows alone. `transposed`: the weight is stored (in, out) (GPT-2's
    Conv1D); masks are made for (out, in), as for a Linear, so that channel masks drop output
    features and N:M groups run along the reduction axis.
    """

    def __init__(self, kind: str, shape: tuple[int, ...], count: int, density: float, seed: int, name: str,
                 nm_m: int = 4, transposed: bool = False):
        super().__init__()
        self.shape = tuple(shape)
        made_shape = self.shape[::-1] if transposed else self.shape
        made = [make_mask(kind, made_shape, density, seed, name, i, nm_m=nm_m) for i in range(count)]
        rows = None
        if kind == "channel":
            rows = torch.stack([m.reshape(made_shape[0], -1)[:, 0].nonzero().flatten() for m in made])
        stack = torch.stack([m.t() if transposed else m for m in made])
        self.register_buffer("flat", stack.flatten(1), persistent=False)
        self.register_buffer("kept_rows", rows, persistent=False)
        self.outputs = made_shape[0]
        # convolutions place their kept filters by a product with a 0/1 matrix [out, kept] (`place`)
        placements = None if rows is None or len(made_shape) != 4 else torch.eye(self.outputs)[:, rows].permute(1, 0, 2)
        self.register_buffer("placements", placements, persistent=False)

    def __len__(self) -> int:
        return self.flat.shape[0]

    def mask(self, index: int) -> torch.Tensor:
        """Mask `index` in the weight's shape."""
        return self.flat[index].view(self.shape)

    def stack(self) -> torch.Tensor:
        """Every mask, ``[n, *shape]``."""
        return self.flat.view(-1, *self.shape)

    def apply(self, weight: torch.Tensor, index: int) -> torch.Tensor:
        """`weight` under mask `index`."""
        return weight * self.flat[index].view_as(weight)

    def density(self, index: int) -> float:
        return float(self.flat[index].float().mean())

    def place(self, part: torch.Tensor, index: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Channel masks: the output `part` of the kept rows of mask `index` alone (a layer that
        computed only those) put back among zeros, plus the layer's `bias`, which stays unmasked
        as in the dense layer (in the output's dtype, for autocast): the full layer's output.

        A convolution's (channels on dim 1) by a 1x1 convolution with the 0/1 placement matrix:
        a scatter into channels_last memory cost more than the half-size convolution itself (59 ms
        against 45 ms at 40 channels, 32x32, batch 64, one AMD EPYC core), and the product adds
        kept*out MACs per pixel, 1/9 of a 3x3 convolution's. A linear layer's (features on the last,
        contiguous dim) by an index-add: a placement product would cost kept*out MACs per token, as
        much as the half-size layer (9.6 against 11.9 ms forward + backward at width 128 with half
        kept, against 13.9 dense; 128x64 tokens, one AMD EPYC core)."""
        if self.placements is not None:
            out = F.conv2d(part, self.placements[index].to(part.dtype)[:, :, None, None])
            return out if bias is None else out + bias.to(out.dtype).view(-1, 1, 1)
        out = part.new_zeros(*part.shape[:-1], self.outputs).index_add(-1, self.kept_rows[index], part)
        return out if bias is None else out + bias.to(out.dtype)


def check_mask_settings(kind: str, scope: str, density: float) -> None:
    if kind not in MASK_KINDS:
        raise ConfigError(f"unknown mask kind {kind!r}; choose one of {sorted(MASK_KINDS)}")
    if scope not in MASK_SCOPES:
        raise ConfigError(f"unknown mask scope {scope!r}; choose one of {list(MASK_SCOPES)}")
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ConfigError(f"density {density!r} is outside (0, 1]; set model.masks.density in (0, 1]")


def num_masks(scope: str, depth: int) -> int:
    """How many distinct masks a tied cell applied `depth` times needs."""
    return {"dense": 0, "same": 1, "multi": depth}[scope]


def mask_index(scope: str, application: int) -> int | None:
    """Which mask application `application` (0-based) uses; None means dense."""
    return {"dense": None, "same": 0, "multi": application}[scope]


def mask_statistics(masks: torch.Tensor) -> dict:
    """Realised density and pairwise overlap of a stack of masks ``[n, *shape]``.

    Overlap of (i, j) is |M_i & M_j| / |M_i|: the share of i's kept weights that j keeps too.
    Independent random masks at density d overlap by about d; identical masks by 1.
    """
    flat = masks.reshape(masks.shape[0], -1).to(torch.float64)
    kept = flat.sum(1)
    densities = (kept / flat.shape[1]).tolist()
    overlaps = []
    for i, j in itertools.combinations(range(flat.shape[0]), 2):
        overlaps.append(float((flat[i] * flat[j]).sum() / kept[i]))
    return {
        "density": sum(densities) / len(densities),
        "densities": densities,
        "mean_overlap": sum(overlaps) / len(overlaps) if overlaps else math.nan,
        "overlaps": overlaps,
    }
