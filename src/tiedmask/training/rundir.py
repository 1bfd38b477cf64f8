"""The run directory: the one place that knows a run's files.

    config.json        the resolved settings (its hash keys results stores)
    data.json          the data statistics and input shape the model was trained on
    metrics.jsonl      one row per finished epoch
    checkpoint.json    + checkpoint-<epoch>.safetensors: weights, optimizer, RunState
    result.json        the final Result
    tokenizer.json     language-model runs: their tokenizer; corpus.json: their text, split, token counts
    requested.yaml     what a sweep asked for (written by the runner)

`load_trained` gives eval, analyze and finetune the trained model, its settings and its data
exactly as training saw them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch

from ..core.presets import build_model
from ..errors import ConfigError, TiedmaskError
from ..files import atomic_write, atomic_write_json, read_json, writable_folder
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DataStats, RunData, prepare_data
# The run files' names live in run_schema.py; imported here for the modules that open runs.
from .run_schema import (CHECKPOINT_FILE, CONFIG_FILE, CORPUS_FILE, DATA_FILE, METRICS_FILE,  # noqa: F401
                         REQUEST_FILE, RESULT_FILE, TOKENIZER_FILE, check_checkpoint, check_data_stats,
                         check_metrics, check_result)
from .finetune import attach_adapters
from .settings import RUNTIME_ONLY, TrainConfig, config_from_dict, config_hash, config_to_dict

RUN_FILES = {CONFIG_FILE, DATA_FILE, METRICS_FILE, CHECKPOINT_FILE, RESULT_FILE, REQUEST_FILE, "analysis",
             TOKENIZER_FILE, CORPUS_FILE}


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
    precision: str = ""  # what the run's `precision` resolved to (bf16 | fp32); "" before 0.3
    precision_why: str = ""  # why: "set", or what `auto` found (the measured bf16 speedup)
    compile_choice: str = ""  # what the steps run: eager | compiled ("" while `compile: auto` is deciding)
    compile_why: str = ""  # why: "set", or what `auto`'s trial found (training/compile_choice.py)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ------------------------------------------------------------ create or reopen

    @classmethod
    def create(cls, out: str | Path, resume: bool = False) -> RunDir:
        """Make `out` a run directory; refuse a finished run (unless resuming) or a foreign folder."""
        run = cls(out)
        writable_folder(run.path, "choose another --out")
        if run.has_progress() and not resume:
            raise ConfigError(f"{run.path} already holds a run; continue it with "
                              f"`tiedmask train --resume {run.path}` or choose a new --out")
        foreign = sorted(p.name for p in run.path.iterdir() if not run._ours(p.name))
        if foreign:
            raise ConfigError(f"{run.path} holds files that are not a tiedmask run ({', '.join(foreign[:3])}); "
                              "choose an empty or new --out")
        run._remove_stale_temp_files()
        return run

    def _remove_stale_temp_files(self) -> None:
        """Temp files of atomic writes that a killed process left behind."""
        for path in self.path.glob(".*"):
            name = path.name[1:]
            if path.is_file() and (name.startswith("checkpoint-") or any(
                    name.startswith(f"{run_file}.") for run_file in RUN_FILES)):
                path.unlink(missing_ok=True)

    @staticmethod
    def _ours(name: str) -> bool:
        return name in RUN_FILES or name.startswith(".") or (
            name.startswith("checkpoint-") and name.endswith(".safetensors"))

    def has_progress(self) -> bool:
        return self.has_checkpoint() or self.is_finished()

    def is_finished(self) -> bool:
        return (self.path / RESULT_FILE).exists()

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT_FILE).exists()

    def resumable(self) -> bool:
        """Whether training continues this folder rather than starting over (one rule for every
        launcher): its settings and a checkpoint are there."""
        return (self.path / CONFIG_FILE).exists() and self.has_checkpoint()

    def checkpoint_epoch(self) -> int:
        """The epoch the checkpoint holds (checked as a resume would read it)."""
        return check_checkpoint(read_json(self.path / CHECKPOINT_FILE), self.path)["epoch"]

    def remove_unstarted(self) -> None:
        """The settings and metrics of a run that died before its first checkpoint (it restarts)."""
        for stale in (CONFIG_FILE, METRICS_FILE):
            (self.path / stale).unlink(missing_ok=True)

    # ------------------------------------------------------------ settings and data

    def write_config(self, cfg: TrainConfig) -> None:
        atomic_write_json(self.path / CONFIG_FILE, config_to_dict(cfg))

    def read_config(self) -> TrainConfig:
        if not (self.path / CONFIG_FILE).exists():
            raise TiedmaskError(f"{self.path} holds no run to resume or read (no config.json); "
                                "start one with `tiedmask train --out DIR`")
        try:
            return config_from_dict(read_json(self.path / CONFIG_FILE))
        except ConfigError as exc:
            raise ConfigError(f"{self.path}/config.json is not a config this version reads ({exc})") from None

    def raw_config(self) -> dict:
        """config.json as written, unread by today's settings (what older runs kept there)."""
        return read_json(self.path / CONFIG_FILE)

    def write_stats(self, stats: DataStats) -> None:
        atomic_write_json(self.path / DATA_FILE, dataclasses.asdict(stats))

    def read_stats(self) -> DataStats | None:
        """The saved data statistics; None for runs from before they were saved."""
        path = self.path / DATA_FILE
        return DataStats.from_dict(check_data_stats(read_json(path), self.path)) if path.exists() else None

    # ------------------------------------------------------------ progress

    def append_metrics(self, row: dict) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        """One row per finished epoch (a last line torn by a kill while appending is left out)."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return []
        try:  # undecodable bytes become U+FFFD: their line is then named as damaged (or torn)
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            raise TiedmaskError(f"cannot read {path} ({exc.strerror}); delete it to keep the run without its "
                                "curve") from None
        return check_metrics(text, self.path)

    def keep_metrics_until(self, epoch: int) -> None:
        """Drop metrics of epochs after the checkpoint (written by an interrupted run)."""
        rows = [r for r in self.metrics() if r["epoch"] <= epoch]
        atomic_write(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def save_checkpoint(self, model: torch.nn.Module, optimizer, state: RunState, cfg: TrainConfig) -> None:
        """Weights, optimizer and progress; the settings they were trained with ride along, so
        that a resume can name what changed in config.json since."""
        save_checkpoint(self.path, model, optimizer, {**dataclasses.asdict(state), "config": config_to_dict(cfg)})

    def epoch_keeper(self, model: torch.nn.Module, optimizer, state: RunState, cfg: TrainConfig):
        """The `Trainer` hook that keeps each finished epoch: its metrics row, then the checkpoint
        of the state that row ends (so the rows never run ahead of a checkpoint for long)."""

        def keep(row: dict) -> None:
            self.append_metrics(row)
            self.save_checkpoint(model, optimizer, state, cfg)

        return keep

    def restore(self, model: torch.nn.Module, optimizer, cfg: TrainConfig) -> RunState:
        """Load the checkpoint into `model` and `optimizer` after checking that it belongs to
        `cfg`: settings changed since (named), or weights that do not fit, are errors."""
        model_state, optimizer_state, state = self.load_checkpoint()
        saved = read_json(self.path / CHECKPOINT_FILE).get("config")
        if saved is not None:  # checkpoints of 0.1 hold only an old-style hash: nothing to compare
            with contextlib.suppress(ConfigError):  # read as today's config: keys added since match
                saved = config_to_dict(config_from_dict(saved))
            changed = _changed_keys(saved, config_to_dict(cfg))
            if changed:
                raise ConfigError(f"{self.path}/config.json differs from the settings its checkpoint was "
                                  f"trained with ({'; '.join(changed[:4])}); restore them or start a new run")
        with self._fitting("the run must restart"):
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
        state.config_hash = config_hash(cfg)
        return state

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict | None, RunState]:
        model_state, optimizer_state, meta = load_checkpoint(self.path)  # checked by run_schema
        values = {f.name: meta[f.name] for f in dataclasses.fields(RunState) if f.name in meta}
        return model_state, optimizer_state, RunState(**values)

    @contextlib.contextmanager
    def _fitting(self, fix: str):
        """Loading errors of weights that do not fit the model, as one line naming the fix."""
        try:
            yield
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise TiedmaskError(f"{self.path}'s checkpoint does not fit its config ({first[:200]}); {fix}") from None

    def write_result(self, result: dict) -> None:
        atomic_write_json(self.path / RESULT_FILE, result)

    def read_result(self) -> dict:
        return check_result(read_json(self.path / RESULT_FILE), self.path)


def load_trained(run_dir: str | Path, data_root: str = "", device: str | torch.device = "cpu",
                 train_data: bool = False) -> tuple[torch.nn.Module, TrainConfig, RunData]:
    """(model with the run's last checkpoint, its settings, its data as training prepared it).

    The data statistics saved with the run are used as they are; `data_root` points at the
    dataset when it has moved.
    """
    run = RunDir(run_dir)
    cfg = run.read_config()
    if cfg.task != "image":
        raise ConfigError(f"{run.path} is a language-model run: `tiedmask eval` scores it, `tiedmask analyze` "
                          "compares its layers and `tiedmask uptrain` ties it; finetune takes image runs")
    if data_root:
        cfg.data.root = data_root
    data = prepare_data(cfg.data, stats=run.read_stats(), train=train_data)
    model = attach_adapters(build_model(cfg.model, data.shape), cfg)
    if not run.has_checkpoint():
        raise TiedmaskError(f"{run.path} has no checkpoint yet; train it first "
                            f"(`tiedmask train --resume {run.path}`)")
    model_state, _, state = run.load_checkpoint()
    with run._fitting("was config.json edited?"):
        model.load_state_dict(model_state)
    if state.precision:  # compute as training did, whatever `auto` means on this machine
        cfg.precision = state.precision
    return model.to(device), cfg, data


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every setting that differs (runtime-only switches ignored)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" not in RUNTIME_ONLY:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed
