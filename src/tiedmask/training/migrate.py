"""Old spellings of settings, read once where files and arguments are read (config files,
`--key value` overrides, stored configs of runs and results stores, grid keys); the core and
everything after reading speaks today's keys only.

    model.mask_scope: same        ->  model.masks.scope: same        (MODEL_KEY_ALIASES)
    model.deq_anderson_m: 3       ->  model.deq.solver_options: {m: 3}   (LEGACY_SOLVER_OPTIONS)
    model.in_channels / image_size / num_classes: dropped (the data sets the input shape now)
"""

from __future__ import annotations

import inspect

from ..core.solvers import SOLVERS  # the registry, with any solver a user registered
from ..core.spec import DeqConfig
from ..errors import ConfigError

# Flat model keys of tiedmask <= 0.1 (YAML files, stored runs, `--mask_scope`) -> today's keys.
MODEL_KEY_ALIASES = {
    "mask_kind": "masks.kind", "mask_scope": "masks.scope", "density": "masks.density",
    "mask_seed": "masks.seed", "nm_m": "masks.nm_m",
    "deq_solver": "deq.solver", "deq_grad": "deq.grad", "deq_train_iter": "deq.train_iter",
    "deq_eval_iter": "deq.eval_iter", "deq_backward_iter": "deq.backward_iter",
    "deq_tol": "deq.tol", "deq_stop_mode": "deq.stop_mode", "deq_phantom_steps": "deq.phantom_steps",
    "deq_phantom_tau": "deq.phantom_tau", "deq_jac_reg": "deq.jac_reg",
}
# Old per-solver keys: options of one solver, kept only for it and only where they differ
# from the solver's own default (so an old run and its re-spelling hash alike).
LEGACY_SOLVER_OPTIONS = {"deq_anderson_m": ("anderson", "m"), "deq_anderson_lam": ("anderson", "lam"),
                         "deq_anderson_beta": ("anderson", "beta"), "deq_damping": ("fixed_point", "damping")}
DATA_SHAPE_KEYS = ("in_channels", "num_classes", "image_size")  # set by the data now


def migrate_model(values: dict) -> dict:
    """A model section with old flat keys moved to their sections (new keys win)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()
           if k not in MODEL_KEY_ALIASES and k not in LEGACY_SOLVER_OPTIONS and k not in DATA_SHAPE_KEYS}
    for old, new in MODEL_KEY_ALIASES.items():
        if old in values:
            section, key = new.split(".")
            if isinstance(out.setdefault(section, {}), dict):  # else from_dict names the problem
                if key in out[section] and out[section][key] != values[old]:
                    raise ConfigError(f"model.{old} ({values[old]!r}) and model.{new} ({out[section][key]!r}) "
                                      f"are one setting, given twice with different values; keep model.{new}")
                out[section].setdefault(key, values[old])
    deq = out.get("deq", {})
    solver = deq.get("solver", DeqConfig.solver) if isinstance(deq, dict) else None
    for old, (owner, key) in LEGACY_SOLVER_OPTIONS.items():
        if old in values and owner == solver and owner in SOLVERS:
            default = inspect.signature(SOLVERS[owner]).parameters[key].default
            if values[old] != default:
                out.setdefault("deq", {}).setdefault("solver_options", {}).setdefault(key, values[old])
    return out
