"""Claim 2 at real accuracy: do tied applications compute near-identical features?

Runs `tiedmask analyze` (minibatch unbiased linear CKA between the states after each
application, on 1,000 test images) on every finished run of the claim grids' stores, and
tabulates the mean off-diagonal and adjacent CKA per stage for each variant, mean ± std over
seeds. Untied networks of the same shape are the reference the paper lacks: how similar are
consecutive layers when nothing is tied?

    python benchmarks/claims_cka.py runs/paper-claims-fast [runs/paper-claims-depth8 ...] [--docs]

Writes benchmarks/results/claims_cka.json (one entry per run) and, with --docs, the table into
docs/results.md between its markers. A minute per store of five runs on 2 CPU cores. A run
already in the JSON (same config, same image count) is not analysed again unless `--redo`
and its checkpoint is here, so a store restored from its results.jsonl alone, checkpoints
gone, keeps its rows; rows of stores not named on the command line stay too.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from paper_claims import mean_sd, write_into_docs  # this folder's sibling script
from tiedmask.analysis.analyze import analyze_run
from tiedmask.errors import ArgumentParser, run_script
from tiedmask.experiments.store import ResultsStore, setting
from tiedmask.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "claims_cka.json"
MARKERS = ("<!-- claims-cka-table: written by benchmarks/claims_cka.py --docs -->", "<!-- /claims-cka-table -->")


def row_key(row: dict) -> tuple:
    return row["store"], row["variant"], row["seed"]


def analyse_store(store: ResultsStore, images: int, kept: dict[tuple, dict], redo: bool) -> list[dict]:
    """A row per finished run of the store: the kept row when it is of this run (same config,
    same image count) and not to be redone, else a new analysis where the checkpoint still is."""
    rows = []
    store_dir = store.root
    for record in store.records():
        if record.get("status") != "ok":
            continue
        key = (store_dir.name, record["variant"], record["seed"])
        old = kept.pop(key, None)
        current = old is not None and old["images"] == images and \
            old.get("config_hash", record["config_hash"]) == record["config_hash"]  # older rows lack it
        has_checkpoint = RunDir(store.run_dir_of(record)).has_checkpoint()
        if current and not (redo and has_checkpoint):
            rows.append({**old, "config_hash": record["config_hash"]})
            continue
        if not has_checkpoint:
            print(f"{'/'.join(map(str, key))}: no checkpoint (store restored from its records?); skipped")
            continue
        result = analyze_run(store.run_dir_of(record), images=images)
        rows.append({"store": store_dir.name, "variant": record["variant"], "seed": record["seed"],
                     "config_hash": record["config_hash"], "depth": setting(record, "model.depth"),
                     "test_acc": round(100 * record["test_acc"], 2),
                     "cka_offdiag": result["cka_offdiag_mean"], "cka_adjacent": result["cka_adjacent_mean"],
                     "images": result["images"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| grid | variant | depth | n | test acc (%) | off-diagonal CKA per stage | adjacent CKA per stage |",
             "|---|---|---:|---:|---:|---|---|"]
    keys = dict.fromkeys((r["store"], r["variant"]) for r in rows)
    for store, variant in keys:
        mine = [r for r in rows if (r["store"], r["variant"]) == (store, variant)]
        stages = range(len(mine[0]["cka_offdiag"]))
        off = " / ".join(mean_sd([r["cka_offdiag"][s] for r in mine], 3) for s in stages)
        adj = " / ".join(mean_sd([r["cka_adjacent"][s] for r in mine], 3) for s in stages)
        acc = statistics.mean(r["test_acc"] for r in mine)
        lines.append(f"| {store} | {variant} | {mine[0]['depth']} | {len(mine)} | {acc:.2f} | {off} | {adj} |")
    return "\n".join(lines)


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+", help="results stores of the claim grids")
    parser.add_argument("--images", type=int, default=1000, help="test images to analyse")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/results.md")
    parser.add_argument("--redo", action="store_true",
                        help="analyse again the runs already in the JSON whose checkpoints are here")
    args = parser.parse_args()
    kept = {row_key(r): r for r in json.loads(RESULTS.read_text())} if RESULTS.exists() else {}
    stores = [ResultsStore.existing(path) for path in args.stores]  # all checked before the minutes of analysis
    rows = [row for store in stores for row in analyse_store(store, args.images, kept, args.redo)]
    rows = sorted(rows + list(kept.values()), key=row_key)  # rows of stores not named here stay
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows)
    print(text)
    if args.docs:
        write_into_docs(text, *MARKERS)


if __name__ == "__main__":
    run_script(main)
