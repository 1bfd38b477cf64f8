"""The `tiedmask` command: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import textwrap
from pathlib import Path

from .errors import ArgumentParser, TiedmaskError, error_line

def overrides_help() -> str:
    """The settings reference of `train --help` and `info --help`, generated from the settings
    dataclasses (a key added to a section appears here by itself)."""
    from .training.settings import TrainConfig
    from .typed import nested_fields

    sections: dict[str, list[str]] = {}
    for key, _ in nested_fields(TrainConfig):
        section, _, leaf = key.rpartition(".")
        sections.setdefault(section, []).append(leaf)
    top = sections.pop("")
    listed = ", ".join(f"{section} ({' '.join(leaves)})" for section, leaves in sections.items())
    return f"""overrides: --KEY VALUE for any config key, dotted (--model.depth 6) or by its
leaf name (--depth 6; a name shared with the model means the model's); --model NAME and
--data NAME pick a preset and a dataset.
{textwrap.fill(f"Sections: {listed}, and {' '.join(top)}.", 92)}
A section path may stand for the whole key (--masks.scope same, --deq.solver_options "{{m: 3}}");
the flat keys of 0.1 (--mask_scope, --deq_solver) still work.
`tiedmask info` shows a resolved model. Data-parallel: `torchrun --nproc_per_node N -m
tiedmask.cli train ...`."""


def cmd_train(args, overrides) -> int:
    from .training.rundir import RunDir
    from .training.settings import load_config, recipe_path
    from .training.train import train

    if args.resume:
        if args.config or args.recipe or overrides or args.out:
            raise TiedmaskError("--resume DIR continues a run with its saved config; "
                                "drop the config file, --out and overrides")
        cfg, out, resume = RunDir(args.resume).read_config(), args.resume, True
    else:
        if args.recipe and args.config:
            raise TiedmaskError("give a config file or --recipe, not both (overrides go on top of either)")
        path = recipe_path(args.recipe) if args.recipe else args.config
        cfg, out, resume = load_config(path, overrides), args.out, False
    return _report_run(train(cfg, out=out, resume=resume), out)


def _report_run(result, out) -> int:
    if result.task == "lm":
        score = (f"test perplexity {result.test_ppl:.2f} (next-token accuracy {result.test_acc:.2%})"
                 f", {result.params:,} params ({result.trainable_params:,} trained)"
                 f", {result.train_time_s:.1f}s training, {result.tokens_per_s:.0f} tokens/s")
    else:
        score = (f"{result.eval_split} acc {result.test_acc:.2%}, {result.params:,} params, "
                 f"{result.train_time_s:.1f}s training, {result.img_per_s:.0f} img/s")
    print(f"{result.status}: {score}" + (f"; run saved in {out}" if out else ""))
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    return 0 if result.status == "ok" else 1


def cmd_uptrain(args, overrides) -> int:
    from .experiments.uptrain import uptrain_config
    from .training.train import train

    cfg = uptrain_config(args.run_dir, args.tie, args.distill, args.tokens, overrides)
    return _report_run(train(cfg, out=args.out), args.out)


def cmd_finetune(args, overrides) -> int:
    from .training.finetune import pretrained_defaults
    from .training.rundir import RunDir
    from .training.settings import config_from_dict, merge, parse_overrides
    from .training.train import train

    values = merge(pretrained_defaults(RunDir(args.run_dir)), {"finetune": {"method": args.method}})
    cfg = config_from_dict(merge(values, parse_overrides(overrides)))
    result = train(cfg, out=args.out)
    print(f"{result.status}: test acc {result.test_acc:.2%}, {result.trainable_params:,} of "
          f"{result.params:,} parameters trained ({args.method})")
    return 0 if result.status == "ok" else 1


def cmd_eval(args, overrides) -> int:
    from .training.evaluate import score_run

    if overrides:
        raise TiedmaskError(f"eval scores a run as it was trained and takes no overrides "
                            f"({' '.join(overrides)}); use --data-root DIR if the data moved")
    from .training.lm import score_lm_run

    lm_scores = score_lm_run(args.run_dir, args.data_root) if args.tta is None else None
    if lm_scores is not None:
        loss, acc, tokens = lm_scores
        print(f"{args.run_dir}: test perplexity {math.exp(min(loss, 700)):.2f}, {loss:.4f} nats per token, "
              f"next-token accuracy {acc:.2%} over {tokens:,} tokens")
        return 0
    acc, loss, cfg, data = score_run(args.run_dir, args.data_root, args.tta)
    print(f"{args.run_dir}: test acc {acc:.2%}, test loss {loss:.4f} on {data.name} "
          f"({len(data.test_x)} images, test-time views: {cfg.eval_tta})")
    return 0


def cmd_models(args, overrides) -> int:
    from .core.backbones import count_params
    from .core.presets import MODEL_PRESETS, create_model

    print(f"{'model':<20} {'params (3->10)':>14}  description")
    for name, fn in sorted(MODEL_PRESETS.items()):
        print(f"{name:<20} {count_params(create_model(name)):>14,}  {fn.__doc__.strip()}")
    print("\nAlso any timm model as timm:NAME and any Hugging Face image classifier as hf:TYPE "
          "(hf:vit, hf:resnet, ...), with model.args for its builder and model.tie for tying.")
    return 0


def cmd_info(args, overrides) -> int:
    from .core.backbones import count_params
    from .core.flops import count_macs
    from .core.layers import masked_layers
    from .core.masks import mask_statistics
    from .core.presets import build_model
    from .core.spec import DataShape
    from .training.settings import load_config

    cfg = load_config(args.config, overrides)
    m = cfg.model
    if not 1 <= args.image_size <= 4096 or not 1 <= args.channels <= 64:
        raise TiedmaskError("--image-size must be in 1..4096 and --channels in 1..64")
    shape = DataShape(args.channels, args.image_size)
    model = build_model(m, shape)
    size = args.image_size
    macs = count_macs(model, (shape.channels, size, size))
    if m.external:
        from .core.tied_block import tie_summary

        summary = tie_summary(model)
        print(f"model {m.name}: {m.execution}, masks {m.masks.kind}/{m.masks.scope} at density "
              f"{m.masks.density}, {summary['parameters_before']:,} parameters before tying")
        for run in summary["runs"]:
            print(f"  tied {run['blocks']}: {run['applications']} applications of one block; "
                  f"shared {run['shared']:,}, per application {run['per_application']:,}, "
                  f"relaxation {run['relaxation']:,} (untied {run['parameters_before']:,})")
    else:
        print(f"model {m.name}: cell {m.cell}, {m.execution}, width {m.width}, depth {m.depth}, "
              f"stages {m.stages}, masks {m.masks.kind}/{m.masks.scope} at density {m.masks.density}")
    print(f"parameters        {count_params(model):,}")
    print(f"MACs / image      {macs['dense'] / 1e6:.2f}M dense, {macs['effective'] / 1e6:.2f}M "
          f"effective ({shape.channels}x{size}x{size})")
    print(f"FLOPs / image     {2 * macs['dense'] / 1e6:.2f}M dense, {2 * macs['effective'] / 1e6:.2f}M effective")
    for name, layer in masked_layers(model):
        stack = layer.mask_stack()
        if stack is not None:
            stats = mask_statistics(stack)
            print(f"  {name:<28} density {stats['density']:.3f}, {len(stack)} mask(s), "
                  f"mean overlap {stats['mean_overlap']:.3f}")
    return 0


def cmd_demo(args, overrides) -> int:
    from .experiments.demo import run_demo

    if args.epochs < 1:
        raise TiedmaskError(f"--epochs {args.epochs}: the demo needs at least 1 epoch")
    run_demo(args.out, epochs=args.epochs)
    return 0


def cmd_bench(args, overrides) -> int:
    from .experiments.bench import run_bench

    report, records = run_bench(args.preset, args.out, workers=args.workers, threads=args.threads,
                                timeout_s=args.timeout, seeds=args.seeds, budgets=args.budgets,
                                variants=args.variants, epochs=args.epochs,
                                time_budget_s=args.time_budget, data_root=args.data_root)
    print(report)
    return exit_status(records)


def exit_status(records: list[dict]) -> int:
    """1 when any run failed or diverged (each named on stderr with its reason), else 0."""
    from .experiments.report import failures

    for line in failures(records):
        print(line, file=sys.stderr)
    return 1 if failures(records) else 0


def cmd_report(args, overrides) -> int:
    from .experiments.bench import write_bench_report
    from .experiments.report import write_sweep_report
    from .experiments.store import ResultsStore
    from .files import writable_folder

    records = ResultsStore.existing(args.store).records()
    writable_folder(Path(args.store), "copy the store somewhere writable and report that copy")  # report.md goes there
    write = write_bench_report if any("budget" in r for r in records) else write_sweep_report
    print(write(records, Path(args.store), Path(args.store).name))
    return 0


def cmd_sweep(args, overrides) -> int:
    from .experiments.report import write_sweep_report
    from .experiments.sweep import plan_sweep, run_sweep

    if args.plan:
        rows = plan_sweep(args.grid, args.out, variants=args.variants)
        for row in rows:
            print(f"  {row['variant']:<28} seed {row['seed']:<3} {row['config_hash']}  {row['plan']}")
        done = sum(row["state"] in ("finished", "reuse") for row in rows)
        held = sum(row["state"] == "running" for row in rows)
        print(f"{len(rows)} runs: {done} finished or reusable, {held} running elsewhere, "
              f"{len(rows) - done - held} to train")
        return 0
    records = run_sweep(args.grid, args.out, variants=args.variants)
    print(write_sweep_report(records, Path(args.out), Path(args.grid).stem))
    return exit_status(records)


def cmd_advise(args, overrides) -> int:
    from .experiments.advise import advise

    print(advise(args.params, args.flops, args.store))
    return 0


def cmd_analyze(args, overrides) -> int:
    from .analysis.analyze import analyze_run, summary_markdown
    from .training.rundir import RunDir

    if args.images < 4:
        raise TiedmaskError(f"--images {args.images}: CKA needs at least 4 images; use e.g. --images 1000")
    result = analyze_run(args.run_dir, images=args.images, data_root=args.data_root)
    print(summary_markdown(result, RunDir(args.run_dir).read_config(), result["images"]))
    print(f"wrote {Path(args.run_dir) / 'analysis'}")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown beside every argument; epilogs kept as written."""


def build_parser() -> argparse.ArgumentParser:
    from .training.settings import recipe_names

    parser = ArgumentParser(
        prog="tiedmask", description="Weight-tied vision networks with per-application sparse masks.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def add_parser(*args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--data` must not pass for `--data-root`
        return add(*args, **kwargs)

    sub.add_parser = add_parser

    p = sub.add_parser("train", help="train a model", usage="tiedmask train [CONFIG.yaml | --recipe NAME] [--out DIR | --resume DIR] [--KEY VALUE ...]", epilog=overrides_help(),
                       formatter_class=HelpFormatter)
    p.add_argument("--out", help="run directory for config, metrics, checkpoint and result")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run")
    p.add_argument("--recipe", metavar="NAME", help="start from a shipped recipe: " + ", ".join(recipe_names())
                   + " (each YAML file says what it is for)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a trained run on a new dataset (full, lora, multimask_lora)",
                       epilog="overrides as for train, e.g. --data fashion_mnist --finetune.rank 8 --epochs 2")
    p.add_argument("run_dir", help="the pre-trained run")
    p.add_argument("--method", default="multimask_lora", choices=["full", "lora", "multimask_lora"],
                   help="what trains: everything, LoRA adapters, or multi-mask LoRA adapters")
    p.add_argument("--out", help="run directory")
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("uptrain", help="tie a trained language-model run and train it on, distilling from it",
                       usage="tiedmask uptrain RUN --tie MAPPING --out DIR [--distill W] [--tokens N] [--KEY VALUE ...]",
                       epilog="--tie takes mask keys (scope density kind seed) and model.tie keys (blocks group "
                              "strategy init relax relax_rank relax_density relax_init per_application); init "
                              "defaults to mean, masks to the run's own (dense): --tie \"{scope: multi}\" masks. Overrides as for train, e.g. --optim.lr 3e-4 --epochs 4.")
    p.add_argument("run_dir", help="an untied language-model run (tiedmask train --task lm)")
    p.add_argument("--tie", default="{}", help='how to tie, e.g. "{group: 3, strategy: cycle, scope: multi, '
                   'density: 0.5, relax: lora, relax_rank: 16, relax_init: svd}"')
    p.add_argument("--distill", type=float, default=0.0, help="weight of the KL to the run's logits (0: off)")
    p.add_argument("--tokens", type=int, default=0, help="training tokens (0: the run's own epochs)")
    p.add_argument("--out", required=True, help="run directory of the uptrained model")
    p.set_defaults(fn=cmd_uptrain)

    p = sub.add_parser("eval", help="score a run's checkpoint on its test set, as training did")
    p.add_argument("run_dir", help="a run directory written by `tiedmask train --out`")
    p.add_argument("--data-root", default="", help="dataset folder, if it moved since training")
    p.add_argument("--tta", help="test-time augmentation to score with, a value of the eval_tta "
                   "setting (default: the run's own)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("models", help="list the model presets")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("info", help="parameters, FLOPs and mask statistics of a config",
                       epilog=overrides_help(), formatter_class=HelpFormatter)
    p.add_argument("--image-size", type=int, default=32, help="input side (default 32)")
    p.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("bench", help="tied (dense/same/multi) vs DEQ on one cell, over seeds and budgets")
    p.add_argument("preset", help="demo (offline, minutes), cifar10, or vit-tie (`tie` on a Hugging Face ViT)")
    p.add_argument("--out", required=True, help="results store directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every variant")
    p.add_argument("--budgets", nargs="+", default=["epochs", "time"], choices=["epochs", "time"],
                   help="equal epochs and/or equal wall-clock training time")
    p.add_argument("--variants", nargs="+", help="subset of variants (default: all)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--time-budget", type=float, help="seconds of training for the equal-time budget")
    p.add_argument("--data-root", default="", help="folder with the dataset")
    p.add_argument("--workers", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores / workers)")
    p.add_argument("--timeout", type=float, help="seconds after which a run is stopped and recorded failed")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("analyze", help="CKA heatmaps, mask statistics and state dynamics of a run")
    p.add_argument("run_dir", help="a run directory written by `tiedmask train --out`")
    p.add_argument("--images", type=int, default=1000, help="test images to analyse")
    p.add_argument("--data-root", default="", help="dataset folder, if not the run's")
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("sweep", help="a grid of runs (YAML) into a results store")
    p.add_argument("grid", help="grid YAML (format: `python -m pydoc tiedmask.experiments.sweep`)")
    p.add_argument("--out", required=True, help="results store directory")
    p.add_argument("--plan", action="store_true",
                   help="list what the sweep would do with each run (finished, running, reuse, resume, run); run nothing")
    p.add_argument("--variants", nargs="+", metavar="LABEL",
                   help="run only these variants of the grid, for every seed (default: all)")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("advise", help="best measured depth/width/density/scope for a budget")
    p.add_argument("--params", type=float, required=True, help="parameter budget")
    p.add_argument("--flops", type=float, help="FLOPs per image budget")
    p.add_argument("--store", nargs="+", help="results stores or results.jsonl files (default: shipped)")
    p.set_defaults(fn=cmd_advise)

    p = sub.add_parser("report", help="tables and plots from a results store")
    p.add_argument("store", help="a results store written by bench or sweep")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("demo", help="dense vs same vs multi-mask on 8x8 digits, offline, ~1 min")
    p.add_argument("--out", default="runs/demo", help="folder for the table, JSON and plot")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run")
    p.set_defaults(fn=cmd_demo)
    return parser


CONTINUE_AFTER_INTERRUPT = {  # how to go on after Ctrl-C, by command
    "train": "a run with --out continues with `tiedmask train --resume DIR`",
    "finetune": "a run with --out continues with `tiedmask train --resume DIR`",
    "uptrain": "the run continues with `tiedmask train --resume DIR` (DIR: its --out)",
    "sweep": "the same `tiedmask sweep GRID --out STORE` continues: finished runs stay, interrupted ones resume",
    "bench": "the same `tiedmask bench` command continues from its finished runs",
}


def run() -> None:
    """The console command: exits with `main`'s code. A Ctrl-C that arrives after the command
    finished (its result is written) changes nothing, rather than ending the process by the signal."""
    try:
        code = main()
    except KeyboardInterrupt:  # between the command's end and here
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "info", "eval", "finetune", "uptrain"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # A YAML config is the first bare word after the command; argparse would otherwise take
    # the value of an override (`--model NAME`) for it.
    if args.command in ("train", "info"):
        args.config = extra.pop(0) if extra and not extra[0].startswith("-") else None
    try:
        return args.fn(args, extra)
    except TiedmaskError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {CONTINUE_AFTER_INTERRUPT.get(args.command, 'nothing was left half-written')}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    run()
