"""bf16 autocast against fp32 at equal epochs (issue 35): accuracy paired by seed, and speed.

    tiedmask sweep benchmarks/grids/precision_bf16.yaml --out runs/precision-bf16
    python benchmarks/precision_bf16.py runs/precision-bf16

Prints each seed's test accuracy, training throughput, the precision each run recorded and its
machine; bf16 − fp32 paired by seed with a 95% t-interval and the verdict rule's word. Writes
benchmarks/results/precision_bf16.json and keeps the store's records in
benchmarks/results/stores/precision-bf16.results.jsonl (a later session continues from them).
Throughput is only a speed measure where the runs trained alone; the docs say where they did not.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiedmask.errors import ArgumentParser, TiedmaskError, run_script
from tiedmask.experiments.store import ResultsStore
from tiedmask.experiments.verdict import paired_difference, verdict

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="the store of benchmarks/grids/precision_bf16.yaml")
    args = parser.parse_args()
    store = ResultsStore.existing(args.store)
    runs = {(r["variant"], r["seed"]): r for r in store.records() if r.get("status") == "ok"}
    if not {v for v, _ in runs} >= {"fp32", "bf16"}:
        raise TiedmaskError(f"{args.store} has no finished run of fp32 and of bf16 yet; run the grid first")
    accuracy = {v: {s: 100 * r["test_acc"] for (w, s), r in runs.items() if w == v} for v in ("fp32", "bf16")}
    speed = {v: {s: r["img_per_s"] for (w, s), r in runs.items() if w == v} for v in ("fp32", "bf16")}
    print("| precision | seed | test acc (%) | train img/s | recorded precision | machine |\n|---|---:|---:|---:|---|---|")
    for (variant, seed), r in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {variant} | {seed} | {100 * r['test_acc']:.2f} | {r['img_per_s']:.0f} | {r.get('precision', '')} "
              f"| {r.get('hardware', '')} |")
    diff = paired_difference(accuracy["bf16"], accuracy["fp32"])
    ratio = {s: speed["bf16"][s] / speed["fp32"][s] for s in set(speed["bf16"]) & set(speed["fp32"])}
    word = verdict(diff, "bf16 better", "fp32 better")
    print(f"\nbf16 − fp32 test accuracy, paired by seed: {diff['mean']:+.2f} points "
          f"[{diff['low']:+.2f}, {diff['high']:+.2f}] over {diff['n']} seeds: {word}")
    print(f"bf16 / fp32 training img/s per seed: {', '.join(f'{ratio[s]:.2f}x' for s in sorted(ratio))}")
    out = ROOT / "benchmarks" / "results" / "precision_bf16.json"
    out.write_text(json.dumps({"runs": {f"{v}/seed{s}": r for (v, s), r in runs.items()},
                               "bf16_minus_fp32_pp": diff, "verdict": word, "img_per_s_ratio": ratio},
                              indent=1, default=str) + "\n")
    kept = ROOT / "benchmarks" / "results" / "stores" / "precision-bf16.results.jsonl"
    kept.write_bytes(store.path.read_bytes())


if __name__ == "__main__":
    run_script(main)
