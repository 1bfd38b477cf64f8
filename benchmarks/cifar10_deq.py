"""Weight-tied (dense, same-mask, multi-mask) against DEQ (Anderson + implicit, Anderson +
phantom) on real CIFAR-10: one cell, equal parameters, equal epochs and equal wall-clock.

Claim under test (arXiv 2307.08013): weight-tied >= 3x faster per epoch than DEQ at equal or
better accuracy. Budget: the `cifar10` bench preset (4k-image train subset, 2k test images,
2 epochs; 45 s of training for the equal-time budget), 2 seeds, one run at a time on one
thread (about 40 min on a 2-core machine).

    python benchmarks/cifar10_deq.py --data-root ../shared/data

Writes runs/bench-cifar10-deq/{results.jsonl,report.md,*.png} and benchmarks/results/cifar10_deq.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiedmask.errors import ArgumentParser, run_script
from tiedmask.experiments.bench import run_bench
from tiedmask.experiments.report import summarize
from tiedmask.experiments.store import ResultsStore


def main() -> None:
    ap = ArgumentParser()
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default="runs/bench-cifar10-deq")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    report, _ = run_bench("cifar10", args.out, workers=1, threads=args.threads, seeds=args.seeds,
                       data_root=args.data_root)
    print(report)
    records = ResultsStore(args.out).records()
    rows = summarize(records, ("budget", "variant"),
                     ("test_acc", "s_per_epoch", "train_time_s", "peak_mem_mb", "fwd_iters", "bwd_iters"))
    out = Path(__file__).parent / "results" / "cifar10_deq.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "seeds": args.seeds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
