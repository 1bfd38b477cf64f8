"""Does a larger batch train faster per image on this CPU? Training images/s of the
`cifar10-fast` model shape (`tied-fast` width 56, 2 applications, multi-masks at density 0.5)
at several batch sizes, timed in alternating rounds (`channel_masks.round_medians`).

    python benchmarks/batch_throughput.py                  # ~1 min; run it alone
    python benchmarks/batch_throughput.py --batches 128 256 512 --threads 2

Only the speed: which batch size trains to a better accuracy is a question for training runs,
with hyperparameters scaled to the batch. Writes benchmarks/results/batch_throughput.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from channel_masks import model_step, round_medians  # this folder's sibling script
from tiedmask.errors import ArgumentParser, run_script
from tiedmask.training.runtime import hardware_name


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--width", type=int, default=56)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {b: model_step({"scope": "multi"}, args.width, args.depth, 0.5, b)[0] for b in args.batches}
    times = round_medians(steps, args.rounds, per_round=2)
    hardware = hardware_name(torch.device("cpu"))
    print(f"tied-fast w{args.width} d{args.depth} multi-mask, {hardware}\n\n| batch | train img/s | range over rounds |\n|---:|---:|---|")
    rows = []
    for batch, t in times.items():
        rate = [batch / x for x in t]
        rows.append({"batch": batch, "img_per_s": statistics.median(rate), "min": min(rate), "max": max(rate)})
        print(f"| {batch} | {statistics.median(rate):.0f} | {min(rate):.0f}–{max(rate):.0f} |")
    out = Path(__file__).resolve().parent / "results" / "batch_throughput.json"
    out.write_text(json.dumps({"settings": vars(args), "hardware": hardware, "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
