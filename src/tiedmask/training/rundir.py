"""The run directory: the one place that knows a run's files.

    config.json        the resolved settings (its hash keys results stores)
    data.json          the data statistics and input shape the model was trained on
    metrics.jsonl      one row per finished epoch
    checkpoint.json    + checkpoint-<epoch>.safetensors: weights, optimizer, RunState
    result.json        the final Result
    requested.yaml     what a sweep asked for (written by the runner)

`load_trained` gives eval, analyze and finetune the trained model, its settings and its data
exactly as training saw them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..core.presets import build_model
from ..errors import ConfigError, TiedmaskError
from ..files import atomic_write, atomic_write_json, read_json
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DataStats, RunData, prepare_data
from .finetune import attach_adapters
from .settings import TrainConfig, config_from_dict, config_to_dict

RUN_FILES = {"config.json", "data.json", "metrics.jsonl", "checkpoint.json", "result.json",
             "requested.yaml", "analysis"}


@dataclasses.dataclass
class RunState:
    """A run's progress, as its checkpoint keeps it."""

    config_hash: str
    epoch: int = 0
    step: int = 0
    train_time_s: float = 0.0
    images: int = 0
    best_test_acc: float = 0.0
    last_test_acc: float = 0.0
    last_train_loss: float = float("nan")
    solver: dict = dataclasses.field(default_factory=dict)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ------------------------------------------------------------ create or reopen

    @classmethod
    def create(cls, out: str | Path, resume: bool = False) -> RunDir:
        """Make `out` a run directory; refuse a finished run (unless resuming) or a foreign folder."""
        run = cls(out)
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            probe = run.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write to {run.path} ({exc.strerror}); choose another --out") from None
        if run.has_progress() and not resume:
            raise ConfigError(f"{run.path} already holds a run; continue it with "
                              f"`tiedmask train --resume {run.path}` or choose a new --out")
        foreign = sorted(p.name for p in run.path.iterdir() if not run._ours(p.name))
        if foreign:
            raise ConfigError(f"{run.path} holds files that are not a tiedmask run ({', '.join(foreign[:3])}); "
                              "choose an empty or new --out")
        return run

    @staticmethod
    def _ours(name: str) -> bool:
        return name in RUN_FILES or name.startswith(".") or (
            name.startswith("checkpoint-") and name.endswith(".safetensors"))

    def has_progress(self) -> bool:
        return (self.path / "checkpoint.json").exists() or (self.path / "result.json").exists()

    def is_finished(self) -> bool:
        return (self.path / "result.json").exists()

    # ------------------------------------------------------------ settings and data

    def write_config(self, cfg: TrainConfig) -> None:
        atomic_write_json(self.path / "config.json", config_to_dict(cfg))

    def read_config(self) -> TrainConfig:
        if not (self.path / "config.json").exists():
            raise TiedmaskError(f"{self.path} holds no run to resume or read (no config.json); "
                                "start one with `tiedmask train --out DIR`")
        try:
            return config_from_dict(read_json(self.path / "config.json"))
        except ConfigError as exc:
            raise ConfigError(f"{self.path}/config.json is not a config this version reads ({exc})") from None

    def write_stats(self, stats: DataStats) -> None:
        atomic_write_json(self.path / "data.json", dataclasses.asdict(stats))

    def read_stats(self) -> DataStats | None:
        """The saved data statistics; None for runs from before they were saved."""
        path = self.path / "data.json"
        return DataStats.from_dict(read_json(path)) if path.exists() else None

    # ------------------------------------------------------------ progress

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def keep_metrics_until(self, epoch: int) -> None:
        """Drop metrics of epochs after the checkpoint (written by an interrupted run)."""
        rows = [r for r in self.metrics() if r["epoch"] <= epoch]
        atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())

    def save_checkpoint(self, model: torch.nn.Module, optimizer, state: RunState) -> None:
        save_checkpoint(self.path, model, optimizer, dataclasses.asdict(state))

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict | None, RunState]:
        model_state, optimizer_state, meta = load_checkpoint(self.path)
        fields = {f.name for f in dataclasses.fields(RunState)}
        return model_state, optimizer_state, RunState(**{k: v for k, v in meta.items() if k in fields})

    def write_result(self, result: dict) -> None:
        atomic_write_json(self.path / "result.json", result)

    def read_result(self) -> dict:
        return read_json(self.path / "result.json")


def load_trained(run_dir: str | Path, data_root: str = "", device: str | torch.device = "cpu",
                 train_data: bool = False) -> tuple[torch.nn.Module, TrainConfig, RunData]:
    """(model with the run's last checkpoint, its settings, its data as training prepared it).

    The data statistics saved with the run are used as they are; `data_root` points at the
    dataset when it has moved.
    """
    run = RunDir(run_dir)
    cfg = run.read_config()
    if data_root:
        cfg.data.root = data_root
    data = prepare_data(cfg.data, stats=run.read_stats(), train=train_data)
    model = attach_adapters(build_model(cfg.model, data.shape), cfg)
    if not (run.path / "checkpoint.json").exists():
        raise TiedmaskError(f"{run.path} has no checkpoint yet; train it first "
                            f"(`tiedmask train --resume {run.path}`)")
    model_state, _, _ = run.load_checkpoint()
    try:
        model.load_state_dict(model_state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise TiedmaskError(f"{run.path}'s checkpoint does not fit its config ({first[:200]}); "
                            "was config.json edited?") from None
    return model.to(device), cfg, data
