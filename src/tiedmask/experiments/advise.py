"""`tiedmask advise --params N [--flops F]`: the best measured configuration within a budget.

It only recommends what was measured: it reads results stores (default: the results this
project ships, measured on CIFAR-10 with the commands in docs/results.md) and names the runs
that back its answer.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..errors import TiedmaskError
from ..training.settings import TrainConfig, config_to_dict
from .store import ResultsStore, setting

SHIPPED = Path(__file__).resolve().parents[1] / "resources" / "measured_results.jsonl"
SETTINGS = ("execution", "width", "depth", "stages", "masks.density", "masks.kind", "masks.scope", "cell")
# How a run was trained and scored beyond its model and budget: recipe tricks (issue 13),
# augmentation other than the dataset's default, test-time augmentation, a class subset, a
# validation split (scoring held-out training images, not the test set). A run whose value
# differs from TrainConfig's default is kept apart from its plain twin.
TRAINING_EXTRAS = ("data.augment", "data.classes", "data.val_split", "eval_tta", "optim.lookahead_every",
                   "optim.lookahead_decay", "optim.muon_lr", "optim.whiten_bias_epochs")
_DEFAULTS = {"config": config_to_dict(TrainConfig())}


def ship(store: ResultsStore) -> int:
    """Add the store's finished runs that the shipped results lack (by config hash, re-keyed);
    returns how many. The shipped file only grows and takes only finished runs, so a failed or
    partial sweep cannot take runs out of what `advise` answers from."""
    shipped = ResultsStore(SHIPPED)
    have = {r["config_hash"] for r in shipped.records()}
    added = [r for r in store.records() if r.get("status") == "ok" and r["config_hash"] not in have]
    for record in added:
        shipped.append(record)
    (SHIPPED.parent / ".lock").unlink(missing_ok=True)  # the append's lock file is not for the package
    return len(added)


def _setting(record: dict) -> tuple:
    return tuple(setting(record, f"model.{k}") for k in SETTINGS)


def _budget(record: dict) -> str:
    """The training budget and regime of a run, so that runs of one setting at different budgets
    (a 2-epoch subset against full data) or trained differently (lookahead, Muon, alternating
    flips) are never averaged together."""
    images = setting(record, "data.train_subset") or "all"
    seconds = setting(record, "time_budget_s")
    length = f"{seconds:.0f} s" if seconds else f"{setting(record, 'epochs')} epochs"
    extras = [f"{key} {setting(record, key)}" for key in TRAINING_EXTRAS
              if setting(record, key) not in (None, setting(_DEFAULTS, key))]
    return ", ".join([f"{images} training images", length, *extras])


def load_records(paths: list[str | Path]) -> list[dict]:
    records = []
    for path in paths:
        store = ResultsStore(path)
        if not store.path.exists():
            raise TiedmaskError(f"no results at {store.path}; point --store at a bench or sweep directory")
        records += store.records()
    return records


def advise(params: int, flops: float | None = None, stores: list[str | Path] | None = None) -> str:
    for name, value in (("--params", params), ("--flops", flops)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise TiedmaskError(f"{name} must be a positive number, got {value}; e.g. --params 50000")
    stores = stores or [SHIPPED]
    # Fine-tuning runs (an adapter, or all weights from a pretrained start) measure a transfer,
    # not an architecture trained from scratch: they are not advise's to rank.
    records = [r for r in load_records(stores) if r.get("status") == "ok" and "params" in r
               and setting(r, "finetune.method") in (None, "full") and not setting(r, "finetune.init_from")]
    if not records:
        raise TiedmaskError("the results hold no finished runs; run `tiedmask sweep` first")
    fits = [r for r in records if r["params"] <= params
            and (flops is None or 2 * r.get("macs_effective", 0) <= flops)]
    if not fits:
        smallest = min(records, key=lambda r: r["params"])
        raise TiedmaskError(
            f"no measured configuration fits {int(params):,} parameters"
            + (f" and {flops:.3g} FLOPs" if flops else "")
            + f"; the smallest measured has {smallest['params']:,} parameters and "
            f"{2 * smallest.get('macs_effective', 0):.3g} FLOPs/img; raise the budget or run a sweep")
    groups: dict[tuple, list[dict]] = {}
    for r in fits:
        data = f"{setting(r, 'data.name')} ({_budget(r)})"
        groups.setdefault((data, _setting(r)), []).append(r)
    ranked = sorted(groups.items(), key=lambda kv: -statistics.mean(r["test_acc"] for r in kv[1]))
    lines = [f"budget: <= {int(params):,} parameters" + (f", <= {flops:.3g} FLOPs/img" if flops else ""),
             f"{len(fits)} measured runs fit ({len(groups)} settings) in {', '.join(map(str, stores))}", ""]
    for rank, ((data, values), rs) in enumerate(ranked[:3], 1):
        s = dict(zip(SETTINGS, values))
        accs = [r["test_acc"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"{rank}. {s['execution']} {s['cell']} width {s['width']}, depth {s['depth']}, "
            f"{s['masks.scope']} {s['masks.kind']} masks at density {s['masks.density']}: "
            f"{100 * statistics.mean(accs):.2f} ± {100 * sd:.2f}% on {data} "
            f"(n={len(rs)}, {rs[0]['params']:,} params, {2 * rs[0].get('macs_effective', 0) / 1e6:.1f} MFLOPs/img, "
            f"runs {', '.join(r['config_hash'] for r in rs)})")
    lines += ["", "Short budgets (a few epochs on CPU) favour fast learners; re-measure at your budget."]
    return "\n".join(lines)
