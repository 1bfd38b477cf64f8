"""Training and inference images/s of every registered model on this machine, with FLOPs and
model FLOP utilisation (MFU) against a measured fp32 matmul peak; multi-mask against dense.

    python benchmarks/throughput.py            # ~3 min on 2 CPU cores; run it alone

Batch 128 of 3x32x32 inputs, fp32, NCHW, AdamW steps; 2 warm-up steps excluded, the median of
5 timed steps reported. Training FLOPs are taken as 3x the forward (effective, masked) FLOPs.
Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tiedmask.flops import count_macs
from tiedmask.models import MODEL_PRESETS, count_params, create_model


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


def measure(name: str, scope: str, batch: int = 128) -> dict:
    torch.manual_seed(0)
    model = create_model(name, mask_scope=scope)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_s = timed(step)
    model.eval()
    with torch.no_grad():
        infer_s = timed(lambda: model(x))
    macs = count_macs(model, (3, 32, 32))
    return {"model": name, "scope": scope, "params": count_params(model),
            "mflops_effective": 2 * macs["effective"] / 1e6, "mflops_dense": 2 * macs["dense"] / 1e6,
            "train_img_s": batch / train_s, "infer_img_s": batch / infer_s,
            "train_gflops_s": 3 * 2 * macs["effective"] * batch / train_s / 1e9}


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    peak = matmul_peak_gflops()
    rows = [measure(name, scope) for name in sorted(MODEL_PRESETS) for scope in ("dense", "multi")]
    print(f"fp32 matmul peak (2048^2): {peak:.0f} GFLOP/s on {torch.get_num_threads()} threads\n")
    print("| model | masks | params | MFLOPs/img (eff.) | train img/s | infer img/s | train GFLOP/s | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['scope']} | {r['params']:,} | {r['mflops_effective']:.1f} | "
              f"{r['train_img_s']:.0f} | {r['infer_img_s']:.0f} | {r['train_gflops_s']:.1f} | "
              f"{100 * r['train_gflops_s'] / peak:.1f}% |")
    print("\nmulti-mask training step / dense step of the same shape:")
    for name in sorted(MODEL_PRESETS):
        d, m = (next(r for r in rows if r["model"] == name and r["scope"] == s) for s in ("dense", "multi"))
        print(f"  {name}: {d['train_img_s'] / m['train_img_s']:.3f}x")
    out = Path(__file__).parent / "results" / "throughput.json"
    out.write_text(json.dumps({"matmul_peak_gflops": peak, "threads": torch.get_num_threads(),
                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
