"""What each file of a run directory must hold, checked in one place before anything uses it.

A damaged or hand-edited file is one `TiedmaskError` naming the file, the field and the fix,
never a traceback from deep inside a loader, and never a value quietly used (a negative step, a
tensor file outside the run folder, a NaN accuracy).

    check_checkpoint(meta, path)     checkpoint.json
    check_metrics(text, path)        metrics.jsonl (rows; a torn last line is left out)
    check_data_stats(values, path)   data.json
    check_result(values, path)       result.json
    record_problem(record)           a line of a results store's results.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from ..errors import TiedmaskError
from .result import Result

# The names of a run folder's files, spelled here only (rundir.py and checkpoint.py export them).
TOKENIZER_FILE = "tokenizer.json"  # language-model runs: the tokenizer they were trained with
CORPUS_FILE = "corpus.json"  # language-model runs: which text, split and tokenized how
CONFIG_FILE = "config.json"
DATA_FILE = "data.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
REQUEST_FILE = "requested.yaml"  # what a sweep asked for
CHECKPOINT_FILE = "checkpoint.json"

RESTART = "the run must restart (delete the folder, or train it anew with another --out)"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _count(value) -> bool:
    return _is_int(value) and 0 <= value < 2**53


def _seconds(value) -> bool:
    return _is_number(value) and value >= 0


def _share(value) -> bool:
    return _is_number(value) and 0 <= value <= 1


def _loss(value) -> bool:  # NaN before any epoch trained (json writes it as NaN)
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (math.isnan(value) or (math.isfinite(value) and value >= 0)))


def _solver(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())


COMPILE_FIELDS = {  # what a run's steps ran and why: in its checkpoint and its result alike
    "compile_choice": (lambda v: v in ("", "eager", "compiled"), "'eager', 'compiled' or ''"),
    "compile_why": (lambda v: isinstance(v, str), "a text"),
}
CHECKPOINT_FIELDS = {  # field: (check, what it must be)
    "config_hash": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{6,64}", v) is not None,
                    "a hexadecimal hash"),
    "epoch": (_count, "a whole number >= 0"),
    "step": (_count, "a whole number >= 0"),
    "train_time_s": (_seconds, "a finite number of seconds >= 0"),
    "images": (_count, "a whole number >= 0"),
    "best_test_acc": (_share, "a number in [0, 1]"),
    "last_test_acc": (_share, "a number in [0, 1]"),
    "last_train_loss": (_loss, "a loss >= 0, or NaN"),
    "solver": (_solver, "a mapping of names to finite numbers"),
    "precision": (lambda v: v in ("", "bf16", "fp32"), "'bf16', 'fp32' or ''"),
    "precision_why": (lambda v: isinstance(v, str), "a text"),
    **COMPILE_FIELDS,
    "config": (lambda v: isinstance(v, dict), "a mapping of settings"),
    # tensors kept under one name only (tied embeddings): {other name: the name they are stored under}
    "aliases": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(n, str) and
                                                      k.startswith("model.") and n.startswith("model.")
                                                      for k, n in v.items()),
                "a mapping of 'model.' names to 'model.' names"),
}
REQUIRED = ("config_hash", "epoch", "tensor_file")


def tensor_file_name(epoch: int) -> str:
    """The tensor file of a checkpoint of `epoch`, a plain name inside the run folder."""
    return f"checkpoint-{epoch}.safetensors"


def check_checkpoint(meta, path: Path) -> dict:
    """checkpoint.json's values, each checked; its tensor file named as this epoch's, inside the folder."""
    where = f"{path}/{CHECKPOINT_FILE}"
    if not isinstance(meta, dict):
        raise TiedmaskError(f"{where} is damaged (not a JSON object); {RESTART}")
    for field in REQUIRED:
        if field not in meta:
            raise TiedmaskError(f"{where} is damaged (no {field}); {RESTART}")
    _check_fields(meta, CHECKPOINT_FIELDS, where, RESTART)
    if meta["tensor_file"] != tensor_file_name(meta["epoch"]):
        raise TiedmaskError(f"{where} is damaged (tensor_file is {_shown(meta['tensor_file'])}, not "
                            f"'{tensor_file_name(meta['epoch'])}' of its epoch); {RESTART}")
    if "optimizer" in meta:
        _check_optimizer(meta["optimizer"], where)
    return meta


def _check_optimizer(values, where: str) -> None:
    groups = values.get("param_groups") if isinstance(values, dict) else None
    scalars = values.get("scalars") if isinstance(values, dict) else None
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                             for g in groups)):
        raise TiedmaskError(f"{where} is damaged (optimizer.param_groups is not a list of groups); {RESTART}")
    if not (isinstance(scalars, dict) and all(re.fullmatch(r"\d+\.\w+", k) for k in scalars)):
        raise TiedmaskError(f"{where} is damaged (optimizer.scalars is not a mapping of 'N.name' keys); {RESTART}")


def check_metrics(text: str, path: Path) -> list[dict]:
    """The rows of metrics.jsonl. A last line without its newline that is no row was torn by a
    process killed while appending it (its epoch has no checkpoint): left out, and a resume
    drops it. Any other damaged line is an error naming it."""
    where = f"{path}/{METRICS_FILE}"
    lines = text.split("\n")
    torn = bool(lines) and lines[-1] != ""  # the file ends without its newline
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        last = number == len(lines)
        if last and torn and not _metrics_row_ok(row):
            return rows
        if not _metrics_row_ok(row):
            raise TiedmaskError(f"{where} line {number} is damaged (not an epoch's row of numbers); delete that "
                                "line, or the run folder to start again")
        rows.append(row)
    return rows


def _metrics_row_ok(row) -> bool:
    return (isinstance(row, dict) and _is_int(row.get("epoch")) and row["epoch"] >= 1
            and all(isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
                    for k, v in row.items()))  # NaN and inf included: a diverging epoch writes them


def check_data_stats(values, path: Path) -> dict:
    """data.json: per-channel mean and std of the training images and the input shape."""
    where = f"{path}/{DATA_FILE}"
    fix = f"{RESTART}, or delete data.json to recompute it from the data"
    if not isinstance(values, dict) or set(values) != {"mean", "std", "channels", "size", "classes"}:
        raise TiedmaskError(f"{where} is damaged (it must hold exactly mean, std, channels, size, classes); {fix}")
    for field in ("channels", "size", "classes"):
        if not (_is_int(values[field]) and 1 <= values[field] <= 1 << 20):
            raise TiedmaskError(f"{where} is damaged ({field} is {_shown(values[field])}, not a whole "
                                f"number >= 1); {fix}")
    for field, low in (("mean", -math.inf), ("std", 0.0)):
        series = values[field]
        if not (isinstance(series, list) and len(series) == values["channels"]
                and all(_is_number(v) and v > low for v in series)):
            raise TiedmaskError(f"{where} is damaged ({field} is not {values['channels']} finite numbers"
                                f"{' > 0' if low == 0 else ''}, one per channel); {fix}")
    return values


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


RESULT_FIELDS = {  # the fields a caller reads; others of Result are optional or informational
    "status": (lambda v: v in ("ok", "diverged"), "'ok' or 'diverged'"),
    "test_acc": (_share, "a number in [0, 1]"),
    "best_test_acc": (_share, "a number in [0, 1]"),
    "final_train_loss": (_loss, "a loss >= 0, or NaN"),
    "params": (_count, "a whole number >= 0"),
    "epochs": (_count, "a whole number >= 0"),
    "seed": (_is_int, "a whole number"),
    "train_time_s": (_seconds, "a finite number of seconds >= 0"),
    "img_per_s": (_seconds, "a finite number >= 0"),
    "config_hash": (lambda v: isinstance(v, str), "a hash"),
}
OPTIONAL_RESULT_FIELDS = {  # added later: results written before them lack them; checked where present
    "test_loss": (_loss, "a loss >= 0, or NaN"),  # language-model runs (NaN: a diverged run's)
    "test_ppl": (_loss, "a number >= 0, or NaN"),
    "val_ppl": (_loss, "a number >= 0, or NaN"),
    "tokens_per_s": (_seconds, "a finite number >= 0"),
    "data_epochs": (_seconds, "a finite number >= 0"),
    "precision_why": (lambda v: isinstance(v, str), "a text"),
    **COMPILE_FIELDS,
}
RECORD_FIELDS = {  # a results-store record: the run's Result (when finished) and how a sweep asked for it
    "status": (lambda v: v in ("ok", "diverged", "failed"), "'ok', 'diverged' or 'failed'"),
    "variant": (lambda v: isinstance(v, str), "a label"),
    "seed": (_is_int, "a whole number"),
    "config": (lambda v: isinstance(v, dict), "a mapping of settings"),
}


def check_result(values, path: Path) -> dict:
    """result.json: a finished run's Result, its numbers in range."""
    where = f"{path}/{RESULT_FILE}"
    fix = "delete result.json and `tiedmask train --resume` the run to finish it again"
    if not isinstance(values, dict):
        raise TiedmaskError(f"{where} is damaged (not a JSON object); {fix}")
    known = {f.name for f in dataclasses.fields(Result)}
    if unknown := sorted(set(values) - known):
        raise TiedmaskError(f"{where} is damaged (unknown field {unknown[0]!r}); {fix}")
    if missing := [f for f in RESULT_FIELDS if f not in values]:
        raise TiedmaskError(f"{where} is damaged (no {missing[0]}); {fix}")
    _check_fields(values, {**RESULT_FIELDS, **OPTIONAL_RESULT_FIELDS}, where, fix)
    return values


def _check_fields(values: dict, fields: dict, where: str, fix: str) -> None:
    """Each field present in `values` passes its check in `fields` ({name: (check, what)})."""
    for field, (check, what) in fields.items():
        if field in values and not check(values[field]):
            raise TiedmaskError(f"{where} is damaged ({field} is {_shown(values[field])}, not {what}); {fix}")


def record_problem(record: dict) -> str:
    """Why a results-store record cannot be used ("" if it can): a field of the wrong type, or
    a finished run's number out of range (a NaN accuracy would pass into tables unseen)."""
    fields = {**RECORD_FIELDS, **(RESULT_FIELDS if record.get("status") == "ok" else {}), **OPTIONAL_RESULT_FIELDS}
    for field, (check, what) in fields.items():
        if field in record and not check(record[field]):
            return f"{field} is {_shown(record[field])}, not {what}"
    return ""  # fields are checked where present: records of older versions lack some, and keep counting
