"""Dense vs same-mask vs multi-mask weight-tied models on real CIFAR-10, at equal parameters.

Claim under test (arXiv 2307.08013): multi-mask > same-mask and multi-mask > dense, and the
limit of tied weights shows with depth. Two settings: shallow (width 32, 2 applications per
stage) and deep-narrow (width 16, 8 applications per stage); unstructured masks at density 0.5.

Budget (fits ~35 min on 2 CPU cores): a fixed 15k-image training subset, 2 epochs, the full
10k test set; 2 runs in parallel with 1 thread each. Finished runs are skipped on a re-run.

    python benchmarks/cifar10_masks.py --data-root ../shared/data
    python benchmarks/cifar10_masks.py --data-root ../shared/data --seeds 0 1 2 --epochs 4

Writes benchmarks/results/cifar10_masks.json and prints a Markdown table (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tiedmask.errors import ArgumentParser, run_script

SETTINGS = {
    "shallow (w32, depth 2)": {"name": "tied-resnet-s", "width": 32, "depth": 2},
    "deep-narrow (w16, depth 8)": {"name": "tied-resnet-s", "width": 16, "depth": 8},
}
SCOPES = ("dense", "same", "multi")


def run_one(job: dict) -> dict:
    import torch

    from tiedmask.training.settings import config_from_dict
    from tiedmask.training.train import train

    torch.set_num_threads(job["threads"])
    cfg = config_from_dict(job["config"])
    result = train(cfg, out=job["out"], resume=True, log=lambda *a: None)
    return {"setting": job["setting"], "scope": job["scope"], **result.to_dict()}


def fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(records: list[dict]) -> str:
    lines = ["| setting | masks | params | test acc (%) | final train loss | train time (s) | img/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for setting in SETTINGS:
        for scope in SCOPES:
            rs = [r for r in records if r["setting"] == setting and r["scope"] == scope]
            if not rs:
                continue
            lines.append(
                f"| {setting} | {scope} | {rs[0]['params']:,} | {fmt([r['test_acc'] for r in rs], 100)} "
                f"| {fmt([r['final_train_loss'] for r in rs], digits=3)} "
                f"| {fmt([r['train_time_s'] for r in rs], digits=0)} | {fmt([r['img_per_s'] for r in rs], digits=0)} |")
    return "\n".join(lines)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default="runs/bench-cifar10-masks")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=15000)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    jobs = []
    for setting, model in SETTINGS.items():
        for seed in args.seeds:
            for scope in SCOPES:
                tag = f"{model['width']}w{model['depth']}d-{scope}-s{seed}"
                config = {
                    "model": {**model, "masks": {"scope": scope, "density": args.density}},
                    "data": {"name": "cifar10", "root": args.data_root, "train_subset": args.train_subset},
                    "optim": {"lr": 3e-3, "warmup_epochs": 0.25},
                    "epochs": args.epochs, "seed": seed, "progress": False,
                }
                jobs.append({"setting": setting, "scope": scope, "config": config,
                             "out": str(Path(args.out) / tag), "threads": max(1, 2 // args.workers)})
    records = []
    with ProcessPoolExecutor(args.workers) as pool:
        for record in pool.map(run_one, jobs):
            records.append(record)
            print(f"done {record['setting']} {record['scope']} seed {record['seed']}: "
                  f"test {record['test_acc']:.2%}, {record['train_time_s']:.0f}s", flush=True)
    out = Path(__file__).parent / "results" / "cifar10_masks.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), "epochs": args.epochs,
            "train_subset": args.train_subset, "density": args.density, "seeds": args.seeds}
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    print(table(records))


if __name__ == "__main__":
    run_script(main)
