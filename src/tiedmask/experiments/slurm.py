"""Sweeps on a Slurm cluster through submitit (the `slurm` extra)."""

from __future__ import annotations

from ..errors import ConfigError
from ..training.rundir import RunDir
from ..training.settings import config_from_dict
from .runner import record_header, records_of, resolve_jobs, take_finished
from .store import ResultsStore


SKIPPED = "skipped"


def train_job(values: dict, store_root: str, digest: str) -> dict:
    """What one cluster job runs: claim the run in the store (as a local sweep does, so two
    sweeps on one store never train a config twice), then train it, resuming from its
    checkpoint if it has one."""
    from ..training.train import train

    store = ResultsStore(store_root)
    with store.claim(digest) as mine:
        if not mine:
            return {"status": SKIPPED}
        run_dir = store.run_dir(digest)
        resume = RunDir(run_dir).resumable()
        return train(config_from_dict(values), out=run_dir, resume=resume, log=lambda *a: None).to_dict()


def run_jobs_slurm(jobs, store: ResultsStore, slurm_options: dict, log=print, cluster: str | None = None,
                   reuse: list[ResultsStore] = ()):
    try:
        import submitit
    except ImportError:
        raise ConfigError("launcher slurm needs submitit: pip install 'tiedmask[slurm]'") from None
    executor = submitit.AutoExecutor(folder=str(store.root / "slurm"), cluster=cluster)
    executor.update_parameters(**slurm_options)
    resolved = resolve_jobs(jobs)
    finished = store.finished()
    submitted = []
    for job, values, digest in resolved:
        if digest in finished:
            continue
        with store.claim(digest) as mine:
            taken = take_finished(store, reuse, job, values, digest) if mine else None
            if taken is not None:
                store.append(taken)
                continue
        submitted.append((job, values, digest, executor.submit(train_job, values, str(store.root), digest)))
    log(f"submitted {len(submitted)} jobs to {executor.cluster}")
    for job, values, digest, future in submitted:
        base = record_header(job, values, digest, f"runs/{digest}")
        try:
            record = {**future.result(), **base}
        except Exception as exc:  # the job's own failure, reported by submitit
            record = {**base, "status": "failed", "reason": str(exc).strip().splitlines()[-1][-500:]}
        if record["status"] == SKIPPED:
            log(f"  skipped  {job.variant} seed {values['seed']} (another process runs or finished it)")
            continue
        store.append(record)
        log(f"  {record['status']:<8} {job.variant} seed {values['seed']}")
    return records_of(store, resolved)
