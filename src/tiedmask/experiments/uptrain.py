"""`tiedmask uptrain RUN --tie "{...}"`: the settings that tie a trained language-model run and
train it on (Relaxed Recursive Transformers' uptraining): the run's own settings, its blocks
tied as `--tie` says (masks and tie settings in one mapping), its weights as the starting point
and, with `--distill W`, the untied run as the teacher. What it returns is a plain config, so a
sweep grid can ask for the same runs with the keys it sets (model.execution unrolled,
model.masks, model.tie, finetune.init_from, lm.distill, lm.epoch_tokens).
"""

from __future__ import annotations

import dataclasses
import math

import yaml

from ..core.spec import TieConfig
from ..errors import ConfigError
from ..training.rundir import RunDir
from ..training.settings import TrainConfig, config_from_dict, config_to_dict, merge, parse_overrides

MASK_KEYS = ("scope", "density", "kind", "seed")  # keys of --tie that set model.masks
TIE_KEYS = tuple(f.name for f in dataclasses.fields(TieConfig))


def parse_tie(text: str) -> tuple[dict, dict]:
    """(mask settings, tie settings) of a `--tie` mapping such as "{group: 3, scope: multi}"."""
    try:
        values = yaml.safe_load(text) if text.strip() else {}
    except (yaml.YAMLError, RecursionError):
        values = None
    if not isinstance(values, dict):
        raise ConfigError(f"--tie must be a mapping such as \"{{group: 3, strategy: cycle, scope: multi, "
                          f"density: 0.5, relax: lora, relax_rank: 16}}\", got {text!r}")
    unknown = sorted(str(k) for k in values if k not in MASK_KEYS + TIE_KEYS)
    if unknown:
        raise ConfigError(f"--tie: unknown key {unknown[0]!r}; keys: {', '.join(MASK_KEYS + TIE_KEYS)}")
    masks = {k: v for k, v in values.items() if k in MASK_KEYS}
    tie = {"init": "mean", **{k: v for k, v in values.items() if k in TIE_KEYS}}  # trained blocks: their mean
    return masks, tie


def _refuse_twice(extra: dict, masks: dict, tie: dict, tokens: int) -> None:
    """A setting given by `--tie` (or `--tokens`) and again by an override: one would win silently."""
    model = extra.get("model", {}) if isinstance(extra.get("model"), dict) else {}
    for section, given in (("masks", masks), ("tie", tie)):
        again = model.get(section, {}) if isinstance(model.get(section), dict) else {}
        for key in sorted(set(again) & set(given)):
            if again[key] != given[key]:
                raise ConfigError(f"--tie sets {key} {given[key]!r} and --model.{section}.{key} sets {again[key]!r}; "
                                  "give it once")
    if tokens and isinstance(extra.get("lm"), dict) and "epoch_tokens" in extra["lm"]:
        raise ConfigError("--tokens and --lm.epoch_tokens both set the tokens of an epoch; give one")


def uptrain_config(run_dir: str, tie: str, distill: float, tokens: int, overrides: list[str]) -> TrainConfig:
    """The settings of uptraining the untied language-model run `run_dir` tied as `tie` says,
    for `tokens` training tokens (0: the run's own epochs), distilling with weight `distill`."""
    base = RunDir(run_dir).read_config()
    if base.task != "lm" or base.model.execution != "untied":
        raise ConfigError(f"{run_dir} is not an untied language-model run (task {base.task}, execution "
                          f"{base.model.execution}); uptrain ties one trained with --task lm")
    if not (isinstance(distill, (int, float)) and distill >= 0 and math.isfinite(distill)):
        raise ConfigError(f"--distill must be a weight >= 0, got {distill!r}")
    if tokens < 0:
        raise ConfigError(f"--tokens must be >= 0, got {tokens}")
    masks, tie_values = parse_tie(tie)
    values = config_to_dict(base)
    values["model"]["execution"] = "unrolled"
    values["model"]["masks"].update(masks)  # the run's own (dense: it is untied) unless --tie says
    values["model"]["tie"] = {**dataclasses.asdict(TieConfig()), **tie_values}
    values["finetune"]["init_from"] = str(run_dir)
    values["lm"].update(distill=float(distill), teacher="")
    extra = parse_overrides(overrides)
    _refuse_twice(extra, masks, tie_values, tokens)
    values = merge(values, extra)
    epochs = values.get("epochs", base.epochs)
    if tokens and isinstance(epochs, int) and epochs >= 1:
        values["lm"]["epoch_tokens"] = math.ceil(tokens / epochs)
    return config_from_dict(values)
