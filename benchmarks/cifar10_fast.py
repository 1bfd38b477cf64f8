"""Time to accuracy on CIFAR-10 with the `cifar10-fast` recipe (a multi-mask weight-tied model
of 0.89M parameters), on this machine's CPU cores.

    python benchmarks/cifar10_fast.py --data-root ../shared/data     # ~33 min per seed; run alone

Each seed is one `tiedmask train --recipe cifar10-fast` run: 29 minutes of training (evaluation,
with flip TTA on the full 10k test set after every epoch, is excluded from the clock, as in
airbench). Finished runs are kept and skipped; interrupted ones resume. Reports the final test
accuracy (mean ± std over seeds), the training time at which each target was first reached, and
the accuracy-against-time curve. Writes benchmarks/results/cifar10_fast.json and
docs/img/cifar10_fast_curve.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tiedmask.experiments.report import fmt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (0.80, 0.85, 0.90, 0.94)


def run_seed(seed: int, runs: Path, data_root: str) -> Path:
    run_dir = runs / f"seed{seed}"
    if (run_dir / "result.json").exists():
        return run_dir
    if (run_dir / "checkpoint.json").exists():
        cmd = ["--resume", str(run_dir)]
    else:
        cmd = ["--recipe", "cifar10-fast", "--data.root", data_root, "--seed", str(seed),
               "--progress", "false", "--out", str(run_dir)]
    subprocess.run([sys.executable, "-m", "tiedmask.cli", "train", *cmd], check=True)
    return run_dir


def curve(run_dir: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["train_time_s"], r["test_acc"]) for r in rows]


def first_time_at(points, target: float) -> float | None:
    return next((t for t, acc in points if acc >= target), None)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return fmt((statistics.mean(values), statistics.stdev(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "cifar10-fast")
    args = parser.parse_args()
    curves = {seed: curve(run_seed(seed, args.runs, args.data_root)) for seed in args.seeds}
    results = {seed: json.loads((args.runs / f"seed{seed}" / "result.json").read_text())
               for seed in args.seeds}
    finals = [100 * results[s]["test_acc"] for s in args.seeds]
    print(f"cifar10-fast on {torch.get_num_threads()} threads ({platform.processor() or platform.machine()}): "
          f"{results[args.seeds[0]]['params']:,} params")
    print(f"final test accuracy (flip TTA): {mean_std(finals)} %")
    reached = {}
    for target in TARGETS:
        times = [first_time_at(curves[s], target) for s in args.seeds]
        reached[str(target)] = times
        shown = ", ".join("not reached" if t is None else f"{t / 60:.1f} min" for t in times)
        print(f"  time to {target:.0%}: {shown}")
    for seed in args.seeds:
        r = results[seed]
        print(f"  seed {seed}: {100 * r['test_acc']:.2f}% after {r['epochs']} epochs, "
              f"{r['train_time_s'] / 60:.1f} min training, {r['img_per_s']:.0f} img/s")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for seed, points in curves.items():
        ax.plot([t / 60 for t, _ in points], [100 * a for _, a in points], marker="o", ms=3,
                label=f"seed {seed}")
    ax.axhline(90, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training time (min, 2 CPU cores)")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title("cifar10-fast: multi-mask tied model, 0.89M params")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / "cifar10_fast_curve.png", dpi=120)

    out = ROOT / "benchmarks" / "results" / "cifar10_fast.json"
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                               "final_test_acc": finals, "time_to_target_s": reached,
                               "curves": {str(s): c for s, c in curves.items()},
                               "results": {str(s): r for s, r in results.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
