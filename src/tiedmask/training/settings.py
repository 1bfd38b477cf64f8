"""Run settings: typed sections with defaults in code, then a YAML file, then `--key value`.

    model     ModelConfig (tiedmask.core.spec), with its masks and deq sections, resolved by
              its preset so that every number is written down
    data      which images, how adapted, subset and augmentation
    optim     optimiser and schedule
    finetune  transfer from a trained run (full, LoRA, multi-mask LoRA)
    (top)     epochs, time budget, batch sizes, seed, device and speed switches

Each section validates itself and `config_from_dict` validates the whole before anything
runs. Unknown or ill-typed keys are errors; YAML is read with `safe_load` only. Flat model
keys of older versions (`--mask_scope`, `model.deq_solver`, ...) still work: see
`tiedmask.training.migrate`.

>>> cfg = load_config(overrides=["--model.depth", "6", "--epochs", "2", "--density", "0.25"])
>>> cfg.model.depth, cfg.epochs, cfg.model.masks.density
(6, 2, 0.25)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core.presets import resolve_model
from ..core.spec import ModelConfig
from ..errors import ConfigError
from ..typed import from_dict, nested_fields
from .migrate import LEGACY_SOLVER_OPTIONS, MODEL_KEY_ALIASES, migrate_model

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("false", "true", "auto")  # training/compile_choice.py
OPTIMIZERS = ("adamw", "adam", "sgd")
AUGMENTS = ("auto", "crop_flip", "crop_altflip", "crop", "none")
TTAS = ("none", "flip", "flip_translate")
FINETUNE_METHODS = ("full", "lora", "multimask_lora")
TASKS = ("image", "lm")  # image classification | language modelling (next token)


def _choose(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} {value!r} is not one of {list(allowed)}")


def _at_least(section: str, obj, minimum: float, *keys: str) -> None:
    for key in keys:
        if not getattr(obj, key) >= minimum:
            raise ConfigError(f"{section}{key} must be >= {minimum:g}, got {getattr(obj, key)!r}")


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = ""  # "" -> $TIEDMASK_DATA or ~/.cache/tiedmask/data
    download: bool = False
    # auto picks crop_flip for natural images, crop for digits/clothes; crop_altflip mirrors
    # each image in every other epoch instead of at random
    augment: str = "auto"
    train_subset: int = 0  # train on a fixed random subset of this many images (0 = all)
    test_subset: int = 0  # evaluate on a fixed random subset of the test set (0 = all)
    channels: int = 0  # 0 = as stored; 3 repeats grey images, 1 averages colour (for transfer)
    image_size: int = 0  # 0 = as stored; else zero-pad (or resize) to this side (for transfer)
    # Hold this many training images out and evaluate on them instead of the test set (for
    # tuning hyperparameters without looking at the test set); 0 = evaluate on the test set.
    val_split: int = 0
    # Keep only these classes, relabelled 0..k-1 in this order (e.g. [0, 1, 2, 3, 4] to
    # pre-train on half of CIFAR-10 and [5, 6, 7, 8, 9] to transfer to the other half).
    classes: list = field(default_factory=list)

    def validate(self) -> None:
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.classes) \
                or len(set(self.classes)) != len(self.classes) or len(self.classes) == 1:
            raise ConfigError(f"data.classes must list two or more distinct class numbers >= 0, "
                              f"got {self.classes!r}")
        _choose("data.augment", self.augment, AUGMENTS)
        _choose("data.channels", self.channels, (0, 1, 3))
        _at_least("data.", self, 0, "train_subset", "test_subset", "image_size", "val_split")


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate, reached after warm-up
    weight_decay: float = 5e-2
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0
    label_smoothing: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    # Lookahead weight averaging (see `tiedmask.training.lookahead`): every this many steps the
    # slow weights move (1 - decay) of the way to the trained ones, which restart from them
    lookahead_every: int = 0  # 0 = off
    lookahead_decay: float = 0.8
    # sgd only: convolution filters take orthogonalised (Muon) steps at this peak learning rate,
    # on the same schedule (see `tiedmask.training.muon`); 0 = off, every parameter takes SGD steps.
    # Their weight decay is decoupled, as torch's Muon: p *= 1 - muon_lr * weight_decay, far weaker
    # than SGD's coupled decay at the same weight_decay
    muon_lr: float = 0.0
    # models with a whitening stem (tied-fast): its bias trains for this many epochs, then stays
    # (airbench trains it for 3); 0 = it trains throughout
    whiten_bias_epochs: int = 0

    def validate(self) -> None:
        _choose("optim.name", self.name, OPTIMIZERS)
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        _at_least("optim.", self, 0, "weight_decay", "momentum", "warmup_epochs", "label_smoothing",
                  "grad_clip", "lookahead_every", "lookahead_decay", "muon_lr", "whiten_bias_epochs")
        if self.muon_lr and self.name != "sgd":
            raise ConfigError(f"optim.muon_lr works with optim.name sgd, not {self.name}; set "
                              "optim.name sgd or optim.muon_lr 0")
        if self.momentum >= 1 or self.label_smoothing >= 1 or self.lookahead_decay >= 1:
            raise ConfigError("optim.momentum, optim.label_smoothing and optim.lookahead_decay "
                              "must be below 1")


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
    # multimask_lora: scale alpha by 1 / (n_masks * density^2), the inverse of the masks'
    # expected coverage of B·A, so the update starts as large as plain LoRA's (CapaBoost: no)
    rescale: bool = False

    def validate(self) -> None:
        _choose("finetune.method", self.method, FINETUNE_METHODS)
        _at_least("finetune.", self, 1, "rank", "n_masks")
        _at_least("finetune.", self, 0, "alpha")
        if not 0 < self.density <= 1:
            raise ConfigError(f"finetune.density must be in (0, 1], got {self.density}")


@dataclass
class LmConfig:
    """Language-model runs (`task: lm`, see `tiedmask.training.lm`): windows, tokenizer, distillation.
    The corpus is `data.name`, a folder of documents under `data.root` (training/corpus.py)."""

    seq_len: int = 256  # tokens per training and evaluation window
    tokenizer: str = "bpe"  # bpe: byte-level BPE trained on the training split | bytes
    vocab_size: int = 4096  # bpe only; a run started from another run takes its tokenizer
    # training tokens per epoch, as windows at random offsets; 0 = one pass over the training split
    epoch_tokens: int = 0
    # weight of the distillation term: loss = next-token loss + distill * T^2 KL(teacher || student)
    # at temperature T, the teacher's logits computed on the fly
    distill: float = 0.0
    teacher: str = ""  # run directory of the teacher; "" = finetune.init_from
    temperature: float = 1.0

    def validate(self) -> None:
        _choose("lm.tokenizer", self.tokenizer, ("bpe", "bytes"))
        _at_least("lm.", self, 2, "seq_len")
        _at_least("lm.", self, 0, "epoch_tokens", "distill")
        if 0 < self.epoch_tokens < self.seq_len:
            raise ConfigError(f"lm.epoch_tokens {self.epoch_tokens} is less than one window of lm.seq_len "
                              f"{self.seq_len}; give 0 (a pass over the training split) or at least {self.seq_len}")
        if self.tokenizer == "bpe" and not 258 <= self.vocab_size <= 1_000_000:
            raise ConfigError(f"lm.vocab_size must be in [258, 1000000] for a BPE tokenizer, got {self.vocab_size}")
        if not self.temperature > 0:
            raise ConfigError(f"lm.temperature must be > 0, got {self.temperature}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    task: str = "image"  # image | lm (the lm section then applies)
    lm: LmConfig = field(default_factory=LmConfig)
    epochs: int = 10
    time_budget_s: float = 0.0  # stop training after this many seconds (0 = no limit)
    batch_size: int = 128
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "auto"  # auto = cuda when present, else cpu
    precision: str = "auto"  # auto = bf16 on cuda, and on cpus with bf16 instructions (AMX, AVX512-BF16) where a timed step of the model agrees; else fp32 (training/precision.py)
    channels_last: str = "auto"  # auto = on for inputs of 32x32 and up (measured faster), else off
    # torch.compile the training forward: false | true | auto (a timed trial inside the run keeps
    # the faster: training/compile_choice.py); off by default (docs/architecture.md, per-machine choices)
    compile: str = "false"
    # flip: average the logits of each test image and its mirror image; flip_translate: also of
    # both shifted by one pixel either way along the diagonal (weights 1/2, 1/4, 1/4)
    eval_tta: str = "none"
    # score the test set after every this many epochs, and always after the last (0: only after
    # the last): sweeps that read only the final score save the evaluations' time (a run-time
    # key, not hashed: the trained run and its final score do not change; best_test_acc, the best
    # scored epoch, does)
    eval_every: int = 1
    threads: int = 0  # torch threads on cpu; 0 = all cores
    progress: bool = True

    def validate(self) -> None:
        self.model.validate()
        for section in (self.data, self.optim, self.finetune, self.lm):
            section.validate()
        _choose("task", self.task, TASKS)
        if self.task == "lm":
            self._validate_lm()
        elif self.lm != LmConfig():
            raise ConfigError("the lm section is read by language-model runs only; set task lm or drop it")
        _choose("device", self.device, DEVICES)
        _choose("precision", self.precision, PRECISIONS)
        _choose("channels_last", self.channels_last, ("auto", "true", "false"))
        _choose("compile", self.compile, COMPILE_MODES)
        _choose("eval_tta", self.eval_tta, TTAS)
        _at_least("", self, 1, "epochs", "batch_size", "eval_batch_size")
        _at_least("", self, 0, "threads", "time_budget_s", "eval_every")

    def _validate_lm(self) -> None:
        if not self.model.name.startswith("hf:"):
            raise ConfigError(f"task lm trains a Hugging Face causal language model (--model hf:llama, "
                              f"hf:gpt2, ...), not {self.model.name!r}")
        if self.model.execution == "equilibrium":
            raise ConfigError("task lm runs unrolled (tied) or untied, not equilibrium")
        if self.finetune.method != "full":
            raise ConfigError(f"task lm fine-tunes all weights (finetune.method full), not {self.finetune.method}; "
                              "relax a tied model with model.tie.relax instead")
        if self.lm.distill and not (self.lm.teacher or self.finetune.init_from):
            raise ConfigError("lm.distill needs a teacher: set lm.teacher (or finetune.init_from) to a trained run")
        if self.lm.teacher and not self.lm.distill:
            raise ConfigError("lm.teacher is set but lm.distill is 0, so nothing would be distilled; set "
                              "lm.distill > 0 or drop lm.teacher")
        ignored = [key for key, value, default in self._image_settings() if value != default]
        if ignored:
            raise ConfigError(f"{ignored[0]} is a setting of image runs, which task lm does not read; drop it")

    def _image_settings(self):
        """(key, value, default) of every setting that only image runs read."""
        sections = (("data.", self.data, DataConfig(), ("augment", "train_subset", "test_subset", "channels",
                                                           "image_size", "val_split", "classes")),
                    ("optim.", self.optim, OptimConfig(), ("lookahead_every", "muon_lr", "whiten_bias_epochs")),
                    ("", self, TrainConfig, ("eval_tta", "channels_last")))
        for prefix, section, defaults, keys in sections:
            for key in keys:
                yield prefix + key, getattr(section, key), getattr(defaults, key)


SECTIONS = ("model", "data", "optim", "finetune", "lm")
NAMED_SECTIONS = ("model", "data", "optim")  # `--data cifar10` stands for `--data.name cifar10`


def config_from_dict(values: dict) -> TrainConfig:
    """Build, resolve and validate a TrainConfig from a nested dict (as in YAML or JSON)."""
    if not isinstance(values, dict):
        raise ConfigError("a config must be a mapping of keys to values")
    values = dict(values)
    model = values.get("model", {})
    if isinstance(model, str):  # `model: tied-resnet-s`
        model = {"name": model}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping or a preset name, got {model!r}")
    values["model"] = ModelConfig()  # placeholder: the preset resolves the model section
    data = values.get("data", {})
    if isinstance(data, str):  # `data: digits`
        values["data"] = {"name": data}
    cfg = from_dict(TrainConfig, values)
    model_spec = resolve_model(migrate_model(model))
    cfg.model = model_spec.config
    cfg.validate()
    check_whitening_stem(cfg, model_spec.backbone.has_whitening_stem)  # before any run of a sweep starts
    return cfg


def check_whitening_stem(cfg: TrainConfig, has_whitening_stem: bool) -> None:
    """Refuse `optim.whiten_bias_epochs` for a model without a whitening stem."""
    if cfg.optim.whiten_bias_epochs and not has_whitening_stem:
        raise ConfigError(f"optim.whiten_bias_epochs needs a model with a whitening stem (tied-fast); "
                          f"{cfg.model.name} has none: set it to 0")


# ---------------------------------------------------------------- `--key value` overrides

def _leaf_index() -> dict[str, list[str]]:
    """Leaf name -> dotted keys, so that `--depth 6` can stand for `--model.depth 6`."""
    index: dict[str, list[str]] = {}
    for key, _ in nested_fields(TrainConfig):
        index.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    for section in NAMED_SECTIONS:
        index.setdefault(section, []).append(f"{section}.name")
    for old, new in MODEL_KEY_ALIASES.items():
        if f"model.{new}" not in index.setdefault(old, []):
            index[old].append(f"model.{new}")
    for old in LEGACY_SOLVER_OPTIONS:  # kept flat: which solver they belong to is known later
        index[old] = [f"model.{old}"]
    return index


def resolve_key(key: str) -> str:
    """The dotted key an override names: itself, a unique section path ending in it
    (`masks.density` -> `model.masks.density`), or a unique leaf (`depth` -> `model.depth`).
    A leaf in several places means the top level's, else the model's (`seed` is the run's
    seed, `density` the masks'); others must be spelled out."""
    fields = nested_fields(TrainConfig)
    full = [k for k, _ in fields]
    if key in full or key in [f"{s}.name" for s in NAMED_SECTIONS]:
        return key
    if any(t is dict and key.startswith(k + ".") for k, t in fields):  # an entry of a free mapping
        return key
    if "." in key:
        old = key.removeprefix("model.")
        if key.startswith("model.") and old in MODEL_KEY_ALIASES:
            return f"model.{MODEL_KEY_ALIASES[old]}"
        if key.startswith("model.") and old in LEGACY_SOLVER_OPTIONS:
            return key
        matches = [k for k in full if k.endswith("." + key)]
    else:
        matches = _leaf_index().get(key, [])
        if len(matches) > 1:
            preferred = [k for k in matches if "." not in k] or [k for k in matches if k.startswith("model.")]
            matches = preferred if len(preferred) == 1 else matches
    if len(matches) != 1:
        hint = f"ambiguous: use one of {matches}" if matches else "no such key"
        raise ConfigError(f"unknown override --{key} ({hint}); see `tiedmask train --help`")
    return matches[0]


def parse_overrides(args: list[str]) -> dict:
    """``["--model.depth", "6", "--lr=1e-3"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    given: dict[str, tuple[str, object]] = {}  # resolved key -> (as written, value): one value each
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
        written, key = key, resolve_key(key.replace("-", "_"))
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:  # thousands of nested brackets
            raise ConfigError(f"--{written}: its value nests too deeply to read; give a plain value") from None
        if value is None:
            value = raw
        if key in given and given[key][1] != value and given[key][0] != written:  # one flag twice: the last wins
            raise ConfigError(f"--{given[key][0]} and --{written} both set {key} ({given[key][1]!r} against "
                              f"{value!r}); give it once")
        given[key] = (written, value)
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key} conflicts with an earlier override of {p}")
        node[last] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section (a preset or dataset name counts as {name: ...})."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), (dict, str)):
            prev = out[k] if isinstance(out[k], dict) else {"name": out[k]}
            out[k] = merge(prev, v)  # old flat model keys are read once, after all layers
            if k == "model":
                _drop_overridden_spellings(out[k], v)
        else:
            out[k] = v
    return out


def drop_old_spelling(values: dict, key: str) -> None:
    """Remove the old flat spelling of `key` (`model.density` for `model.masks.density`) from
    `values`, once `key` was set over it by a later layer (a grid point, a variant, an override):
    the later one wins, as layers do."""
    model = values.get("model")
    for old, new in MODEL_KEY_ALIASES.items():
        if isinstance(model, dict) and key == f"model.{new}":
            model.pop(old, None)


def _drop_overridden_spellings(model: dict, later: dict) -> None:
    """`drop_old_spelling` for every new-style key the later model section `later` sets (an old
    spelling `later` gives itself stays, for the conflict check of `migrate_model`)."""
    for section, keys in later.items():
        for key in keys if isinstance(keys, dict) else ():
            if not any(old in later for old, new in MODEL_KEY_ALIASES.items() if new == f"{section}.{key}"):
                drop_old_spelling({"model": model}, f"model.{section}.{key}")


# ---------------------------------------------------------------- files and recipes

def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML or nests too deeply ({exc.__class__.__name__}); "
                          "fix it") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return values


RECIPES_DIR = Path(__file__).resolve().parent.parent / "resources" / "recipes"


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


# Keys that change how fast or from where a run goes, not what it trains or its final score: left
# out of the hash (so moving the data or adding threads keeps a store's results) and of resume checks.
RUNTIME_ONLY = ("threads", "progress", "compile", "data.root", "data.download", "eval_every")


# Keys added after results were stored, with the value every earlier run had: left out of the
# hash while they keep it, so that a store's earlier results still match their configs.
ADDED_LATER = {"model.tie.group": 1, "model.tie.strategy": "cycle", "task": "image",
               "lm": dataclasses.asdict(LmConfig())}


def without_runtime_keys(values: dict, prefix: str = "") -> dict:
    return {k: (without_runtime_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and prefix + k in SECTIONS else v)
            for k, v in values.items() if prefix + k not in RUNTIME_ONLY}


def _without_unchanged_additions(values: dict) -> dict:
    """`values` (a fresh dict of config_to_dict, changed in place) less ADDED_LATER's defaults."""
    for key, default in ADDED_LATER.items():
        *path, last = key.split(".")
        section = values
        for part in path:
            section = section.get(part, {}) if isinstance(section, dict) else {}
        if isinstance(section, dict) and last in section and section[last] == default:
            del section[last]
    return values


def config_hash(cfg: TrainConfig | dict) -> str:
    """A short stable hash of the resolved config (keys results stores and run directories)."""
    if isinstance(cfg, dict):
        cfg = config_from_dict(cfg)
    values = _without_unchanged_additions(without_runtime_keys(config_to_dict(cfg)))
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
