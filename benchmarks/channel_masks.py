"""Do channel masks save time? Training-step time of `tied-fast`-shaped models with dense tied
weights, unstructured multi-masks and channel multi-masks (whole output filters, computed from
the kept filters alone), at equal density; and, to show where the time goes, each stage's tied
convolution alone (forward + backward of one application), dense against its kept filters.

    python benchmarks/channel_masks.py                 # ~1-2 min on 2 CPU cores; run it alone
    python benchmarks/channel_masks.py --width 40 --depths 4 8 --density 0.5 --threads 2

Batch 256 of 3x32x32, channels_last, fp32, Nesterov SGD; 2 warm-up steps, then the variants
are timed in turns (3 steps each per round, 3 rounds) so that drift in the machine's speed
falls on all of them alike; the median step is reported. `MACs / dense` is the step ratio if
time followed the arithmetic exactly: only the tied convolutions are masked, so the entry
convolutions and the element-wise work set a floor. Writes benchmarks/results/channel_masks.json.
Target (issue 13): channel multi-mask at density 0.5 and depth 4 <= 0.65x the dense step.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tiedmask.core.flops import count_macs
from tiedmask.core.layers import MaskedConv2d, masked_layers
from tiedmask.core.presets import create_model
from tiedmask.errors import ArgumentParser, run_script
from tiedmask.training.runtime import hardware_name

VARIANTS = {"dense": {"scope": "dense"}, "unstructured multi": {"scope": "multi", "kind": "unstructured"},
            "channel multi": {"scope": "multi", "kind": "channel"}}


def model_step(masks: dict, width: int, depth: int, density: float, batch: int):
    """A training step of the whole model, and its MACs."""
    torch.manual_seed(0)
    model = create_model("tied-fast", width=width, depth=depth, masks={**masks, "density": density})
    macs = count_macs(model, (3, 32, 32))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, macs["effective"]


def tied_conv_inputs(width: int, depth: int, batch: int) -> dict[str, tuple[int, ...]]:
    """The input shape of each stage's tied convolution, read from one forward pass."""
    model = create_model("tied-fast", width=width, depth=depth)
    shapes = {}

    def record(name):
        def hook(module, inputs):
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in masked_layers(model)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return shapes


def conv_step(shape: tuple[int, ...], density: float, kept_only: bool):
    """Forward + backward of one application of a tied 3x3 convolution: dense, or its kept filters."""
    torch.manual_seed(0)
    conv = MaskedConv2d(shape[1], shape[1], 3, padding=1, bias=False)
    conv.build_masks("channel", 1, density, 0, "conv.weight")
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    index = 0 if kept_only else None

    def step() -> None:
        conv(x, index).sum().backward()

    return step


def round_medians(steps: dict, rounds: int, per_round: int = 3) -> dict[str, list[float]]:
    """Each step's median seconds per call in each round; the steps alternate within a round
    (after 2 warm-up calls each), so a drift in the machine's speed falls on all of them alike."""
    times = {name: [] for name in steps}
    for step in steps.values():
        step(), step()
    for _ in range(rounds):
        for name, step in steps.items():
            calls = []
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                calls.append(time.perf_counter() - start)
            times[name].append(statistics.median(calls))
    return times


def timed_in_turns(steps: dict, rounds: int, per_round: int = 3) -> dict:
    """Median seconds per call of each step over `round_medians`' rounds."""
    return {name: statistics.median(t) for name, t in round_medians(steps, rounds, per_round).items()}


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=40)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hardware = hardware_name(torch.device("cpu"))
    print(f"tied-fast w{args.width}, density {args.density}, batch {args.batch}, {hardware}\n")

    layers = []
    print("| tied conv (input) | dense fwd+bwd (ms) | kept filters (ms) | ratio |\n|---|---:|---:|---:|")
    for name, shape in tied_conv_inputs(args.width, args.depths[0], args.batch).items():
        t = timed_in_turns({"dense": conv_step(shape, args.density, False),
                            "kept": conv_step(shape, args.density, True)}, args.rounds)
        layers.append({"layer": name, "input": list(shape), "dense_ms": t["dense"] * 1e3,
                       "kept_ms": t["kept"] * 1e3, "ratio": t["kept"] / t["dense"]})
        print(f"| {name} {list(shape)} | {t['dense'] * 1e3:.1f} | {t['kept'] * 1e3:.1f} | {t['kept'] / t['dense']:.2f}x |")

    rows = []
    print("\n| depth | variant | effective MMACs/img | MACs / dense | step (s) | img/s | step / dense step |"
          "\n|---:|---|---:|---:|---:|---:|---:|")
    for depth in args.depths:
        built = {name: model_step(m, args.width, depth, args.density, args.batch) for name, m in VARIANTS.items()}
        medians = timed_in_turns({name: step for name, (step, _) in built.items()}, args.rounds)
        dense_macs = built["dense"][1]
        for name, (_, macs) in built.items():
            row = {"depth": depth, "variant": name, "step_s": medians[name],
                   "ratio_to_dense": medians[name] / medians["dense"], "img_per_s": args.batch / medians[name],
                   "effective_mmacs": macs / 1e6, "macs_ratio": macs / dense_macs}
            rows.append(row)
            print(f"| {depth} | {name} | {row['effective_mmacs']:.1f} | {row['macs_ratio']:.2f} | {row['step_s']:.3f} "
                  f"| {row['img_per_s']:.0f} | {row['ratio_to_dense']:.2f}x |")
    out = Path(__file__).resolve().parent / "results" / "channel_masks.json"
    out.write_text(json.dumps({"settings": vars(args), "hardware": hardware, "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "layers": layers, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
