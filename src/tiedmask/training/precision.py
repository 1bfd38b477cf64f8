"""The number format a run computes in, and what `precision: auto` picks on this machine.

    auto on CUDA                 bf16 autocast
    auto on a CPU with AMX tiles bf16 autocast, if a timed step of the run's model agrees (below)
    auto on any other CPU        fp32

Why by instruction set: without AMX, bf16 matrix work on a CPU runs on AVX512-BF16 dot products
or is emulated, and measured slower than fp32 (0.6x on a 2-core Xeon without AMX, torch 2.13);
with AMX tiles (Intel Sapphire Rapids and later) the recipe's training step ran 2.3x faster
(docs/results.md §9), but a small ViT's ran at 0.53x and small GroupNorm ResNets' at 0.9-1.15x
on the same CPU. So the check times the run's own model, a training step of a copy of it both
ways (alternating rounds, once when a run starts, outside its clock), and keeps fp32 unless bf16
is at least 1.2x faster; that also covers a machine whose AMX is slow for another reason (a
hypervisor that hides the tiles' state, an old oneDNN). `TIEDMASK_PRECISION_CHECK=0` skips it
and lets the instruction set decide alone.

The measurements behind these choices: docs/architecture.md, "What `auto` picks on each machine".

A run records the precision it resolved to and why (`Result.precision`, `Result.precision_why`,
the checkpoint's state), so `eval` and `--resume` compute as training did on any machine.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from typing import Callable

import torch
from torch import nn

CHECK_VARIABLE = "TIEDMASK_PRECISION_CHECK"
MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much: it also costs a little accuracy per step
PROBE_STEP_S = 2.0  # a timed step's forward solves stop after this long (both ways alike)


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


def bf16_speedup(step: Callable[[bool], None]) -> float:
    """fp32 time / bf16-autocast time of `step(bf16)`, a training step of the run's own model:
    on one CPU bf16 paid 2.3x for the recipe's model and cost 0.53x for a small ViT
    (docs/architecture.md), so no stand-in layer can decide. Alternating rounds, best of 3
    each after a warm-up round; the random stream of the run is left where it was."""

    def timed(bf16: bool) -> float:
        start = time.perf_counter()
        step(bf16)
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.random.fork_rng(devices=[]):
        for _ in range(4):
            for bf16 in times:
                times[bf16].append(timed(bf16))
    return min(times[False][1:]) / min(times[True][1:])


def training_step(model: nn.Module, make_inputs: Callable[[], torch.Tensor]) -> Callable[[bool], None]:
    """A forward and backward pass of a copy of `model` on `make_inputs()` (the model itself, its
    gradients and its norm statistics stay untouched), under bf16 autocast or not; the copy and
    the inputs are made at the first call, so a run that never times costs nothing."""
    made: list = []

    def step(bf16: bool) -> None:
        if not made:
            made.extend((copy.deepcopy(model).train(), make_inputs()))
        probe, inputs = made
        if hasattr(probe, "set_deadline"):  # an equilibrium model's forward solves stop there
            probe.set_deadline(time.perf_counter() + PROBE_STEP_S)
        probe.zero_grad(set_to_none=True)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = probe(inputs)
        getattr(out, "logits", out).float().square().mean().backward()

    return step


def decide_precision(precision: str, device: torch.device,
                     step: Callable[[bool], None] | None = None) -> tuple[str, str]:
    """("bf16" or "fp32", why): what `precision` (auto | bf16 | fp32) means on `device`, for the
    model whose training step is `step` (`training_step`; without one, on a CPU with AMX tiles,
    the instruction set decides alone). The why is recorded with the run's result, so that runs
    of one comparison can be seen to have chosen alike."""
    if precision != "auto":
        return precision, "set"
    if device.type == "cuda":
        return "bf16", "auto: CUDA"
    if not has_amx():
        return "fp32", "auto: no AMX tiles on this CPU"
    if step is None or os.environ.get(CHECK_VARIABLE, "1") == "0":
        return "bf16", "auto: AMX tiles (step not timed)"
    try:
        speedup = bf16_speedup(step)
    except Exception as exc:  # noqa: BLE001  (a step that fails in bf16, a copy that does not fit)
        warnings.warn(f"precision auto: the timed bf16 check failed ({type(exc).__name__}: {exc}); "
                      "training in fp32", stacklevel=2)
        return "fp32", f"auto: the bf16 check failed ({type(exc).__name__})"
    chosen = "bf16" if speedup >= MIN_SPEEDUP else "fp32"
    return chosen, f"auto: a bf16 step ran {speedup:.2f}x as fast as fp32 (bf16 from {MIN_SPEEDUP}x)"


def resolve_precision(precision: str, device: torch.device, step: Callable[[bool], None] | None = None) -> str:
    """"bf16" or "fp32" (`decide_precision` without its why)."""
    return decide_precision(precision, device, step)[0]


def described(precision: str, why: str) -> str:
    """"bf16 (auto: ...)" for a log line; a precision set by the config needs no why."""
    return precision if why in ("", "set") else f"{precision} ({why})"


def legacy_auto(device: torch.device) -> str:
    """What `auto` meant before 0.3, for runs that did not record their precision."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast where `precision` means bf16 on `device`; nothing for fp32."""
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
