"""Accuracy against parameters at equal training time: where tying pays on a CPU, if anywhere.

    python benchmarks/cifar10_fast.py --minutes 15 --set precision=bf16 --set model.width=32 \
        --variants tied untied-equal-flops --seeds 0 1 2          # one more width (trains; run alone)
    python benchmarks/cifar10_pareto.py --minutes 15 --set precision=bf16 --widths 32   # the plot

Trains nothing: it reads benchmarks/cifar10_fast.py's kept runs of one budget and recipe change,
at the recipe's width and at each `--widths` W (the runs of `--set model.width=W`). Every variant
kept there is a point: final test accuracy (mean ± std over its seeds) against the parameters it
stores. A point is on the Pareto front when no other point stores at most as many parameters and
reaches a higher mean accuracy; the report names which tied points are, and which point beats
each one that is not. Writes benchmarks/results/cifar10_pareto{tag}.json and
docs/img/cifar10_pareto{tag}.png (tag as cifar10_fast.py's, less the width).
"""

from __future__ import annotations

import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cifar10_fast import ROOT, VARIANTS, checked_changes, kept_runs, mean_std, recipe_change, run_tag  # noqa: E402
from tiedmask.errors import ArgumentParser, TiedmaskError, run_script  # noqa: E402
from tiedmask.training.rundir import RunDir  # noqa: E402
from tiedmask.training.settings import load_config, recipe_path  # noqa: E402


def points(minutes: float | None, changes: tuple[str, ...], widths: list[int]) -> list[dict]:
    """One point per (width, variant) with kept runs: params, accuracies by seed, their mean."""
    found = []
    recipe_width = load_config(recipe_path("cifar10-fast")).model.width
    for width in [None, *widths]:
        extra = () if width is None else (f"model.width={width}",)
        runs = kept_runs(minutes, checked_changes([*changes, *extra]))
        for variant in VARIANTS:
            dirs = {seed: d for (v, seed), d in runs.items() if v == variant}
            if not dirs:
                continue
            results = {seed: RunDir(d).read_result() for seed, d in sorted(dirs.items())}
            accs = [100 * r["test_acc"] for r in results.values()]
            config = RunDir(next(iter(dirs.values()))).read_config()
            found.append({"variant": variant, "race_width": width or recipe_width,
                          "width": config.model.width,  # the untied network of equal parameters: its own
                          "seeds": list(results), "params": next(iter(results.values()))["params"],
                          "test_acc": accs, "mean": statistics.mean(accs)})
    return found


def front(found: list[dict]) -> None:
    """Mark each point on the Pareto front, or name the point that beats it."""
    for p in found:
        better = [q for q in found if q is not p and q["params"] <= p["params"] and q["mean"] > p["mean"]]
        best = max(better, key=lambda q: q["mean"], default=None)
        p["on_front"] = best is None
        p["beaten_by"] = None if best is None else f"{best['variant']} w{best['width']}"


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, help="the budget of the kept runs (as cifar10_fast.py's)")
    parser.add_argument("--set", dest="changes", type=recipe_change, action="append", default=[], metavar="KEY=VALUE",
                        help="the recipe change of the kept runs (as cifar10_fast.py's), not model.width")
    parser.add_argument("--widths", type=int, nargs="*", default=[], help="widths besides the recipe's")
    args = parser.parse_args()
    changes = checked_changes(args.changes)
    if any(c.startswith("model.width=") for c in changes):
        parser.error("give widths with --widths, not --set model.width=...")
    if any(w < 1 for w in args.widths):
        parser.error("--widths must be whole numbers >= 1")
    found = points(args.minutes, changes, sorted(set(args.widths)))
    if not found:
        raise TiedmaskError(f"no kept runs of cifar10_fast.py for --minutes {args.minutes} and these changes; "
                            "train them first (the command at the top of this script)")
    front(found)
    tag = run_tag(args.minutes, changes).replace("-", "_")
    for p in sorted(found, key=lambda p: p["params"]):
        where = "on the front" if p["on_front"] else f"beaten by {p['beaten_by']}"
        print(f"{p['variant']:<20} w{p['width']:<4} {p['params']:>9,} params  {mean_std(p['test_acc'])} %  ({where})")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, variant in enumerate(VARIANTS):
        mine = sorted((p for p in found if p["variant"] == variant), key=lambda p: p["params"])
        if mine:
            ax.errorbar([p["params"] / 1e6 for p in mine], [p["mean"] for p in mine], marker="o", ms=4,
                        yerr=[statistics.stdev(p["test_acc"]) if len(p["test_acc"]) > 1 else 0 for p in mine],
                        color=f"C{(0, 3, 1, 2)[i]}", label=variant, capsize=2)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title(f"equal training time ({args.minutes or 'recipe'} min{', ' + ', '.join(changes) if changes else ''})",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / f"cifar10_pareto{tag}.png", dpi=120)
    out = ROOT / "benchmarks" / "results" / f"cifar10_pareto{tag}.json"
    out.write_text(json.dumps({"minutes": args.minutes, "recipe_changes": changes, "points": found}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
