"""How much of a trained decoder survives tying (issue 34): held-out test perplexity against
parameters, over seeds, with seed-paired comparisons.

    tiedmask train --recipe lm-python-docs --data.download true --out runs/lm-base
    tiedmask sweep benchmarks/grids/lm_uptrain.yaml --out runs/lm-uptrain
    python benchmarks/lm_uptrain.py runs/lm-uptrain --teacher runs/lm-base

Prints one row per variant (parameters, trained parameters, test perplexity mean ± std over
seeds, validation perplexity, tokens/s, machine) and the paired comparisons of the grid's
questions, each with a 95% t-interval of the difference in test perplexity and the verdict rule's
word (tiedmask.experiments.verdict; lower perplexity is better). Writes
benchmarks/results/lm_uptrain.json, the plots benchmarks/results/lm_uptrain.png (test perplexity
against parameters) and lm_teacher_curve.png (the teacher's validation curve), and keeps the
store's records in benchmarks/results/stores/lm-uptrain.results.jsonl.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tiedmask.errors import ArgumentParser, TiedmaskError, run_script
from tiedmask.experiments.store import ResultsStore
from tiedmask.experiments.verdict import mean_interval, paired_difference, verdict
from tiedmask.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
# (a, b, what a winning means, what b winning means): a − b in test perplexity, paired by seed
COMPARISONS = [
    ("cycle-g6", "cycle-g6-nodistill", "distillation helps", "distillation hurts"),
    ("cycle-g6-multi", "cycle-g6", "multi-mask tying beats dense tying", "dense tying beats multi-mask tying"),
    ("cycle-g6-mmlora32", "cycle-g6-lora16-zero", "multi-mask LoRA beats LoRA (equal trained parameters)",
     "LoRA beats multi-mask LoRA (equal trained parameters)"),
    ("cycle-g6-lora16-svd", "cycle-g6-lora16-zero", "SVD start beats zero start", "zero start beats SVD start"),
    ("sequence-g6", "cycle-g6", "sequence beats cycle", "cycle beats sequence"),
    ("cycle-g6", "untied-6l", "tied uptrained beats untied of equal size", "untied of equal size beats tied"),
    ("cycle-g4", "untied-4l", "tied uptrained beats untied of equal size", "untied of equal size beats tied"),
    ("cycle-g6-lora16-svd", "untied-6l", "relaxed recursive beats untied of equal size (+0.9M)",
     "untied of equal size beats relaxed recursive"),
]


def plot(rows: dict, teacher: dict | None, path: Path) -> None:
    from tiedmask.plots import plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, row in sorted(rows.items()):
        ppl = row["test_ppl"]
        marker = "s" if label.startswith("untied") else "o"
        ax.errorbar(row["params"] / 1e6, ppl["mean"], yerr=0 if ppl["n"] < 2 else ppl["std"], marker=marker,
                    capsize=3, linestyle="none")
        ax.annotate(label, (row["params"] / 1e6, ppl["mean"]), fontsize=6, xytext=(4, 2), textcoords="offset points")
    if teacher:
        ax.plot(teacher["params"] / 1e6, teacher["test_ppl"], marker="*", markersize=12, linestyle="none")
        ax.annotate("teacher (untied, 12 layers)", (teacher["params"] / 1e6, teacher["test_ppl"]), fontsize=6,
                    xytext=(4, -8), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title("python-docs: tied and relaxed decoders after 0.5M tokens of uptraining", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="the store of benchmarks/grids/lm_uptrain.yaml")
    parser.add_argument("--teacher", default="", help="the teacher run (the grid's finetune.init_from)")
    args = parser.parse_args()
    store = ResultsStore.existing(args.store)
    runs = [r for r in store.records() if r.get("status") == "ok" and r.get("task") == "lm"]
    if not runs:
        raise TiedmaskError(f"{args.store} has no finished language-model run yet; run the grid first")
    by_variant: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    teacher = None
    if args.teacher:
        run = RunDir(args.teacher)
        if not run.is_finished():
            raise TiedmaskError(f"{args.teacher} has no result.json; finish the teacher run first")
        teacher = run.read_result()
        if teacher.get("task") != "lm":
            raise TiedmaskError(f"{args.teacher} is not a language-model run; give the grid's teacher")
    rows = {}
    print("| variant | params | trained | test ppl | val ppl | seeds | tokens/s | machine |\n"
          "|---|---:|---:|---:|---:|---:|---:|---|")
    if teacher:
        print(f"| teacher (untied, 12 layers) | {teacher['params'] / 1e6:.2f}M | – | {teacher['test_ppl']:.2f} | "
              f"{teacher['val_ppl']:.2f} | 1 | {teacher['tokens_per_s']:.0f} | {teacher['hardware']} |")
    for label, seeds in sorted(by_variant.items(), key=lambda kv: -statistics.mean(r["test_ppl"] for r in kv[1].values())):
        first = next(iter(seeds.values()))
        ppl = mean_interval([r["test_ppl"] for r in seeds.values()])
        val = statistics.mean(r["val_ppl"] for r in seeds.values())
        speed = statistics.mean(r["tokens_per_s"] for r in seeds.values())
        rows[label] = {"params": first["params"], "trainable": first["trainable_params"], "test_ppl": ppl,
                       "val_ppl": val, "tokens_per_s": speed, "seeds": sorted(seeds)}
        spread = "" if ppl["n"] < 2 else f" ± {ppl['std']:.2f}"
        print(f"| {label} | {first['params'] / 1e6:.2f}M | {first['trainable_params'] / 1e6:.2f}M | "
              f"{ppl['mean']:.2f}{spread} | {val:.2f} | {ppl['n']} | {speed:.0f} | {first.get('hardware', '')} |")
    comparisons = []
    print("\n| comparison | a − b test ppl [95% CI] | pairs | verdict |\n|---|---:|---:|---|")
    for a, b, better, worse in COMPARISONS:
        if a not in by_variant or b not in by_variant:
            continue
        diff = paired_difference({s: r["test_ppl"] for s, r in by_variant[a].items()},
                                 {s: r["test_ppl"] for s, r in by_variant[b].items()})
        if diff is None:  # no seed in common yet
            continue
        word = verdict(diff, worse, better)  # a − b > 0 means a is worse (perplexity)
        comparisons.append({"a": a, "b": b, "difference": diff, "verdict": word})
        interval = "" if diff is None or diff["n"] < 2 else f" [{diff['low']:+.2f}, {diff['high']:+.2f}]"
        print(f"| {a} − {b} | {diff['mean']:+.2f}{interval} | {diff['n']} | {word} |")
    results = ROOT / "benchmarks" / "results"
    if teacher:
        from tiedmask.plots import plot_curves

        rows_by_epoch = RunDir(args.teacher).metrics()
        curve = [r["val_ppl"] for r in rows_by_epoch if r.get("val_ppl") is not None]
        print("\nteacher, validation perplexity by epoch: " + ", ".join(f"{v:.2f}" for v in curve))
        plot_curves({"teacher (untied, 12 layers)": [curve]}, results / "lm_teacher_curve.png",
                    "validation perplexity", "python-docs: the teacher's validation perplexity by epoch")
    (results / "lm_uptrain.json").write_text(json.dumps(
        {"teacher": teacher, "variants": rows, "comparisons": comparisons}, indent=1, default=str) + "\n")
    plot(rows, teacher, results / "lm_uptrain.png")
    (results / "stores").mkdir(exist_ok=True)
    (results / "stores" / "lm-uptrain.results.jsonl").write_bytes(store.path.read_bytes())


if __name__ == "__main__":
    run_script(main)
