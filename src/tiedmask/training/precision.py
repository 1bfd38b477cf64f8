"""The number format a run computes in, and what `precision: auto` picks on this machine.

    auto on CUDA                 bf16 autocast
    auto on a CPU with AMX tiles bf16 autocast, if a one-time timed check agrees (below)
    auto on any other CPU        fp32

Why by instruction set: without AMX, bf16 matrix work on a CPU runs on AVX512-BF16 dot products
or is emulated, and measured slower than fp32 (0.6x on a 2-core Xeon without AMX, torch 2.13);
with AMX tiles (Intel Sapphire Rapids and later) the recipe's training step ran 2.4x faster
(docs/results.md §9). The check times one convolution's forward and backward both ways (about a
second, once per process) so that a machine whose AMX is slow for another reason (a hypervisor
that hides the tiles' state, an old oneDNN) keeps fp32. `TIEDMASK_PRECISION_CHECK=0` skips it
and lets the instruction set decide alone.

The measurements behind these choices: docs/architecture.md, "What `auto` picks on each machine".

A run records the precision it resolved to (`Result.precision`, the checkpoint's state), so
`eval` and `--resume` compute as training did on any machine.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch
import torch.nn.functional as F

CHECK_VARIABLE = "TIEDMASK_PRECISION_CHECK"
MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much: it also costs a little accuracy per step


def has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles that torch can use."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.3
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def cpu_isa() -> str:
    """The vector instructions torch's CPU kernels use, with AMX named where present
    ("AVX512, AMX")."""
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{isa}, AMX" if has_amx() else isa


@functools.lru_cache(maxsize=None)
def bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of a training step of one 3x3 convolution (112 channels,
    16x16, batch 128, channels_last: the recipe's middle stage), best of 3 rounds each."""
    with torch.random.fork_rng(devices=[]):  # the check must not move a run's random stream
        x = torch.randn(128, 112, 16, 16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(112, 112, 3, 3, requires_grad=True)

    def step(dtype) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = F.conv2d(x, w, padding=1)
        out.float().square().mean().backward()
        return time.perf_counter() - start

    times = {"fp32": [], "bf16": []}
    for _ in range(4):  # alternating rounds; the first of each warms the kernels up
        for dtype in times:
            times[dtype].append(step(dtype))
    return min(times["fp32"][1:]) / min(times["bf16"][1:])


def resolve_precision(precision: str, device: torch.device) -> str:
    """"bf16" or "fp32": what `precision` (auto | bf16 | fp32) means on `device`."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if not has_amx():
        return "fp32"
    if os.environ.get(CHECK_VARIABLE, "1") == "0":
        return "bf16"
    return "bf16" if bf16_speedup() >= MIN_SPEEDUP else "fp32"


def legacy_auto(device: torch.device) -> str:
    """What `auto` meant before 0.3, for runs that did not record their precision."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast where `precision` means bf16 on `device`; nothing for fp32."""
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
