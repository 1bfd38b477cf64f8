"""Claim 5 at real accuracy, step 3 of 3: each method's learning rate, chosen on the validation
split (carved from the training images) by the tuning sweep, and the test grid that runs it.

    tiedmask sweep benchmarks/grids/transfer_lora_tune.yaml --out runs/transfer-tune    # step 2
    python benchmarks/transfer_select.py runs/transfer-tune       # writes the step-3 grid
    tiedmask sweep benchmarks/grids/transfer_lora_test.yaml --out runs/transfer-test    # 3 seeds

The test grid is the tuning grid with the validation split removed (training sees all its
images, scoring is on the test set), each variant at its chosen learning rate, seeds 0-2.
The test set is never looked at to choose anything.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import yaml

from tiedmask.errors import ArgumentParser, TiedmaskError, run_script
from tiedmask.experiments.store import ResultsStore, setting

GRIDS = "benchmarks/grids"  # run from the repository root, as the grids' data paths expect
TEST_STORE = "runs/transfer-test"  # paper_claims.py names the claim after this folder


def chosen_rates(store: ResultsStore) -> dict[str, tuple[float, float]]:
    """method label -> (learning rate, mean validation accuracy) with the best accuracy."""
    scores: dict[str, dict[float, list[float]]] = {}
    for record in store.records():
        if record.get("status") != "ok":
            continue
        if record.get("eval_split") != "val":
            raise TiedmaskError(f"run {record['config_hash']} was scored on the test set, not a "
                               "validation split; tune with transfer_lora_tune.yaml")
        label = record["variant"].split(",")[0]
        scores.setdefault(label, {}).setdefault(setting(record, "optim.lr"), []).append(record["test_acc"])
    return {label: max(((lr, statistics.mean(a)) for lr, a in by_lr.items()), key=lambda t: t[1])
            for label, by_lr in scores.items()}


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="the tuning sweep's results store")
    parser.add_argument("--tune", default=f"{GRIDS}/transfer_lora_tune.yaml")
    parser.add_argument("--out", default=f"{GRIDS}/transfer_lora_test.yaml")
    args = parser.parse_args()
    chosen = chosen_rates(ResultsStore.existing(args.store))
    spec = yaml.safe_load(Path(args.tune).read_text())
    missing = [v["label"] for v in spec["variants"] if v["label"] not in chosen]
    if missing:
        raise TiedmaskError(f"no finished tuning runs for {missing}; finish the tuning sweep first")
    spec["base"]["data"].pop("val_split", None)
    spec.pop("grid", None)
    spec["variants"] = [{**v, "optim.lr": chosen[v["label"]][0]} for v in spec["variants"]]
    spec["seeds"] = [0, 1, 2]
    header = "".join(f"#   {label}: lr {lr:g} (validation accuracy {100 * acc:.2f}%)\n"
                     for label, (lr, acc) in sorted(chosen.items()))
    Path(args.out).write_text(
        "# Claim 5 at real accuracy, step 3 of 3 (written by benchmarks/transfer_select.py from the\n"
        f"# tuning store {args.store}): each method at the learning rate chosen on the validation split,\n"
        "# 3 seeds, scored on the test set.\n" + header +
        f"#   tiedmask sweep {args.out} --out {TEST_STORE}\n"
        + yaml.safe_dump(spec, sort_keys=False))
    print(header, end="")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
