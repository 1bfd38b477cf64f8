"""Run many training configs, each in its own subprocess, into a results store.

A crash, an out-of-memory kill or a diverged model ends only its own run: the parent records
it (status failed, with the reason) and goes on. Interrupted runs resume from their checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..files import atomic_write, read_json
from ..training.checkpoint import CHECKPOINT_FILE
from ..training.rundir import REQUEST_FILE, RESULT_FILE, RunDir
from ..training.settings import config_from_dict, config_hash, config_to_dict
from ..training.result import Result
from .store import FINISHED, ResultsStore


@dataclass
class Job:
    variant: str  # label in reports, e.g. "tied-multi"
    config: dict  # nested config dict (as YAML)
    tags: dict = field(default_factory=dict)  # extra columns, e.g. {"budget": "equal-time"}


def resolve_jobs(jobs: list[Job]) -> list[tuple[Job, dict, str]]:
    """(job, resolved config values, config hash); bad configs fail here, before anything runs."""
    resolved = []
    for job in jobs:
        cfg = config_from_dict(job.config)
        resolved.append((job, config_to_dict(cfg), config_hash(cfg)))
    return resolved


def record_header(job: Job, values: dict, digest: str, run_dir: str) -> dict:
    """What every record of a job says besides its result."""
    return {"variant": job.variant, **job.tags, "config": values, "config_hash": digest,
            "seed": values["seed"], "run_dir": run_dir}


# What a record says about its run, not about the grid that asked for it: a reused record keeps
# these (the result, and the CKA that `sweep`'s analyze step adds) and takes the rest (label,
# tags) from the job that reuses it. A tag named like one of them (a grid over `epochs`) is the
# run's value anyway.
RUN_FIELDS = (frozenset(f.name for f in dataclasses.fields(Result))
              | {"wall_s", "reused_from", "cka_offdiag_mean", "cka_adjacent_mean"})


def records_of(store: ResultsStore, resolved) -> list[dict]:
    wanted = {digest for _, _, digest in resolved}
    return [r for r in store.records() if r["config_hash"] in wanted]


def take_finished(store: ResultsStore, sources: list[ResultsStore], job: Job, values: dict,
                  digest: str) -> dict | None:
    """The record of a finished run of `digest` in one of `sources` (other grids' stores), under
    this job's label, with its run folder copied into `store`; None when no source has one.
    Call it holding `store`'s claim of `digest`. The copy replaces whatever this store had begun
    of the config (a finished run is the same result), and its checkpoint and result files go
    last, so a copy cut short leaves nothing to resume from and is simply taken again."""
    for source in sources:
        if source.root.resolve() == store.root.resolve():
            continue
        found = [r for r in source.records() if r["config_hash"] == digest and r.get("status") in FINISHED]
        if not found:
            continue
        local = store.run_dir(digest)
        _copy_run(source.run_dir_of(found[0]), local)
        header = record_header(job, values, digest, str(local.relative_to(store.root)))
        run = {k: v for k, v in found[0].items() if k in RUN_FIELDS}
        return {**run, **header, "reused_from": run.get("reused_from", str(source.root.resolve()))}
    return None


def _copy_run(source: Path, target: Path) -> None:
    for item in target.iterdir():  # what this store had begun, but the claim it holds
        if item.name != ".claim":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    if not source.is_dir():
        return  # the record stands alone; eval and analyze need the folder
    last = (CHECKPOINT_FILE, RESULT_FILE)
    for item in sorted(source.iterdir(), key=lambda item: item.name in last):
        if item.name == ".claim":
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)


def run_jobs(jobs: list[Job], store: ResultsStore, workers: int = 1, threads: int = 0,
             timeout_s: float | None = None, log=print, reuse: list[ResultsStore] = ()) -> list[dict]:
    """Run every unfinished job, or take its finished run from a `reuse` store; returns the
    store's records for all `jobs`."""
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    resolved = resolve_jobs(jobs)
    finished = store.finished()
    todo = [r for r in resolved if r[2] not in finished]
    log(f"{len(resolved)} runs: {len(resolved) - len(todo)} finished, {len(todo)} to run "
        f"({workers} at a time, {threads} threads each)")

    def one(item):
        job, values, digest = item
        with store.claim(digest) as mine:
            if not mine:
                log(f"  skipped  {job.variant:<24} seed {values['seed']}  (another process runs "
                    "or finished it)")
                return None
            record = take_finished(store, reuse, job, values, digest)
            if record is not None:
                store.append(record)
                log(f"  reused   {job.variant:<24} seed {values['seed']}  from {record['reused_from']}")
                return record
            record = _run_one(job, values, digest, store, threads, timeout_s)
            store.append(record)
        log(f"  {record['status']:<8} {job.variant:<24} seed {values['seed']}  "
            + (f"test {record['test_acc']:.2%}  {record['train_time_s']:.0f}s  {record.get('warning', '')}"
               if record["status"] == "ok" else record.get("reason", "")))
        return record

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, todo))
    return records_of(store, resolved)


def resumable(run_dir: Path) -> bool:
    """Whether a local run resumes from `run_dir` rather than starting over."""
    return RunDir(run_dir).resumable()


def _run_one(job: Job, values: dict, digest: str, store: ResultsStore, threads: int,
             timeout_s: float | None) -> dict:
    run_dir = store.run_dir(digest)
    run_dir.mkdir(parents=True, exist_ok=True)
    base = record_header(job, values, digest, str(run_dir.relative_to(store.root)))
    values = {**values, "threads": threads, "progress": False}
    config_file = run_dir / REQUEST_FILE
    atomic_write(config_file, yaml.safe_dump(values).encode())
    if resumable(run_dir):
        args = ["train", "--resume", str(run_dir)]
    else:
        RunDir(run_dir).remove_unstarted()
        args = ["train", str(config_file), "--out", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "tiedmask.cli", *args], capture_output=True,
                              text=True, env=env, timeout=timeout_s)
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    except subprocess.TimeoutExpired:
        tail = f"timed out after {timeout_s:.0f}s"
    if RunDir(run_dir).is_finished():
        return {**read_json(run_dir / RESULT_FILE), **base, "wall_s": time.time() - start}
    return {**base, "status": "failed", "reason": tail[-500:], "wall_s": time.time() - start}
