"""Do channel masks save time? Training-step time of one `tied-fast`-shaped model (4 applications
of each tied conv per stage) with dense tied weights, unstructured multi-masks and channel
multi-masks (whole output filters, computed from the kept filters alone), at equal density.

    python benchmarks/channel_masks.py                 # ~3 min on 2 CPU cores; run it alone
    python benchmarks/channel_masks.py --width 40 --density 0.5 --threads 2

Batch 256 of 3x32x32, channels_last, fp32, Nesterov SGD; 2 warm-up steps, then the variants
are timed in turns (3 steps each per round, 3 rounds) so that drift in the machine's speed
falls on all of them alike; the median step is reported. Prints a table with the ratio to dense and
writes benchmarks/results/channel_masks.json. Target (issue 13): channel multi-mask at density
0.5 <= 0.65x the dense step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tiedmask.core.flops import count_macs
from tiedmask.core.presets import create_model
from tiedmask.training.train import hardware_name

VARIANTS = {"dense": {"scope": "dense"}, "unstructured multi": {"scope": "multi", "kind": "unstructured"},
            "channel multi": {"scope": "multi", "kind": "channel"}}


def make_step(masks: dict, width: int, depth: int, density: float, batch: int):
    torch.manual_seed(0)
    model = create_model("tied-fast", width=width, depth=depth, masks={**masks, "density": density})
    macs = count_macs(model, (3, 32, 32))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step() -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step, macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=40)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {name: make_step(m, args.width, args.depth, args.density, args.batch) for name, m in VARIANTS.items()}
    times = {name: [] for name in VARIANTS}
    for name, (step, _) in steps.items():
        step(), step()  # warm-up
    for _ in range(args.rounds):
        for name, (step, _) in steps.items():
            times[name] += [step() for _ in range(3)]
    dense = statistics.median(times["dense"])
    rows = []
    for name, (_, macs) in steps.items():
        median = statistics.median(times[name])
        rows.append({"variant": name, "step_s": median, "ratio_to_dense": median / dense,
                     "img_per_s": args.batch / median, "effective_mmacs": macs["effective"] / 1e6})
    print(f"tied-fast w{args.width} d{args.depth}, density {args.density}, batch {args.batch}, "
          f"{hardware_name(torch.device('cpu'))}")
    print("| variant | effective MMACs/img | step (s) | img/s | step / dense step |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['effective_mmacs']:.1f} | {r['step_s']:.3f} | {r['img_per_s']:.0f} "
              f"| {r['ratio_to_dense']:.2f}x |")
    out = Path(__file__).resolve().parent / "results" / "channel_masks.json"
    out.write_text(json.dumps({"settings": vars(args), "hardware": hardware_name(torch.device("cpu")),
                               "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
