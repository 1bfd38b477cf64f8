"""`tiedmask bench PRESET`: the fair comparison of weight-tied and equilibrium runs of one cell.

Every variant shares the cell, its parameters, the data pipeline and the optimiser; only the
way the cell runs differs. Budgets: equal epochs, and equal wall-clock training time.

>>> [j.variant for j in bench_jobs("demo", seeds=[0], budgets=("epochs",))][:3]
['tied-dense', 'tied-same', 'tied-multi']
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..errors import ConfigError
from ..training.settings import merge
from .report import bar_plot, failures, markdown_table, scatter_plot, speed_ratio, summarize
from .runner import Job, run_jobs
from .store import ResultsStore

VARIANTS = {  # variant -> model settings on top of the preset's model
    "tied-dense": {"execution": "unrolled", "masks": {"scope": "dense"}},
    "tied-same": {"execution": "unrolled", "masks": {"scope": "same"}},
    "tied-multi": {"execution": "unrolled", "masks": {"scope": "multi"}},
    "untied": {"execution": "untied", "masks": {"scope": "dense"}},
    "deq-anderson-implicit": {"execution": "equilibrium", "masks": {"scope": "dense"},
                              "deq": {"solver": "anderson", "grad": "implicit"}},
    "deq-anderson-phantom": {"execution": "equilibrium", "masks": {"scope": "dense"},
                             "deq": {"solver": "anderson", "grad": "phantom"}},
}

# Relaxations of a tied model of another library (timm:/hf:, `tiedmask.core.tie`).
TIE_VARIANTS = {
    "tied-multi-lora": {"execution": "unrolled", "masks": {"scope": "multi"}, "tie": {"relax": "lora"}},
    "tied-multi-mmlora": {"execution": "unrolled", "masks": {"scope": "multi"},
                          "tie": {"relax": "multimask-lora"}},
}
ALL_VARIANTS = {**VARIANTS, **TIE_VARIANTS}

BENCH_PRESETS = {
    # Offline, minutes: 8x8 digits.
    "demo": {
        "base": {"model": {"name": "tied-resnet-xs", "width": 16, "depth": 4, "masks": {"density": 0.5}},
                 "data": {"name": "digits"}, "epochs": 5, "batch_size": 32,
                 "optim": {"lr": 3e-3, "warmup_epochs": 1}},
        "time_budget_s": 8.0,
    },
    # CIFAR-10 on a CPU budget: a fixed 4k-image train subset, 2k test images.
    "cifar10": {
        "base": {"model": {"name": "tied-resnet-s", "width": 16, "depth": 4, "masks": {"density": 0.5}},
                 "data": {"name": "cifar10", "train_subset": 4000, "test_subset": 2000},
                 "epochs": 2, "batch_size": 64, "optim": {"lr": 3e-3, "warmup_epochs": 0.25}},
        "time_budget_s": 45.0,
    },
    # `tie` on a library model: a Hugging Face ViT sized for 32x32 (6 blocks of width 96,
    # patch 4), untied against its tied versions, on full CIFAR-10.
    "vit-tie": {
        "base": {"model": {"name": "hf:vit", "masks": {"density": 0.5},
                           "args": {"hidden_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
                                    "intermediate_size": 192, "patch_size": 4}},
                 "data": {"name": "cifar10"}, "epochs": 2, "batch_size": 128,
                 "optim": {"lr": 2e-3, "warmup_epochs": 0.2}},
        "time_budget_s": 240.0,
        "variants": ["untied", "tied-dense", "tied-multi", "tied-multi-lora", "tied-multi-mmlora"],
    },
}


def bench_jobs(preset: str, seeds=(0, 1), budgets=("epochs", "time"), variants=None,
               epochs: int | None = None, time_budget_s: float | None = None,
               data_root: str = "") -> list[Job]:
    """The runs of a bench preset: every variant x seed x budget."""
    if preset not in BENCH_PRESETS:
        raise ConfigError(f"unknown bench preset {preset!r}; choose one of {sorted(BENCH_PRESETS)}")
    spec = BENCH_PRESETS[preset]
    chosen = variants or spec.get("variants") or list(VARIANTS)
    unknown = sorted(set(chosen) - set(ALL_VARIANTS))
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {sorted(ALL_VARIANTS)}")
    jobs = []
    for budget in budgets:
        if budget not in ("epochs", "time"):
            raise ConfigError(f"unknown budget {budget!r}; use epochs and/or time")
        for variant in chosen:
            for seed in seeds:
                cfg = merge(copy.deepcopy(spec["base"]), {"model": ALL_VARIANTS[variant]})
                cfg["seed"] = seed
                if epochs:
                    cfg["epochs"] = epochs
                if data_root:
                    cfg["data"]["root"] = data_root
                if budget == "time":
                    # Enough epochs that the clock, not the epoch count, ends every run.
                    cfg["time_budget_s"] = time_budget_s or spec["time_budget_s"]
                    cfg["epochs"] = max(cfg["epochs"] * 20, 50)
                jobs.append(Job(variant, cfg, {"budget": "equal-epochs" if budget == "epochs"
                                               else f"equal-time ({cfg['time_budget_s']:.0f}s)"}))
    return jobs


def run_bench(preset: str, out: str | Path, workers: int = 1, threads: int = 0, log=print,
              timeout_s: float | None = None, **job_options) -> tuple[str, list[dict]]:
    """Run (or finish) a bench into `out`, write report.md and plots there; (report, records)."""
    jobs = bench_jobs(preset, **job_options)
    store = ResultsStore.for_writing(out)
    records = run_jobs(jobs, store, workers, threads, timeout_s, log=log)
    return write_bench_report(records, Path(out), preset), records


SPEED_MISMATCH = 3.0  # img/s ratio within one time budget that the report calls out


def speed_mismatches(rows: list[dict]) -> list[str]:
    """A flag per equal-time budget whose variants trained at very different speeds: there the
    comparison says more about throughput (or about runs sharing the machine) than about models."""
    lines = []
    for budget in sorted({r["budget"] for r in rows if r["budget"] != "equal-epochs"}):
        speeds = {r["variant"]: r["img_per_s"][0] for r in rows if r["budget"] == budget and r.get("img_per_s")}
        if len(speeds) > 1 and min(speeds.values()) > 0:
            fast, slow = max(speeds, key=speeds.get), min(speeds, key=speeds.get)
            ratio = speeds[fast] / speeds[slow]
            if ratio >= SPEED_MISMATCH:
                lines.append(f"- flag: in {budget}, {fast} trained {ratio:.1f}x as many img/s as {slow} "
                             f"({speeds[fast]:.0f} against {speeds[slow]:.0f}): at equal time that gap decides "
                             "more than the models do; check that the runs did not share the machine")
    return lines + ([""] if lines else [])


def write_bench_report(records: list[dict], out: Path, title: str) -> str:
    by = ("budget", "variant")
    rows = summarize(records, by)
    metrics = ("test_acc", "final_train_loss", "s_per_epoch", "train_time_s", "epochs", "data_epochs",
               "img_per_s", "peak_mem_mb", "fwd_iters", "fwd_rel_residual", "bwd_iters")
    lines = [f"# bench: {title}", "", markdown_table(rows, by, metrics), ""]
    if any(r["budget"] != "equal-epochs" for r in rows):
        lines += ["Under a time budget the clock may stop an epoch part-way: `epochs` counts the epochs "
                  "begun, `passes over the data` the images trained on over the training set's size, "
                  "and s / epoch is the time per pass.", ""]
    lines += speed_mismatches(rows)
    epoch_rows = [r for r in rows if r["budget"] == "equal-epochs"]
    for deq in ("deq-anderson-implicit", "deq-anderson-phantom"):
        ratio = speed_ratio(epoch_rows, deq, "tied-multi")
        if ratio == ratio:  # not NaN
            lines.append(f"- s/epoch of {deq} over tied-multi: **{ratio:.2f}x**")
    if failures(records):
        lines += ["", "Runs not ok:", *failures(records)]
    for budget in sorted({r["budget"] for r in rows}):
        sub = [r for r in rows if r["budget"] == budget]
        tag = "epochs" if budget == "equal-epochs" else "time"
        bar_plot(sub, ("variant",), "test_acc", out / f"acc_{tag}.png", f"{title}: test accuracy, {budget}")
    if epoch_rows:
        scatter_plot(epoch_rows, ("variant",), "s_per_epoch", "test_acc", out / "acc_vs_time.png",
                     f"{title}: accuracy against seconds per epoch (equal epochs)")
    lines += ["", "Plots: " + ", ".join(sorted(p.name for p in out.glob("*.png")))]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    return report
