"""Claim 2 at real accuracy: do tied applications compute near-identical features?

Runs `tiedmask analyze` (minibatch unbiased linear CKA between the states after each
application, on 1,000 test images) on every finished run of the claim grids' stores, and
tabulates the mean off-diagonal and adjacent CKA per stage for each variant, mean ± std over
seeds. Untied networks of the same shape are the reference the paper lacks: how similar are
consecutive layers when nothing is tied?

    python benchmarks/claims_cka.py runs/paper-claims-fast [runs/paper-claims-depth8 ...] [--docs]

Writes benchmarks/results/claims_cka.json (one entry per run) and, with --docs, the table into
docs/results.md between its markers. A minute per store of five runs on 2 CPU cores. Runs
already in the JSON are kept and not analysed again (`--redo` analyses them anew), so a store
restored from its results.jsonl alone, whose checkpoints are gone, loses none of its rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from paper_claims import write_into_docs  # this folder's sibling script
from tiedmask.analysis.analyze import analyze_run
from tiedmask.experiments.store import ResultsStore, setting

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "claims_cka.json"
MARKERS = ("<!-- claims-cka-table: written by benchmarks/claims_cka.py --docs -->", "<!-- /claims-cka-table -->")


def row_key(row: dict) -> tuple:
    return row["store"], row["variant"], row["seed"]


def analyse_store(store_dir: Path, images: int, known: set[tuple]) -> list[dict]:
    """Rows of the store's finished runs that are not `known` and still have their checkpoint."""
    rows = []
    store = ResultsStore(store_dir)
    for record in store.records():
        key = (store_dir.name, record["variant"], record["seed"])
        if record.get("status") != "ok" or key in known:
            continue
        if not (store.run_dir_of(record) / "checkpoint.json").exists():
            print(f"{'/'.join(map(str, key))}: no checkpoint (store restored from its records?); skipped")
            continue
        result = analyze_run(store.run_dir_of(record), images=images)
        rows.append({"store": store_dir.name, "variant": record["variant"], "seed": record["seed"],
                     "depth": setting(record, "model.depth"), "test_acc": round(100 * record["test_acc"], 2),
                     "cka_offdiag": result["cka_offdiag_mean"], "cka_adjacent": result["cka_adjacent_mean"],
                     "images": result["images"]})
    return rows


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| grid | variant | depth | n | test acc (%) | off-diagonal CKA per stage | adjacent CKA per stage |",
             "|---|---|---:|---:|---:|---|---|"]
    keys = dict.fromkeys((r["store"], r["variant"]) for r in rows)
    for store, variant in keys:
        mine = [r for r in rows if (r["store"], r["variant"]) == (store, variant)]
        stages = range(len(mine[0]["cka_offdiag"]))
        off = " / ".join(_mean_sd([r["cka_offdiag"][s] for r in mine]) for s in stages)
        adj = " / ".join(_mean_sd([r["cka_adjacent"][s] for r in mine]) for s in stages)
        acc = statistics.mean(r["test_acc"] for r in mine)
        lines.append(f"| {store} | {variant} | {mine[0]['depth']} | {len(mine)} | {acc:.2f} | {off} | {adj} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+", help="results stores of the claim grids")
    parser.add_argument("--images", type=int, default=1000, help="test images to analyse")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/results.md")
    parser.add_argument("--redo", action="store_true", help="analyse runs already in the JSON again")
    args = parser.parse_args()
    kept = [] if args.redo or not RESULTS.exists() else json.loads(RESULTS.read_text())
    known = {row_key(r) for r in kept}
    rows = kept + [row for store in args.stores for row in analyse_store(Path(store), args.images, known)]
    rows.sort(key=row_key)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows)
    print(text)
    if args.docs:
        write_into_docs(text, *MARKERS)


if __name__ == "__main__":
    main()
