"""The number format a run computes in, and what `precision: auto` picks on this machine.

    auto on CUDA                          bf16 autocast
    auto on a CPU with AMX tiles          bf16 autocast, if a timed step of the run's model agrees
    auto on a CPU with AVX512-BF16 only   bf16 autocast, if a timed step of the run's model agrees
    auto on any other CPU                 fp32 (bf16 is emulated there)

Why timed, and not by instruction set alone: bf16 paid 2.3x for the recipe's training step on
a 2-core Xeon with AMX tiles but cost 0.53x for a small ViT and 0.9-1.15x for small GroupNorm
ResNets on the same CPU (docs/results.md §9); with AVX512-BF16 dot products and no AMX it cost
0.24-0.66x on a 2-core Xeon (§6) and paid 1.5-1.9x for the recipe's model on a 2-core AMD EPYC
(§9). So where the CPU has bf16 instructions at all, the check times the run's own model, a
training step of a copy of it both ways (alternating rounds, once when a run starts, outside
its clock), and keeps fp32 unless bf16 is at least 1.2x faster; that also covers a machine
whose AMX is slow for another reason (a hypervisor that hides the tiles' state, an old oneDNN).
`TIEDMASK_PRECISION_CHECK=0` skips it and lets the instruction set decide alone: bf16 with
AMX tiles, fp32 without (AVX512-BF16 alone went either way).

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


def _torch_reports(probe_name: str) -> bool:
    """What torch's CPU probe `torch.cpu.<probe_name>()` says; False where this torch lacks it."""
    probe = getattr(torch.cpu, probe_name, None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles that torch can use (probe since torch 2.3)."""
    return _torch_reports("_is_amx_tile_supported")


def has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 dot products (with or without AMX tiles)."""
    return _torch_reports("_is_avx512_bf16_supported")


def bf16_instructions() -> str:
    """The bf16 matrix instructions this CPU gives torch: "AMX", "AVX512-BF16", or "" where bf16
    is emulated in fp32 arithmetic."""
    return "AMX" if has_amx() else "AVX512-BF16" if has_avx512_bf16() else ""


def cpu_isa() -> str:
    """The vector instructions torch's CPU kernels use, with the bf16 ones named where present
    ("AVX512, AMX"; "AVX512, AVX512-BF16")."""
    isa, bf16 = torch.backends.cpu.get_cpu_capability(), bf16_instructions()
    return f"{isa}, {bf16}" if bf16 else isa


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
    model whose training step is `step` (`training_step`; without one, on a CPU with bf16
    instructions, the instruction set decides alone). The why is recorded with the run's result, so that runs
    of one comparison can be seen to have chosen alike."""
    if precision != "auto":
        return precision, "set"
    if device.type == "cuda":
        return "bf16", "auto: CUDA"
    bf16 = bf16_instructions()
    if not bf16:
        return "fp32", "auto: no bf16 instructions on this CPU (AMX or AVX512-BF16)"
    if step is None or os.environ.get(CHECK_VARIABLE, "1") == "0":
        # untimed, only AMX tiles decide for bf16: AVX512-BF16 alone paid on one CPU, cost on another
        return ("bf16", "auto: AMX tiles (step not timed)") if bf16 == "AMX" else \
            ("fp32", "auto: AVX512-BF16 without AMX tiles (step not timed)")
    try:
        speedup = bf16_speedup(step)
    except Exception as exc:  # noqa: BLE001  (a step that fails in bf16, a copy that does not fit)
        warnings.warn(f"precision auto: the timed bf16 check failed ({type(exc).__name__}: {exc}); "
                      "training in fp32", stacklevel=2)
        return "fp32", f"auto: the bf16 check failed ({type(exc).__name__})"
    chosen = "bf16" if speedup >= MIN_SPEEDUP else "fp32"
    return chosen, f"auto: a bf16 step ran {speedup:.2f}x as fast as fp32 on {bf16} (bf16 from {MIN_SPEEDUP}x)"


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
