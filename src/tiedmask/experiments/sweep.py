"""`tiedmask sweep GRID.yaml --out DIR`: a grid of runs into a results store
(`--plan`: what it would do with each run, touching nothing).

A grid file:

    base:                      # a run config, as for `tiedmask train`
      model: {name: tied-resnet-s, width: 16}
      data: {name: cifar10, train_subset: 6000}
      epochs: 2
    grid:                      # dotted keys -> values; every combination runs
      model.masks.density: [0.1, 0.5, 1.0]
    variants:                  # optional named settings, each crossed with the grid
      - {label: wide, model.width: 32, model.depth: 2}
      - {label: deep, model.width: 16, model.depth: 8}
    seeds: [0, 1]              # runs go seed by seed, so a stopped sweep leaves paired sets
    workers: 2                 # runs at a time (local launcher)
    threads: 1                 # torch threads per run
    launcher: local            # or slurm (needs the `slurm` extra: submitit)
    slurm: {partition: gpu, timeout_min: 60, cpus_per_task: 4}
    analyze: true              # CKA between applications after each run (adds cka_* columns)
    reuse: [runs/other-grid]   # stores whose finished runs of a config of this grid are taken
                               # (under this grid's label) rather than trained again

>>> jobs, options = grid_jobs({"base": {"data": {"name": "digits"}}, "grid": {"model.depth": [2, 4]}})
>>> [j.variant for j in jobs]
['depth=2', 'depth=4']
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

from ..analysis.analyze import analyze_run
from ..errors import ConfigError, TiedmaskError
from ..training.rundir import RunDir
from ..training.settings import config_from_dict, config_hash, drop_old_spelling, read_yaml, resolve_key
from .runner import Job, resolve_jobs, resumable, run_jobs
from .store import FINISHED, ResultsStore

GRID_KEYS = {"base", "grid", "variants", "seeds", "workers", "threads", "launcher", "slurm", "analyze",
             "timeout_s", "reuse"}


def _set_dotted(values: dict, key: str, value) -> None:
    node = values
    *parents, last = key.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if isinstance(child, str):  # `model: tied-resnet-s` shorthand
            child = node[p] = {"name": child}
        node = child
    node[last] = value


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


GRID_FIELDS = {  # key: (check, what it must be); every grid file passes these before anything runs
    "base": (lambda v: isinstance(v, dict), "a mapping: a run config, as for `tiedmask train`"),
    "grid": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, list) and x
                                                   for k, x in v.items()),
             "a mapping of dotted keys to non-empty lists, e.g. model.masks.density: [0.5, 1.0]"),
    "variants": (lambda v: isinstance(v, list) and v and all(
        isinstance(x, dict) and all(isinstance(k, str) for k in x) and isinstance(x.get("label", ""), str)
        for x in v), "a non-empty list of mappings of dotted keys, each with an optional text label"),
    "seeds": (lambda v: isinstance(v, list) and v and all(_whole(x, 0) for x in v) and len(set(v)) == len(v),
              "a non-empty list of distinct whole numbers >= 0, e.g. [0, 1, 2]"),
    "workers": (lambda v: _whole(v, 1), "a whole number >= 1"),
    "threads": (lambda v: _whole(v, 0), "a whole number >= 0 (0: all cores)"),
    "launcher": (lambda v: v in ("local", "slurm"), "local or slurm"),
    "slurm": (lambda v: isinstance(v, dict), "a mapping of submitit settings, e.g. {partition: gpu}"),
    "analyze": (lambda v: isinstance(v, bool), "true or false"),
    "timeout_s": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and 0 < v < float("inf")), "a positive number of seconds"),
    "reuse": (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
              "a list of results-store folders, e.g. [runs/other-grid]"),
}


def check_grid(spec) -> dict:
    """A grid file's fields, each of the right kind (one error naming the first that is not)."""
    if not isinstance(spec, dict):
        raise ConfigError("a grid file must be a mapping with base, grid, variants, seeds, ...")
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"unknown grid key(s) {unknown}; valid: {sorted(GRID_KEYS)}")
    for key, (check, what) in GRID_FIELDS.items():
        if key in spec and not check(spec[key]):
            shown = repr(spec[key])
            raise ConfigError(f"grid key {key} is {shown if len(shown) < 50 else shown[:47] + '...'}; it must be {what}")
    return spec


def grid_jobs(spec: dict) -> tuple[list[Job], dict]:
    """Jobs and launcher options from a grid spec (the parsed YAML)."""
    check_grid(spec)
    grid = spec.get("grid") or {}
    variants = spec.get("variants") or [{}]
    seeds = spec.get("seeds", [0])
    jobs = []
    for variant in variants:
        variant = dict(variant)
        label = variant.pop("label", None)
        for combo in itertools.product(*grid.values()):
            for seed in seeds:
                values = copy.deepcopy(spec.get("base") or {})
                for key, value in {**variant, **dict(zip(grid, combo))}.items():
                    resolved = resolve_key(key)  # old spellings mean today's key
                    _set_dotted(values, resolved, value)
                    drop_old_spelling(values, resolved)  # base's `density: 0.5` yields to the grid's
                values["seed"] = seed
                parts = ([label] if label else []) + [f"{k.split('.')[-1]}={v}" for k, v in zip(grid, combo)]
                tags = {k.split(".")[-1]: v for k, v in dict(zip(grid, combo)).items()}
                jobs.append(Job(",".join(parts) or "base", values, tags))
    # Seed by seed: a sweep stopped part-way leaves complete sets of variants to pair by seed.
    jobs.sort(key=lambda job: job.config["seed"])
    for job in jobs:
        config_from_dict(job.config)  # every cell of the grid must be valid before anything runs
    if len({config_hash(config_from_dict(j.config)) for j in jobs}) < len(jobs):
        raise ConfigError("two points of the grid resolve to the same config; a key is set twice "
                          "(once in base or a variant, once in the grid?)")
    options = {k: spec[k] for k in ("workers", "threads", "launcher", "slurm", "analyze", "timeout_s", "reuse")
               if k in spec}
    return jobs, options


def only_variants(jobs: list, labels: list[str] | None) -> list:
    """The jobs of the variants `labels` names (all when None), in the grid's order: a sweep can
    run the runs it needs first for every seed, and the rest later into the same store."""
    if labels is None:
        return jobs
    known = list(dict.fromkeys(job.variant for job in jobs))
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ConfigError(f"--variants: the grid has no variant {unknown[0]!r}; its variants: {', '.join(known)}")
    return [job for job in jobs if job.variant in labels]


def run_sweep(grid_file: str | Path, out: str | Path, log=print, variants: list[str] | None = None) -> list[dict]:
    jobs, options = grid_jobs(read_yaml(grid_file))
    jobs = only_variants(jobs, variants)
    reuse = reuse_stores(options, log)
    store = ResultsStore.for_writing(out)
    launcher = options.get("launcher", "local")
    if launcher == "local":
        records = run_jobs(jobs, store, options.get("workers", 1), options.get("threads", 0),
                           timeout_s=options.get("timeout_s"), log=log, reuse=reuse)
    elif launcher == "slurm":
        from .slurm import run_jobs_slurm

        records = run_jobs_slurm(jobs, store, options.get("slurm", {}), log=log, reuse=reuse)
    else:
        raise ConfigError(f"unknown launcher {launcher!r}; use local or slurm")
    if options.get("analyze"):
        records = add_cka(records, store, log)
    return records


def reuse_stores(options: dict, log=print) -> list[ResultsStore]:
    """The grid's `reuse` stores, each missing one named (a mistyped path would silently
    retrain what it holds)."""
    reuse = [ResultsStore(folder) for folder in options.get("reuse", [])]
    for source in reuse:
        if source.root.exists() and not source.root.is_dir():
            raise ConfigError(f"reuse store {source.root} is a file, not a store folder; fix the path or drop it "
                              "from reuse")
        if not source.path.exists():  # a store another grid has yet to fill (checked again per run)
            log(f"warning: reuse store {source.root} has no results.jsonl (a path relative to the "
                "working directory, as --out is); nothing is taken from it")
    return reuse


def plan_sweep(grid_file: str | Path, out: str | Path, log=print, variants: list[str] | None = None) -> list[dict]:
    """What `run_sweep` would do with each run of the grid, in its order, reading only:
    {variant, seed, config_hash, state, plan}; state is finished, running (another process
    holds it), reuse, resume or run, and plan says it in words (the store reused, the epoch
    resumed after, why an earlier attempt failed). For a grid continued over several sessions:
    what is left, before the cores are committed to it."""
    jobs, options = grid_jobs(read_yaml(grid_file))
    jobs = only_variants(jobs, variants)
    if options.get("launcher", "local") != "local":
        log("note: the plan follows the local launcher; slurm submits runs held elsewhere, to be "
            "skipped when they start")
    if options.get("analyze"):
        log("note: analyze is on: finished runs without CKA are analysed too (no training)")
    store = ResultsStore(out)
    latest = {r["config_hash"]: r for r in store.records()}
    reusable = {}
    for source in reversed(reuse_stores(options, log)):  # the first listed wins
        if source.root.resolve() != store.root.resolve():
            reusable.update({digest: str(source.root) for digest in source.finished()})
    rows = []
    for job, values, digest in resolve_jobs(jobs):
        record = latest.get(digest, {})
        run_dir = store.run_dir(digest)
        if record.get("status") in FINISHED:
            state, plan = "finished", "finished"
        elif run_dir.exists() and store.held(digest):  # a folder-less run is nobody's yet
            state, plan = "running", "running now (another process holds it)"
        elif digest in reusable:
            state, plan = "reuse", f"reuse {reusable[digest]}"
        elif resumable(run_dir):
            try:
                epoch = RunDir(run_dir).checkpoint_epoch()
                state, plan = "resume", f"resume after epoch {epoch}"
            except (TiedmaskError, AttributeError):
                state, plan = "resume", "resume (its checkpoint.json cannot be read: delete the folder to start over)"
        else:
            state, plan = "run", "run"
        if record.get("status") == "failed" and state != "running":
            plan += f" (last attempt failed: {record.get('reason', '')[:80]})"
        rows.append({"variant": job.variant, "seed": values["seed"], "config_hash": digest,
                     "state": state, "plan": plan})
    return rows


def add_cka(records: list[dict], store: ResultsStore, log=print) -> list[dict]:
    """Analyse every ok run that has no CKA yet; the store gets the updated record."""
    out = []
    for record in records:
        if record.get("status") == "ok" and "cka_offdiag_mean" not in record:
            samples = 4096 if record.get("task") == "lm" else 500  # test tokens of a language model, else images
            result = analyze_run(store.run_dir_of(record), images=samples)
            stages = result["cka_offdiag_mean"]
            record = {**record, "cka_offdiag_mean": sum(stages) / len(stages),
                      "cka_adjacent_mean": sum(result["cka_adjacent_mean"]) / len(stages)}
            store.append(record)
            log(f"  analysed {record['variant']} seed {record['seed']}: "
                f"mean off-diagonal CKA {record['cka_offdiag_mean']:.3f}")
        out.append(record)
    return out
