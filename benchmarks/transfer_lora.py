"""Transfer with multi-mask LoRA (CapaBoost) against LoRA and full fine-tuning.

A tied Transformer-like model (tied-vit-s, width 64, depth 4, multi-mask density 0.9) is
pre-trained on CIFAR-10 (10k-image subset, 4 epochs), then fine-tuned on Fashion-MNIST
(5k-image subset, 2k test images, padded to 32x32 and repeated to 3 channels, 2 epochs):

    full                  every parameter
    lora r=4              rank-4 LoRA on qkv, proj, fc1, fc2 (+ the new head)
    multimask_lora r=4    the same trainable parameters, 2 masked copies at density 0.5
    lora r=8              twice the adapter parameters, for reference

    python benchmarks/transfer_lora.py --data-root ../shared/data     (~15 min on 2 CPU cores)

Writes runs/transfer/results.jsonl + report.md and benchmarks/results/transfer_lora.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiedmask.errors import ArgumentParser, run_script
from tiedmask.experiments.report import markdown_table, summarize
from tiedmask.experiments.runner import Job, run_jobs
from tiedmask.experiments.store import ResultsStore
from tiedmask.training.finetune import pretrained_defaults
from tiedmask.training.rundir import RunDir
from tiedmask.training.settings import config_from_dict, merge
from tiedmask.training.train import train

METHODS = {
    "full": {"method": "full"},
    "lora r=4": {"method": "lora", "rank": 4},
    "multimask_lora r=4 (2 masks, density 0.5)": {"method": "multimask_lora", "rank": 4, "n_masks": 2,
                                                   "density": 0.5},
    "lora r=8": {"method": "lora", "rank": 8},
}


def main() -> None:
    ap = ArgumentParser()
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default="runs/transfer")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    root = Path(args.out)
    pre = root / "pretrained"
    if not RunDir(pre).is_finished():
        cfg = config_from_dict({
            "model": {"name": "tied-vit-s", "width": 64, "depth": 4, "masks": {"scope": "multi", "density": 0.9}},
            "data": {"name": "cifar10", "root": args.data_root, "train_subset": 10000, "test_subset": 2000},
            "epochs": 4, "batch_size": 64, "optim": {"lr": 1e-3, "warmup_epochs": 0.5},
            "threads": args.threads, "progress": False})
        result = train(cfg, out=pre, resume=RunDir(pre).resumable())
        print(f"pre-trained on CIFAR-10: test acc {result.test_acc:.2%}")
    base = pretrained_defaults(RunDir(pre))
    jobs = []
    for label, ft in METHODS.items():
        for seed in args.seeds:
            values = merge(base, {
                "data": {"name": "fashion_mnist", "root": args.data_root, "train_subset": 5000,
                         "test_subset": 2000},
                "finetune": ft, "epochs": 2, "batch_size": 64, "seed": seed,
                "optim": {"lr": 2e-3 if ft["method"] != "full" else 1e-3, "warmup_epochs": 0.25}})
            jobs.append(Job(label, values))
    records = run_jobs(jobs, ResultsStore(root), workers=1, threads=args.threads)
    rows = summarize(records, ("variant",), ("test_acc", "train_time_s"))
    for row in rows:
        row["trainable_params"] = next(r["trainable_params"] for r in records
                                       if r["variant"] == row["variant"] and r["status"] == "ok")
    table = markdown_table(rows, ("variant",), ("test_acc", "train_time_s"))
    table += "\n\n| variant | trainable parameters |\n|---|---:|\n" + "\n".join(
        f"| {r['variant']} | {r['trainable_params']:,} |" for r in rows)
    (root / "report.md").write_text(table + "\n")
    print(table)
    out = Path(__file__).parent / "results" / "transfer_lora.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": [{k: v for k, v in r.items() if k != "reasons"} for r in rows]},
                              indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
