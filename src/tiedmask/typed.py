"""Typed dataclasses from plain dicts (YAML, JSON, keyword arguments): unknown keys and
ill-typed values are errors that name the key, never silently ignored.

>>> from dataclasses import dataclass
>>> @dataclass
... class Optim:
...     lr: float = 0.1
...     steps: int = 10
>>> from_dict(Optim, {"lr": 1, "steps": 5}, "optim.")
Optim(lr=1.0, steps=5)
>>> from_dict(Optim, {"lr": "fast"}, "optim.")
Traceback (most recent call last):
...
tiedmask.errors.ConfigError: optim.lr must be a float, got 'fast'
"""

from __future__ import annotations

import dataclasses
import math
import typing

from .errors import ConfigError


def check_type(key: str, value, expected) -> object:
    """`value` as the `expected` scalar type (int -> float and YAML's '1e-3' -> float allowed)."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if expected is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if expected is str and isinstance(value, bool):  # `--channels_last true`: YAML reads a bool
        value = "true" if value else "false"
    if expected is list and isinstance(value, (str, tuple)):  # 'a,b' from a command line
        value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    if expected in (float, str, dict, list) and not isinstance(value, expected):
        raise ConfigError(f"{key} must be a {expected.__name__}, got {value!r}")
    return value


def from_dict(cls, values: dict, prefix: str = ""):
    """An instance of dataclass `cls` from `values`; nested dataclass fields take dicts."""
    if dataclasses.is_dataclass(values) and isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'a config'} must be a mapping of keys to values, "
                          f"got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; valid: {sorted(known)}")
    typed = {}
    for key, value in values.items():
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            typed[key] = from_dict(expected, value, f"{prefix}{key}.")
        else:
            typed[key] = check_type(prefix + key, value, expected)
    return cls(**typed)


def nested_fields(cls) -> list[tuple[str, type]]:
    """Every dotted leaf key of dataclass `cls` with its type, nested sections included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += [(f"{f.name}.{k}", t) for k, t in nested_fields(hints[f.name])]
        else:
            out.append((f.name, hints[f.name]))
    return out
