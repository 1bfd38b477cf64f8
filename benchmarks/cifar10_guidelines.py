"""The measurements behind docs/guidelines.md, on real CIFAR-10 (about 60 min on 2 CPU cores).

1. density sweep of the multi-mask ResNet-like tied model      (grids/cifar10_density.yaml)
2. width against depth at equal active parameters and FLOPs   (grids/cifar10_width_depth.yaml)
3. CKA heatmaps of the dense, same-mask and multi-mask deep-narrow models trained by
   benchmarks/cifar10_masks.py (run that first; skipped if its runs are missing)

    python benchmarks/cifar10_guidelines.py

Results: runs/sweep-*/report.md and plots, benchmarks/results/guidelines.json, and the sweeps'
finished runs added to the shipped store src/tiedmask/resources/measured_results.jsonl that
`tiedmask advise` reads by default. If a run of either sweep failed, neither file is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tiedmask.analysis.analyze import analyze_run
from tiedmask.errors import ArgumentParser, TiedmaskError, run_script
from tiedmask.experiments.advise import ship
from tiedmask.experiments.report import summarize, write_sweep_report
from tiedmask.experiments.store import ResultsStore
from tiedmask.experiments.sweep import run_sweep
from tiedmask.training.rundir import RunDir

HERE = Path(__file__).parent
SWEEPS = {"density": HERE / "grids/cifar10_density.yaml", "width_depth": HERE / "grids/cifar10_width_depth.yaml"}
MASK_RUNS = Path("runs/bench-cifar10-masks")


def main() -> None:
    ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help; no options
    out = {}
    stores = []
    for name, grid in SWEEPS.items():
        store = Path(f"runs/sweep-{name}")
        records = run_sweep(grid, store)
        print(write_sweep_report(records, store, name))
        failed = sorted({r["variant"] for r in records if r.get("status") != "ok"})
        if failed:  # a partial table must not replace the measured one
            raise TiedmaskError(f"runs of {grid.name} failed ({', '.join(failed)}); "
                                f"see {store}/report.md, fix the cause and run this script again")
        out[name] = [{k: v for k, v in row.items() if k != "reasons"}
                     for row in summarize(records, ("variant",),
                                          ("test_acc", "cka_offdiag_mean", "macs_effective"))]
        stores.append(ResultsStore(store))
    for store in stores:
        ship(store)
    cka = {}
    for scope in ("dense", "same", "multi"):
        run = MASK_RUNS / f"16w8d-{scope}-s0"
        if RunDir(run).is_finished():
            result = analyze_run(run, images=1000)
            cka[scope] = {"offdiag": result["cka_offdiag_mean"], "adjacent": result["cka_adjacent_mean"],
                          "heatmaps": [str(p) for p in sorted((run / "analysis").glob("*.png"))]}
            for png in (run / "analysis").glob("*.png"):
                shutil.copy(png, HERE.parent / "docs/img" / f"cka_{scope}_{png.name}")
    out["cka_by_scope"] = cka
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results/guidelines.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(cka, indent=1))


if __name__ == "__main__":
    run_script(main)
