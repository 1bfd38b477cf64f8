"""Where and how a run computes: its device, memory layout and the names of its machine
(timings compare only within one machine)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from ..errors import ConfigError
from .precision import cpu_isa
from .settings import TrainConfig


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def use_channels_last(cfg: TrainConfig, image_size: int) -> bool:
    # auto: docs/architecture.md's table of per-machine choices (measured in docs/results.md §6)
    return cfg.channels_last == "true" or (cfg.channels_last == "auto" and image_size >= 32)


def hardware_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name, the vector instructions torch's kernels use
    (two CPUs of one model name can differ: AVX-512 on one machine, AVX2 on the next) and the
    threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu} ({cpu_isa()}), {torch.get_num_threads()} threads"


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def place(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The model on `device` in the memory layout training used (so evaluation of a saved run
    computes exactly what training's evaluation computed)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model
