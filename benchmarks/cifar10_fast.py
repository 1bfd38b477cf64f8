"""Time to accuracy on CIFAR-10 with the `cifar10-fast` recipe (a multi-mask weight-tied model
of 0.89M parameters) on CPU cores, beside untied networks trained the same way.

    python benchmarks/cifar10_fast.py --data-root ../shared/data     # ~33 min a run; run alone
    python benchmarks/cifar10_fast.py --variants tied tied-channel untied-equal-params untied-equal-flops
    python benchmarks/cifar10_fast.py --minutes 20 --seeds 0 --variants ...   # a shorter budget
    python benchmarks/cifar10_fast.py --minutes 20 --set optim.muon_lr=0      # the recipe, changed
    python benchmarks/cifar10_fast.py --minutes 20 --versus optim.muon_lr=0   # and what a change gained
    python benchmarks/cifar10_fast.py --minutes 15 --set model.width=32 ...   # another width (cifar10_pareto.py)

Each run is one `tiedmask train --recipe cifar10-fast` (29 minutes of training, or `--minutes`;
the recipe's cap of 16 epochs lifted so that the clock decides for every variant; evaluation,
with the recipe's TTA on the full 10k test set after every epoch, is excluded from the clock,
as in airbench), with `--set KEY=VALUE` changes for every variant. Variants: `tied` (the
recipe), `tied-channel` (the recipe with channel masks: each application keeps whole output
channels, so it computes only those), `untied-equal-flops` (the same shape with every application its own weights: the dense
FLOPs of the tied model, more parameters) and `untied-equal-params` (untied, at the width whose
parameter count is nearest the tied model's, found here by building the models). Runs go seed
by seed, so a stopped benchmark leaves paired sets; they train in a results store (`--runs`;
`tiedmask sweep`'s runner: a subprocess a run, its claim, its one resume rule), finished runs
are kept and skipped, interrupted ones resume, and each finished run's record and curve is copied to
benchmarks/results/cifar10_fast_runs/ (commit it) so that a later session on another machine
skips it too; a kept run trained with another recipe than today's (its config hash) is refused.

`--seeds` and `--variants` say what to train; the report covers every kept run of the budget
and recipe change: each variant's final test accuracy (mean ± std over seeds), the recipe's
difference from each other variant and channel masks' from each untied one (paired by the seeds both have, with a 95% t-interval from 2
pairs on), the training time at which each target was first reached, and the
accuracy-against-time curves; with `--versus KEY=VALUE`, each variant minus its own kept runs
of the recipe with that change instead, paired by seed. Writes benchmarks/results/cifar10_fast.json and
docs/img/cifar10_fast_curve.png; a budget or a change is kept apart by a suffix, in the runs'
folders too (`--minutes 20 --set optim.muon_lr=0`: cifar10_fast_20min_muon_lr0.json,
cifar10_fast_20min_muon_lr0_curve.png, tied-20min-muon_lr0/seed0).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tiedmask.core.backbones import count_params  # noqa: E402
from tiedmask.core.presets import build_model  # noqa: E402
from tiedmask.errors import ArgumentParser, TiedmaskError, run_script  # noqa: E402
from tiedmask.experiments.report import fmt  # noqa: E402
from tiedmask.experiments.runner import Job, run_jobs  # noqa: E402
from tiedmask.experiments.store import FINISHED, ResultsStore  # noqa: E402
from tiedmask.training.rundir import CONFIG_FILE, METRICS_FILE, RESULT_FILE, RunDir  # noqa: E402
from tiedmask.training.settings import (RUNTIME_ONLY, config_hash, config_to_dict, load_config,  # noqa: E402
                                        recipe_path, resolve_key)
from paper_claims import interval, mean_interval  # noqa: E402  (this folder's sibling script)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (0.80, 0.85, 0.90, 0.92, 0.93, 0.94)
VARIANTS = ("tied", "tied-channel", "untied-equal-flops", "untied-equal-params")
UNTIED = ["--model.execution", "untied", "--model.masks.scope", "dense"]
CHANNEL = ["--model.masks.kind", "channel"]
# The recipe stops at 29 minutes or 16 epochs. An untied network of equal parameters steps in
# about half the time, so it would stop at 16 epochs well before 29 minutes; lifting the epoch cap
# lets the clock decide for every variant (equal time; the schedule anneals with the clock).
EQUAL_TIME = ["--epochs", "100"]
# Each finished run's record and curve, committed: a later session (often a fresh machine) adds
# seeds without training the finished ones again.
KEPT = ROOT / "benchmarks" / "results" / "cifar10_fast_runs"
KEPT_FILES = (CONFIG_FILE, METRICS_FILE, RESULT_FILE)


# Keys this script sets per run or per variant: a `--set` of one would quietly undo the comparison.
# (`model.width` is a change like any other: the untied network of equal parameters then matches
# the tied model at that width, its own width replacing it: a point of the Pareto plot, cifar10_pareto.py)
OWN_KEYS = {"seed", "epochs", "time_budget_s", "model.execution", "model.masks.scope", "model.masks.kind",
            *RUNTIME_ONLY}
WIDTH = "--model.width"


def params_of(overrides: list[str]) -> int:
    return count_params(build_model(load_config(recipe_path("cifar10-fast"), overrides).model))


@functools.cache
def variant_overrides(variant: str, changes: tuple[str, ...]) -> list[str]:
    """The `tiedmask train` overrides of a variant on top of the (changed) recipe."""
    if variant == "tied":
        return []
    if variant == "tied-channel":
        return CHANNEL
    if variant == "untied-equal-flops":
        return UNTIED
    changed = recipe_changes(changes)
    tied = params_of(changed)
    widths = range(8, load_config(recipe_path("cifar10-fast"), changed).model.width + 1)
    width = min(widths, key=lambda w: abs(params_of(without_width(changed) + UNTIED + [WIDTH, str(w)]) - tied))
    return UNTIED + [WIDTH, str(width)]


def settings_of(variant: str, seed: int, minutes: float | None, changes: tuple[str, ...]) -> list[str]:
    """The `tiedmask train` overrides of one run on top of the recipe."""
    own = variant_overrides(variant, changes)
    settings = ["--seed", str(seed), *EQUAL_TIME, *own]
    settings += [] if minutes is None else ["--time_budget_s", str(60 * minutes)]
    return settings + without_width(recipe_changes(changes)) if WIDTH in own else settings + recipe_changes(changes)


def without_width(overrides: list[str]) -> list[str]:
    """The overrides less a `--model.width N` (a variant that sets its own width)."""
    pairs = list(zip(overrides[::2], overrides[1::2]))
    return [part for key, value in pairs if key != WIDTH for part in (key, value)]


def run(variant: str, seed: int, store: ResultsStore, data_root: str, minutes: float | None,
        changes: tuple[str, ...]) -> None:
    """Train a run into the results store (or resume it, or take it finished from there) unless
    its record is kept in git from an earlier session's machine, so that seeds can be added one
    session at a time; then keep it in git's folder."""
    name = Path(variant + run_tag(minutes, changes)) / f"seed{seed}"
    kept = KEPT / name
    if RunDir(kept).is_finished():  # checked against today's recipe by kept_runs, before training
        return
    settings = settings_of(variant, seed, minutes, changes)
    config = config_to_dict(load_config(recipe_path("cifar10-fast"), [*settings, "--data.root", data_root]))
    print(f"{name}: training (its epochs go to {store.root}/runs/<hash>/metrics.jsonl)", flush=True)
    [record] = run_jobs([Job(variant, config, tags={"race": run_tag(minutes, changes) or "recipe"})], store)
    if record["status"] not in FINISHED:
        raise TiedmaskError(f"{name} failed: {record.get('reason', '')}; fix that and run this again: "
                            "finished runs are kept and this one resumes")
    keep(store.run_dir_of(record), kept)


def kept_runs(minutes: float | None, changes: tuple[str, ...]) -> dict[tuple[str, int], Path]:
    """Every finished run of this budget and recipe change kept in git, checked to have been
    trained with today's recipe: the report covers them all, whatever this call trained."""
    found = {}
    for variant in VARIANTS:
        folder = KEPT / (variant + run_tag(minutes, changes))
        seeds = [int(f.name[4:]) for f in folder.glob("seed*") if re.fullmatch(r"seed\d+", f.name) and RunDir(f).is_finished()]
        for seed in sorted(seeds):
            found[variant, seed] = run_dir = folder / f"seed{seed}"
            check_recipe(run_dir, settings_of(variant, seed, minutes, changes))
    return found


def check_recipe(run_dir: Path, settings: list[str]) -> None:
    """Refuse a finished run trained with another recipe than today's (the recipe has changed)."""
    trained = RunDir(run_dir).read_result()["config_hash"]
    if trained != config_hash(load_config(recipe_path("cifar10-fast"), settings)):
        raise TiedmaskError(f"the finished run {run_dir} was trained with another recipe than today's; "
                            "move that folder out of its parent folder to train it again")


def keep(run_dir: Path, kept: Path) -> None:
    """Copy what the report reads of a finished run (not its checkpoint) to where git keeps it."""
    kept.mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        shutil.copyfile(run_dir / name, kept / name)


def recipe_minutes() -> float:
    return load_config(recipe_path("cifar10-fast")).time_budget_s / 60


def recipe_changes(changes: tuple[str, ...]) -> list[str]:
    """`--set optim.muon_lr=0` as `tiedmask train` overrides: the recipe with a change, for every variant."""
    return [part for key, _, value in (change.partition("=") for change in changes) for part in ("--" + key, value)]


def run_tag(minutes: float | None, changes: tuple[str, ...]) -> str:
    """Runs, results and plot of a budget other than the recipe's, or of a changed recipe, are kept
    apart by this suffix (`-20min`, `-20min-muon_lr0`)."""
    budget = "" if minutes is None else f"-{minutes:g}min"
    return budget + "".join("-{}{}".format(key.rpartition(".")[2], value)
                            for key, _, value in (change.partition("=") for change in changes))


def curve(run_dir: Path) -> list[tuple[float, float]]:
    rows = RunDir(run_dir).metrics()
    return [(r["train_time_s"], r["test_acc"]) for r in rows if r["test_acc"] is not None]


def first_time_at(points, target: float) -> float | None:
    return next((t for t, acc in points if acc >= target), None)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return fmt((statistics.mean(values), statistics.stdev(values)))


def finals_by_seed(summary: dict, variant: str) -> dict[int, float]:
    return dict(zip(summary[variant]["seeds"], summary[variant]["final_test_acc"]))


def paired_minus(first: dict[int, float], second: dict[int, float]) -> dict | None:
    """Final test accuracy (points) of one set of runs minus another's, paired by the seeds both
    have, with its 95% t-interval (None if they share no seed)."""
    seeds = sorted(first.keys() & second.keys())
    if not seeds:
        return None
    per_seed = [first[s] - second[s] for s in seeds]
    interval = {k: None if isinstance(v, float) and math.isnan(v) else v  # JSON has no NaN
                for k, v in mean_interval(per_seed).items()}
    return {**interval, "seeds": seeds, "per_seed": per_seed}


def compared(summary: dict) -> list[tuple[str, str]]:
    """The pairs the report compares: the recipe against each other variant, and channel masks
    against each untied network."""
    pairs = [("tied", v) for v in summary if v != "tied"]
    pairs += [("tied-channel", v) for v in summary if v.startswith("untied")]
    return [(a, b) for a, b in pairs if a in summary]


def print_difference(label: str, diff: dict | None) -> None:
    if diff is None:
        print(f"{label}: no seed in common")
        return
    print(f"{label}: {interval(diff)} pp{'' if diff['n'] < 2 else ' (95% CI)'}, per seed "
          f"{', '.join(f'{s}: {d:+.2f}' for s, d in zip(diff['seeds'], diff['per_seed']))}")


def recipe_change(text: str) -> str:
    """One `--set KEY=VALUE`; its value names folders and files, so it is a plain word or number."""
    key, equals, value = text.partition("=")
    if not (equals and re.fullmatch(r"[A-Za-z0-9_.]+", key) and re.fullmatch(r"[A-Za-z0-9_.+-]+", value)):
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE with a plain word or number as the value "
                                         f"(as optim.muon_lr=0), got {text!r}")
    return text


def checked_changes(changes: list[str]) -> tuple[str, ...]:
    """The `--set` changes in one order (the same runs whatever order they are given in), each key
    known, once, and not one this script sets itself."""
    keys = [resolve_key(change.partition("=")[0]) for change in changes]  # an unknown key: ConfigError
    if len(set(keys)) < len(keys):
        raise TiedmaskError(f"--set names a key twice ({', '.join(keys)}); give each key once")
    if own := sorted(set(keys) & OWN_KEYS):
        raise TiedmaskError(f"--set {own[0]}: this benchmark sets it itself, per run or per variant; "
                            "use --seeds, --minutes or --data-root, or train such a run by hand")
    return tuple(sorted(changes))


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds to train (the report covers every kept one)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["tied"], help="variants to train")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "cifar10-fast",
                        help="the results store the runs train in (one for every budget and change)")
    parser.add_argument("--minutes", type=float, help="training minutes a run (default: the recipe's time_budget_s)")
    parser.add_argument("--set", dest="changes", type=recipe_change, action="append", default=[], metavar="KEY=VALUE",
                        help="change the recipe for every variant (as optim.muon_lr=0); such runs are kept apart")
    parser.add_argument("--versus", type=recipe_change, action="append", default=[], metavar="KEY=VALUE",
                        help="also pair each variant by seed with its kept runs of the recipe with these changes "
                             "instead (as optim.muon_lr=0: what the change of the recipe gained)")
    args = parser.parse_args()
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        parser.error(f"--minutes must be positive, got {args.minutes:g}")
    changes = checked_changes(args.changes)
    versus = kept_runs(args.minutes, checked_changes(args.versus)) if args.versus else {}
    tag = run_tag(args.minutes, changes)
    for seed in args.seeds:  # every asked-for config loads (a wrong value: one error line) before hours of training
        for variant in args.variants:
            load_config(recipe_path("cifar10-fast"), settings_of(variant, seed, args.minutes, changes))
    kept_runs(args.minutes, changes)  # and no kept run of another recipe waits to stop the report
    store = ResultsStore.for_writing(args.runs)
    for seed in args.seeds:
        for variant in args.variants:
            run(variant, seed, store, args.data_root, args.minutes, changes)
    run_dirs = kept_runs(args.minutes, changes)
    curves = {key: curve(d) for key, d in run_dirs.items()}
    results = {key: RunDir(d).read_result() for key, d in run_dirs.items()}
    machines = "; ".join(sorted({r.get("hardware", "not recorded") for r in results.values()}))
    print(f"cifar10-fast{tag} on {machines}\n")
    summary = {}
    for variant in dict.fromkeys(v for v, _ in run_dirs):
        keys = [k for k in run_dirs if k[0] == variant]
        finals = [100 * results[k]["test_acc"] for k in keys]
        reached = {str(t): [first_time_at(curves[k], t) for k in keys] for t in TARGETS}
        summary[variant] = {"params": results[keys[0]]["params"], "seeds": [s for _, s in keys], "final_test_acc": finals,
                            "time_to_target_s": reached, "overrides": variant_overrides(variant, changes) + recipe_changes(changes)}
        print(f"{variant}: {results[keys[0]]['params']:,} params; final test accuracy {mean_std(finals)} %")
        for target, times in reached.items():
            shown = ", ".join("not reached" if t is None else f"{t / 60:.1f} min" for t in times)
            print(f"  time to {float(target):.0%}: {shown}")
        for k in keys:
            r = results[k]
            # a run from before precisions were recorded trained on a CPU in fp32
            print(f"  seed {k[1]}: {100 * r['test_acc']:.2f}% after {r['epochs']} epochs, "
                  f"{r['train_time_s'] / 60:.1f} min training, {r['img_per_s']:.0f} img/s, "
                  f"{r.get('precision') or 'fp32'} on {r.get('hardware', 'a machine not recorded')}")
    precisions = {(r.get("precision") or "fp32", r.get("hardware")) for r in results.values()}
    if len(precisions) > 1:
        print("note: these runs differ in precision or machine; compare times only within one")
    for tied, other in compared(summary):
        summary[tied].setdefault("minus_pp", {})[other] = diff = paired_minus(finals_by_seed(summary, tied),
                                                                              finals_by_seed(summary, other))
        print_difference(f"{tied} - {other}", diff)
    for variant in summary if versus else ():
        theirs = {s: 100 * RunDir(d).read_result()["test_acc"] for (v, s), d in versus.items() if v == variant}
        summary[variant]["minus_versus_pp"] = diff = paired_minus(finals_by_seed(summary, variant), theirs)
        print_difference(f"{variant} - {variant} with {', '.join(args.versus)}", diff)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    colors = dict(zip(VARIANTS, ("C0", "C3", "C1", "C2")))
    styles = {seed: ("-", "--", ":", "-.")[i % 4] for i, seed in enumerate(sorted({s for _, s in run_dirs}))}
    for (variant, seed), points in curves.items():
        ax.plot([t / 60 for t, _ in points], [100 * a for _, a in points], marker="o", ms=3,
                color=colors[variant], ls=styles[seed],
                label=f"{variant} ({summary[variant]['params'] / 1e6:.2f}M), seed {seed}")
    for target in (92, 93):  # the targets: 92% in 20 minutes, 93% in 30
        ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"training time (min; {machines})", fontsize=8)
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_ylim(bottom=75)
    ax.set_title(f"cifar10-fast recipe{' with ' + ', '.join(changes) if changes else ''}: "
                 "tied multi-mask and untied", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    file_tag = tag.replace("-", "_")
    fig.savefig(ROOT / "docs" / "img" / f"cifar10_fast{file_tag}_curve.png", dpi=120)

    out = ROOT / "benchmarks" / "results" / f"cifar10_fast{file_tag}.json"
    out.write_text(json.dumps({"hardware": machines, "torch": torch.__version__, "recipe_changes": changes, "versus": args.versus,
                               "minutes": args.minutes or recipe_minutes(), "variants": summary,
                               "curves": {f"{v}/seed{s}": c for (v, s), c in curves.items()},
                               "results": {f"{v}/seed{s}": r for (v, s), r in results.items()}},
                              indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
