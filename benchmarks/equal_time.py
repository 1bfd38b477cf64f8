"""Epoch budgets at equal training time: the training step of every variant of a grid, timed in
turns on this machine, and how many epochs each variant gets in the time the reference variant
takes for its epochs.

    python benchmarks/equal_time.py benchmarks/grids/paper_claims_fast.yaml      # ~2 min; run it alone
    python benchmarks/equal_time.py GRID --reference tied-multi --threads 2 --rounds 3

Each variant's model is built from its seed-0 grid point exactly as `tiedmask train` builds it
(preset, memory layout, optimiser with its weight-decay groups), and one step (forward, loss,
backward, update) on a random batch of the grid's batch size is timed; the variants alternate
in rounds (`channel_masks.round_medians`) so drift in the machine's speed falls on all alike, and
each variant's ratio to the reference is taken within each round: the table gives the median
ratio and its range over rounds (on a shared VM the range is the honest error bar).
Data loading and augmentation are left out: they cost every variant the same per image. Models
are built for CIFAR-shaped input (3x32x32, 10 classes), the shape of the grids here. Writes benchmarks/results/equal_time_<grid>.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from channel_masks import round_medians  # this folder's sibling script
from tiedmask.core.flops import count_macs
from tiedmask.core.presets import build_model
from tiedmask.core.spec import DataShape
from tiedmask.errors import ArgumentParser, run_script
from tiedmask.experiments.sweep import grid_jobs
from tiedmask.training.settings import config_from_dict, read_yaml
from tiedmask.training.runtime import hardware_name, place, use_channels_last
from tiedmask.training.trainer import make_optimizer


def variant_step(config: dict):
    """One training step of the grid point's model as `tiedmask train` builds it, and its MACs."""
    cfg = config_from_dict(config)
    shape = DataShape()
    torch.manual_seed(0)
    model = build_model(cfg.model, shape)
    macs = count_macs(model, (shape.channels, shape.size, shape.size))["effective"]
    channels_last = use_channels_last(cfg, shape.size)
    model = place(model, torch.device("cpu"), channels_last)
    optimizer = make_optimizer(cfg, model)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(cfg.batch_size, shape.channels, shape.size, shape.size).contiguous(memory_format=layout)
    y = torch.randint(0, shape.classes, (cfg.batch_size,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, macs, cfg.epochs


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", help="a sweep grid file (its variants, seed 0)")
    parser.add_argument("--reference", default="tied-multi", help="the variant whose time is matched")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the grid's, else all cores)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    spec = read_yaml(args.grid)
    jobs, options = grid_jobs(spec)
    threads = args.threads or options.get("threads", 0)
    if threads:
        torch.set_num_threads(threads)
    first_seed = {}
    for job in jobs:
        first_seed.setdefault(job.variant, job.config)
    if args.reference not in first_seed:
        parser.error(f"no variant {args.reference!r} in {args.grid}; choose one of {sorted(first_seed)}")
    built = {name: variant_step(config) for name, config in first_seed.items()}
    hardware = hardware_name(torch.device("cpu"))
    times = round_medians({name: step for name, (step, _, _) in built.items()}, args.rounds)
    ref_epochs = built[args.reference][2]
    print(f"{args.grid}: {hardware}; reference {args.reference} at {ref_epochs} epochs; "
          f"{args.rounds} rounds\n")
    print("| variant | effective MMACs/img | step (s) | step / reference (range over rounds) "
          "| epochs in the reference's time |\n|---|---:|---:|---|---:|")
    rows = []
    for name, (_, macs, epochs) in built.items():
        ratios = [t / r for t, r in zip(times[name], times[args.reference])]
        ratio = statistics.median(ratios)
        row = {"variant": name, "effective_mmacs": macs / 1e6, "step_s": statistics.median(times[name]),
               "ratio": ratio, "ratio_min": min(ratios), "ratio_max": max(ratios), "grid_epochs": epochs,
               "equal_time_epochs": ref_epochs / ratio}
        rows.append(row)
        print(f"| {name} | {row['effective_mmacs']:.1f} | {row['step_s']:.3f} | {ratio:.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {row['equal_time_epochs']:.1f} |")
    out = Path(__file__).resolve().parent / "results" / f"equal_time_{Path(args.grid).stem}.json"
    out.write_text(json.dumps({"grid": args.grid, "reference": args.reference, "hardware": hardware,
                               "threads": torch.get_num_threads(), "rounds": args.rounds,
                               "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
