"""Typed run configs: dataclass defaults, then a YAML file, then ``--key value`` overrides.

Unknown or ill-typed keys are errors, never ignored. YAML is read with ``safe_load`` only.

>>> cfg = load_config(overrides=["--model.depth", "6", "--epochs", "2"])
>>> cfg.model.depth, cfg.epochs
(6, 2)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .models import ModelConfig, resolve_model_config

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw", "adam", "sgd")
AUGMENTS = ("auto", "crop_flip", "crop", "none")
TTAS = ("none", "flip")


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = ""  # "" -> $TIEDMASK_DATA or ~/.cache/tiedmask/data
    download: bool = False
    augment: str = "auto"  # auto picks crop_flip for natural images, crop for digits/clothes
    train_subset: int = 0  # train on a fixed random subset of this many images (0 = all)
    test_subset: int = 0  # evaluate on a fixed random subset of the test set (0 = all)
    channels: int = 0  # 0 = as stored; 3 repeats grey images, 1 averages colour (for transfer)
    image_size: int = 0  # 0 = as stored; else zero-pad (or resize) to this side (for transfer)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate, reached after warm-up
    weight_decay: float = 5e-2
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0
    label_smoothing: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 = off


@dataclass
class FinetuneConfig:
    init_from: str = ""  # run directory of the pre-trained model ("" = train from scratch)
    method: str = "full"  # full | lora | multimask_lora
    rank: int = 4
    alpha: float = 0.0  # LoRA scale alpha / rank; 0 means alpha = rank
    n_masks: int = 2  # multimask_lora: masked copies of the shared A and B
    density: float = 0.5  # multimask_lora: kept share of each copy
    targets: str = r"(qkv|proj|fc1|fc2)$"  # regex of nn.Linear names that get adapters
    train_head: bool = True  # re-initialise and train the classifier head


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    epochs: int = 10
    time_budget_s: float = 0.0  # stop training after this many seconds (0 = no limit)
    batch_size: int = 128
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "auto"  # auto = cuda when present, else cpu
    precision: str = "auto"  # auto = bf16 on cuda, fp32 on cpu (bf16 measured slower on cpu)
    channels_last: str = "auto"  # auto = on for inputs of 32x32 and up (measured faster), else off
    compile: bool = False  # torch.compile the model (measured no faster on this 2-core cpu)
    eval_tta: str = "none"  # flip: average the logits of each test image and its mirror image
    threads: int = 0  # torch threads on cpu; 0 = all cores
    progress: bool = True


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "finetune": FinetuneConfig}
FINETUNE_METHODS = ("full", "lora", "multimask_lora")


def _check_type(key: str, value, expected) -> object:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if expected in (float, str) and not isinstance(value, expected):
        raise ConfigError(f"{key} must be a {expected.__name__}, got {value!r}")
    return value


def _typed_section(cls, values: dict, prefix: str) -> dict:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; valid: {sorted(known)}")
    return {k: _check_type(prefix + k, v, hints[k]) for k, v in values.items()}


def config_from_dict(values: dict) -> TrainConfig:
    """Build and validate a TrainConfig from a nested dict (as in YAML)."""
    if not isinstance(values, dict):
        raise ConfigError("a config must be a mapping of keys to values")
    top = {k: v for k, v in values.items() if k not in SECTIONS}
    sections = {}
    for name, cls in SECTIONS.items():
        section = values.get(name, {})
        if isinstance(section, str) and name != "finetune":  # `model: tied-resnet-s` = {name: ...}
            section = {"name": section}
        if not isinstance(section, dict):
            raise ConfigError(f"{name} must be a mapping or a name, got {section!r}")
        sections[name] = _typed_section(cls, section, f"{name}.")
    top = _typed_section(TrainConfig, top, "")
    cfg = TrainConfig(
        model=resolve_model_config(sections["model"]),
        data=DataConfig(**sections["data"]),
        optim=OptimConfig(**sections["optim"]),
        finetune=FinetuneConfig(**sections["finetune"]),
        **top,
    )
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    choices = {
        "device": (cfg.device, DEVICES),
        "precision": (cfg.precision, PRECISIONS),
        "channels_last": (cfg.channels_last, ("auto", "true", "false")),
        "optim.name": (cfg.optim.name, OPTIMIZERS),
        "data.augment": (cfg.data.augment, AUGMENTS),
        "eval_tta": (cfg.eval_tta, TTAS),
        "data.channels": (cfg.data.channels, (0, 1, 3)),
        "finetune.method": (cfg.finetune.method, FINETUNE_METHODS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} {value!r} is not one of {list(allowed)}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if min(cfg.data.train_subset, cfg.data.test_subset, cfg.threads, cfg.time_budget_s) < 0:
        raise ConfigError("data.train_subset, data.test_subset, threads and time_budget_s must be >= 0")


def _leaf_index() -> dict[str, list[str]]:
    """Leaf name -> dotted keys, so that `--depth 6` can stand for `--model.depth 6`.

    A leaf in several sections is ambiguous unless the model has it: then the model's wins
    (`--density` is model.density; finetune.density must be spelled out).
    """
    index: dict[str, list[str]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            for sub in dataclasses.fields(SECTIONS[f.name]):
                index.setdefault(sub.name, []).append(f"{f.name}.{sub.name}")
            if f.name != "finetune":
                index.setdefault(f.name, []).append(f"{f.name}.name")
        else:
            index.setdefault(f.name, []).append(f.name)
    return index


def parse_overrides(args: list[str]) -> dict:
    """``["--model.depth", "6", "--lr=1e-3"]`` -> nested dict; values are parsed as YAML scalars."""
    leaves = _leaf_index()
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"expected an override like --model.depth 6, got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE")
            raw, i = args[i + 1], i + 1
        i += 1
        key = key.replace("-", "_")
        if "." not in key:
            matches = leaves.get(key, [])
            if f"model.{key}" in matches:  # a shared leaf name means the model's setting
                matches = [f"model.{key}"]
            if len(matches) != 1:
                hint = f"ambiguous: use one of {matches}" if matches else "no such key"
                raise ConfigError(f"unknown override --{key} ({hint}); see `tiedmask train --help`")
            key = matches[0]
        value = yaml.safe_load(raw) if raw != "" else ""
        if value is None:
            value = raw
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key} conflicts with an earlier override of {p}")
        node[last] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), (dict, str)):
            prev = out[k] if isinstance(out[k], dict) else {"name": out[k]}
            out[k] = merge(prev, v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({exc.__class__.__name__}); fix it") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return values


RECIPES_DIR = Path(__file__).parent / "resources" / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The YAML file of a recipe shipped with the package (`tiedmask train --recipe NAME`)."""
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; recipes: {recipe_names()}")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- CLI overrides."""
    values = read_yaml(path) if path else {}
    return config_from_dict(merge(values, parse_overrides(overrides or [])))


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


RUNTIME_ONLY = ("threads", "progress", "compile")  # change how fast a run goes, not what it computes


def config_hash(cfg: TrainConfig | dict) -> str:
    """A short stable hash of the resolved config (keys results stores and resumes)."""
    values = config_to_dict(cfg) if isinstance(cfg, TrainConfig) else cfg
    values = {k: v for k, v in values.items() if k not in RUNTIME_ONLY}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
