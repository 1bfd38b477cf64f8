"""Training and inference images/s of every registered model on this machine, with dense and
effective FLOPs and model FLOP utilisation (MFU) against the fp32 and bf16 product peaks measured
in the same run (each row against the peak of its own precision); multi-mask (unstructured and
channel) against dense, and the layouts against each other.

    python benchmarks/throughput.py            # ~6 min on 2 CPU cores; run it alone
    python benchmarks/throughput.py --bf16 on  # bf16 rows on a CPU without bf16 instructions too (slow there)
    python benchmarks/throughput.py --compile tied-fast  # adds torch.compile rows (slow to build)
    python benchmarks/throughput.py --models tied-fast tied-vit-s --compile tied-fast tied-vit-s --out FILE
    python benchmarks/throughput.py --out benchmarks/results/throughput_amx.json  # another machine's file

Batch 128 of 3x32x32 inputs, AdamW steps. The variants of one model are timed in alternating
rounds (3 rounds of 2 steps each, after 2 warm-up steps), so that drift in the machine's speed
falls on all of them alike; medians are reported. Training FLOPs are taken as 3x the forward
(effective, masked) FLOPs. Layouts: `fast` is fp32 channels_last (what `tiedmask train` does in
fp32); `naive` is fp32 NCHW eager; `bf16` is bf16 autocast + channels_last (what it does where
`precision: auto` picks bf16). A compiled model is timed in each precision layout (`fast+compile`,
`bf16+compile`); its first training step, compilation included, is reported as `compile_s`, and
the summary gives the training time after which compiling pays (compile_s / the share of each
step it saves), for comparison with a run's time budget. Inductor's on-disk caches are turned
off for this, so each compilation is timed in full, as a fresh `tiedmask train` run sees it.
Writes benchmarks/results/throughput.json (or `--out`), checked writable before anything is timed.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from channel_masks import timed_in_turns  # this folder's sibling script
from tiedmask.core.backbones import count_params
from tiedmask.core.flops import count_macs
from tiedmask.core.presets import MODEL_PRESETS, create_model
from tiedmask.errors import ArgumentParser, run_script
from tiedmask.files import writable_folder
from tiedmask.training.precision import bf16_instructions
from tiedmask.training.runtime import hardware_name

BATCH = 128


def as_convolution(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, weight) of a 1x1 convolution that computes `a @ b` (n x n; n a multiple of 64):
    a's rows are pixels and its columns channels, b maps channels in to channels out; the
    output, read as (pixels, channels out), is the product."""
    n = a.shape[0]
    pixels = a.t().reshape(1, n, n // 64, 64).contiguous(memory_format=torch.channels_last)
    return pixels, b.t().reshape(n, n, 1, 1).contiguous(memory_format=torch.channels_last)


def peak_gflops(n: int = 2048, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s of an n x n x n product by two libraries: `a @ b` ("matmul": MKL in fp32, which
    on an AMD EPYC ran slower than the models' own oneDNN convolutions, so MFU read over 100%)
    and the same product as a 1x1 convolution over n pixels ("conv1x1": oneDNN, what the models
    run on). MFU is taken against the better of the two."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    pixels, kernel = as_convolution(a, b)
    products = {"matmul": lambda: a @ b, "conv1x1": lambda: F.conv2d(pixels, kernel)}

    def rate(product) -> float:
        product()
        start = time.perf_counter()
        for _ in range(5):
            product()
        return 5 * 2 * n**3 / (time.perf_counter() - start) / 1e9

    with torch.no_grad():
        return {name: rate(product) for name, product in products.items()}


def variant(name: str, scope: str, kind: str = "unstructured", layout: str = "fast", compile: bool = False):
    """(row without timings, training step, inference pass) of one model variant."""
    torch.manual_seed(0)
    model = create_model(name, masks={"scope": scope, "kind": kind})
    macs = count_macs(model, (3, 32, 32))
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    if layout != "naive":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    run = torch.compile(model) if compile else model

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if layout == "bf16" else contextlib.nullcontext()

    def step():
        start = time.perf_counter()
        model.train()
        with autocast():
            loss = F.cross_entropy(run(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if compile and "compile_s" not in row:  # the first step: compilation happens there
            row["compile_s"] = time.perf_counter() - start

    @torch.no_grad()
    def infer():
        model.eval()
        with autocast():
            run(x)

    shown = scope if kind == "unstructured" or scope == "dense" else f"{scope}/{kind}"
    row = {"model": name, "scope": shown, "layout": layout + ("+compile" if compile else ""),
           "params": count_params(model), "mflops_effective": 2 * macs["effective"] / 1e6,
           "mflops_dense": 2 * macs["dense"] / 1e6}
    return row, step, infer


def measure(name: str, layouts: tuple[str, ...], compile: bool) -> list[dict]:
    """Every variant of one model, timed in turns."""
    specs = [("dense", "unstructured", "fast"), ("multi", "unstructured", "fast"), ("multi", "channel", "fast")]
    specs += [("multi", "unstructured", layout) for layout in layouts]
    built = [variant(name, scope, kind, layout) for scope, kind, layout in specs]
    if compile:  # in the layouts `tiedmask train` uses: fp32 channels_last, and bf16 where timed
        built += [variant(name, "multi", layout=layout, compile=True) for layout in ("fast", *layouts) if layout != "naive"]
    train_s = timed_in_turns({i: step for i, (_, step, _) in enumerate(built)}, rounds=3, per_round=2)
    infer_s = timed_in_turns({i: infer for i, (_, _, infer) in enumerate(built)}, rounds=3, per_round=2)
    rows = []
    for i, (row, _, _) in enumerate(built):
        rows.append({**row, "train_img_s": BATCH / train_s[i], "infer_img_s": BATCH / infer_s[i],
                     "train_gflops_s": 3 * row["mflops_effective"] * BATCH / train_s[i] / 1e3})
    return rows


def pays_after(compile_s: float, eager_step_s: float, compiled_step_s: float) -> float | None:
    """Training seconds after which a compiled run has done more steps than an eager one that
    started at once (None: a compiled step is no faster, so never). Compiled: (T - c) / s_c
    steps by time T, eager T / s_e; equal at T = c / (1 - s_c / s_e)."""
    saved = 1 - compiled_step_s / eager_step_s
    return compile_s / saved if saved > 0 else None


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_PRESETS), default=sorted(MODEL_PRESETS),
                        help="the models to time (default: every preset)")
    parser.add_argument("--compile", nargs="*", default=[], metavar="MODEL",
                        help="also time these models under torch.compile (minutes to build each)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"),
                        help="where to write the rows (JSON); keep each machine's file apart")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="time bf16 autocast rows: auto = where the CPU has bf16 instructions (AMX "
                             "or AVX512-BF16; elsewhere bf16 is emulated and slow, and the rows are "
                             "skipped, saying so)")
    args = parser.parse_args()
    if unknown := sorted(set(args.compile) - set(args.models)):
        parser.error(f"--compile {unknown[0]}: not among --models (`tiedmask models` lists them)")
    if set(args.models) != set(MODEL_PRESETS) and args.out == parser.get_default("out"):
        parser.error("--models times some of the models: give --out FILE, so that the full table stays")
    writable_folder(Path(args.out).parent, "choose another --out")
    if args.compile:  # a cached compilation would make compile_s (and when compiling pays) look cheaper
        # imported under its own name: `import torch._inductor.config` would make `torch` a local
        # of main, unbound on every run without --compile
        from torch._inductor import config as inductor_config

        inductor_config.force_disable_caches = True
    with_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and bool(bf16_instructions()))
    layouts = ("naive", "bf16") if with_bf16 else ("naive",)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    before = {dtype: peak_gflops(dtype=torch_dtype) for dtype, torch_dtype in dtypes.items()}
    rows = [r for name in args.models for r in measure(name, layouts, name in args.compile)]
    after = {dtype: peak_gflops(dtype=torch_dtype) for dtype, torch_dtype in dtypes.items()}
    # measured before and after the models: the better of the two, for each product
    by_product = {dtype: {product: max(rate, after[dtype][product]) for product, rate in rates.items()}
                  for dtype, rates in before.items()}
    peaks = {dtype: max(rates.values()) for dtype, rates in by_product.items()}
    for r in rows:
        r["mfu_effective"] = r["train_gflops_s"] / peaks["bf16" if r["layout"].startswith("bf16") else "fp32"]
    shown = {dtype: ", ".join(f"{product} {rate:.0f}" for product, rate in rates.items())
             for dtype, rates in by_product.items()}
    print(f"{hardware_name(torch.device('cpu'))}: 2048^3 product peaks, GFLOP/s: fp32 {shown['fp32']}; "
          f"bf16 {shown['bf16']}; MFU against the better one of each row's precision")
    if not with_bf16:
        print("no bf16 rows: this CPU has no bf16 instructions (AMX or AVX512-BF16), where bf16 autocast "
              "is emulated and slower than fp32 (`--bf16 on` times them anyway)")
    print()
    print("| model | masks | layout | params | MFLOPs/img (dense) | MFLOPs/img (eff.) | train img/s | infer img/s "
          "| train GFLOP/s (eff.) | MFU (eff.) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['scope']} | {r['layout']} | {r['params']:,} | {r['mflops_dense']:.1f} "
              f"| {r['mflops_effective']:.1f} | {r['train_img_s']:.0f} | {r['infer_img_s']:.0f} "
              f"| {r['train_gflops_s']:.1f} | {100 * r['mfu_effective']:.1f}% |")

    def img_s(name, scope, layout):
        found = [r["train_img_s"] for r in rows if (r["model"], r["scope"], r["layout"]) == (name, scope, layout)]
        return found[0] if found else None

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    print("\nstep time against the dense step (fast layout), and training img/s ratios:")
    print("| model | multi step / dense step | channel multi step / dense step | fast / naive img/s "
          "| bf16 / fast img/s | compile / fast img/s | bf16+compile / bf16 img/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        dense, multi, bf16 = img_s(name, "dense", "fast"), img_s(name, "multi", "fast"), img_s(name, "multi", "bf16")
        print(f"| {name} | {ratio(dense, multi)} | {ratio(dense, img_s(name, 'multi/channel', 'fast'))} "
              f"| {ratio(multi, img_s(name, 'multi', 'naive'))} | {ratio(bf16, multi)} "
              f"| {ratio(img_s(name, 'multi', 'fast+compile'), multi)} "
              f"| {ratio(img_s(name, 'multi', 'bf16+compile'), bf16)} |")
    compiled = [r for r in rows if "compile_s" in r]
    if compiled:
        print("\ncompiling (multi masks): first step with compilation, and the training time after which it pays")
        print("| model | layout | first step (s) | eager img/s | compiled img/s | pays after |\n|---|---|---:|---:|---:|---:|")
    for r in compiled:
        eager = img_s(r["model"], "multi", r["layout"].removesuffix("+compile"))
        r["pays_after_s"] = pays_after(r["compile_s"], BATCH / eager, BATCH / r["train_img_s"])
        shown = "never" if r["pays_after_s"] is None else f"{r['pays_after_s'] / 60:.1f} min"
        print(f"| {r['model']} | {r['layout']} | {r['compile_s']:.1f} | {eager:.0f} | {r['train_img_s']:.0f} | {shown} |")
    out = Path(args.out)
    out.write_text(json.dumps({"hardware": hardware_name(torch.device("cpu")), "peak_gflops": peaks,
                               "peak_gflops_by_product": by_product,
                               "threads": torch.get_num_threads(), "batch": BATCH,
                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
