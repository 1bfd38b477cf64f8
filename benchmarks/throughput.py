"""Training and inference images/s of every registered model on this machine, with FLOPs and
model FLOP utilisation (MFU) against a measured fp32 matmul peak; multi-mask against dense.

    python benchmarks/throughput.py            # ~7 min on 2 CPU cores; run it alone
    python benchmarks/throughput.py --bf16     # adds bf16 rows (+13 min on CPUs without native bf16)
    python benchmarks/throughput.py --compile tied-fast  # adds torch.compile rows (slow to build)

Batch 128 of 3x32x32 inputs, AdamW steps; 2 warm-up steps excluded, the median of 5 timed
steps reported. Training FLOPs are taken as 3x the forward (effective, masked) FLOPs.
Layouts: `fast` is what `tiedmask train` does by default (fp32, channels_last); `naive` is fp32
NCHW eager; `bf16` is bf16 autocast + channels_last. Writes benchmarks/results/throughput.json.
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
from tiedmask.core.backbones import count_params
from tiedmask.core.presets import MODEL_PRESETS, create_model
from tiedmask.training.train import hardware_name


def timed(fn, warmup: int = 2, repeats: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b) / 1e9


LAYOUTS = ("fast", "naive", "bf16")


def measure(name: str, scope: str, layout: str = "fast", batch: int = 128, compile: bool = False,
            kind: str = "unstructured") -> dict:
    torch.manual_seed(0)
    model = create_model(name, masks={"scope": scope, "kind": kind})
    macs = count_macs(model, (3, 32, 32))
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if layout != "naive":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    run = torch.compile(model) if compile else model
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=layout == "bf16")  # noqa: E731

    def step():
        with autocast():
            loss = F.cross_entropy(run(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_s = timed(step)
    model.eval()
    with torch.no_grad(), autocast():
        infer_s = timed(lambda: run(x))
    scope = scope if kind == "unstructured" or scope == "dense" else f"{scope}/{kind}"
    return {"model": name, "scope": scope, "layout": layout + ("+compile" if compile else ""),
            "params": count_params(model),
            "mflops_effective": 2 * macs["effective"] / 1e6, "mflops_dense": 2 * macs["dense"] / 1e6,
            "train_img_s": batch / train_s, "infer_img_s": batch / infer_s,
            "train_gflops_s": 3 * 2 * macs["effective"] * batch / train_s / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", nargs="*", default=[], metavar="MODEL",
                        help="also time these models under torch.compile (minutes to build each)")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast (slow on most CPUs)")
    args = parser.parse_args()
    layouts = LAYOUTS[1:] if args.bf16 else ("naive",)
    peak = matmul_peak_gflops()
    rows = [measure(name, scope) for name in sorted(MODEL_PRESETS) for scope in ("dense", "multi")]
    # channel masks compute only their kept filters (issue 13): the one kind that can save time
    rows += [measure(name, "multi", kind="channel") for name in sorted(MODEL_PRESETS)]
    rows += [measure(name, "multi", layout) for name in sorted(MODEL_PRESETS) for layout in layouts]
    rows += [measure(name, "multi", compile=True) for name in args.compile]
    print(f"{hardware_name(torch.device('cpu'))}: fp32 matmul peak (2048^2) {peak:.0f} GFLOP/s on {torch.get_num_threads()} threads\n")
    print("| model | masks | layout | params | MFLOPs/img (dense) | MFLOPs/img (eff.) | train img/s | infer img/s "
          "| train GFLOP/s (eff.) | MFU (eff.) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['scope']} | {r['layout']} | {r['params']:,} | {r['mflops_dense']:.1f} "
              f"| {r['mflops_effective']:.1f} | "
              f"{r['train_img_s']:.0f} | {r['infer_img_s']:.0f} | {r['train_gflops_s']:.1f} | "
              f"{100 * r['train_gflops_s'] / peak:.1f}% |")

    def row(name, scope, layout):
        return next((r for r in rows if (r["model"], r["scope"], r["layout"]) == (name, scope, layout)), None)

    print("\nmulti-mask step time / dense step time (fast layout), and training img/s ratios:")
    print("| model | multi step / dense step | channel multi step / dense step | fast / naive img/s "
          "| bf16 / fast img/s | compile / fast img/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in sorted(MODEL_PRESETS):
        fast, compiled, bf16 = (row(name, "multi", layout) for layout in ("fast", "fast+compile", "bf16"))
        dense = row(name, "dense", "fast")["train_img_s"]
        print(f"| {name} | {dense / fast['train_img_s']:.3f} | "
              f"{dense / row(name, 'multi/channel', 'fast')['train_img_s']:.3f} | "
              f"{fast['train_img_s'] / row(name, 'multi', 'naive')['train_img_s']:.2f}x | "
              + (f"{bf16['train_img_s'] / fast['train_img_s']:.2f}x | " if bf16 else "- | ")
              + (f"{compiled['train_img_s'] / fast['train_img_s']:.2f}x |" if compiled else "- |"))
    out = Path(__file__).parent / "results" / "throughput.json"
    out.write_text(json.dumps({"hardware": hardware_name(torch.device("cpu")), "matmul_peak_gflops": peak,
                               "threads": torch.get_num_threads(),
                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
