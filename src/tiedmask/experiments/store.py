"""A results store: one JSONL record per run, keyed by the hash of the resolved config.

Layout of a store directory:

    results.jsonl          one record per finished run (ok, diverged or failed)
    runs/<hash>/           the run directory of each config (config, metrics, checkpoint)

`bench` and `sweep` both write here and `report` reads any store, so there is one format.
A config whose latest record is ok or diverged is finished and skipped on a re-run; a failed
one is tried again. Records are re-keyed on reading by the hash of their config as this
version resolves it, so a store stays valid when config fields are added (with defaults);
each record keeps the run directory it was written to.

Several sweeps may share a store (two terminals, or a cluster array): a run is claimed with
an OS file lock (`flock`) on `runs/<hash>/.claim`, held for as long as it trains and released
by the OS if its process dies, so no config trains twice; records are appended under the
store's lock. Reading is tolerant and loud: a line that is not a record (a torn write, a full
disk) is reported with its line number and skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError, TiedmaskError
from ..files import read_json, writable_folder
from ..training.run_schema import record_problem
from ..training.rundir import CONFIG_FILE
from ..training.settings import config_from_dict, config_hash, config_to_dict

FINISHED = ("ok", "diverged")


def rekey(record: dict) -> dict:
    """The record under the hash, and with the config, that its config has today (see the
    module docstring): old spellings of settings are read as today's."""
    record.setdefault("run_dir", f"runs/{record['config_hash']}")
    if "config" in record:
        try:
            cfg = config_from_dict(record["config"])
        except ConfigError:
            return record  # a config this version cannot read keeps its old key
        record["config"], record["config_hash"] = config_to_dict(cfg), config_hash(cfg)
    return record


def today_hash(config: dict) -> str:
    return config_hash(config_from_dict(config))


def setting(record: dict, key: str):
    """A record's config value at a dotted key, e.g. ``model.masks.density`` (None if absent)."""
    node = record.get("config", {})
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class ResultsStore:
    def __init__(self, root: str | Path):
        """`root`: a store folder (its results.jsonl), or a .jsonl file of records itself (the
        shipped results)."""
        root = Path(root)
        self.root, self.path = (root.parent, root) if root.suffix == ".jsonl" else (root, root / "results.jsonl")

    @classmethod
    def for_writing(cls, root: str | Path) -> "ResultsStore":
        """A store that sweep or bench will write: its folder checked writable before any run."""
        store = cls(root)
        writable_folder(store.root, "choose another --out")
        return store

    @classmethod
    def existing(cls, root: str | Path) -> "ResultsStore":
        """A store to read, which must hold records already (report, the benchmark analyses):
        a mistyped folder is named rather than read as an empty store."""
        store = cls(root)
        if not store.path.exists():
            raise TiedmaskError(f"{root} holds no results.jsonl; give the folder that "
                                "`tiedmask sweep --out` or `tiedmask bench --out` wrote")
        damaged: list[str] = []
        if not any(store._raw_records(warn=damaged.append)):  # stops at the first readable line
            raise TiedmaskError(f"{store.path} holds no readable records ({len(damaged)} damaged "
                                "lines); restore it from a copy, or run the sweep again into it")
        return store

    def run_dir(self, config_hash: str) -> Path:
        """runs/<hash>; or, when there is none, the folder of a run that an older version
        started for the same config (named by that version's hash, which changes when
        settings are added), so that an interrupted run resumes rather than restarts."""
        own = self.root / "runs" / config_hash
        if own.exists():
            return own
        for folder in sorted((self.root / "runs").glob(f"*/{CONFIG_FILE}")):
            try:
                if config_hash == today_hash(read_json(folder)):
                    return folder.parent
            except TiedmaskError:
                continue  # a config this version cannot read is nobody's run today
        return own

    def records(self, warn=lambda message: print(message, file=sys.stderr)) -> list[dict]:
        """The latest record of every config, in the order first seen; bad lines are skipped
        with a warning naming them."""
        latest: dict[str, dict] = {}
        for record in map(rekey, self._raw_records(warn)):
            latest[record["config_hash"]] = record
        return list(latest.values())

    def _raw_records(self, warn) -> Iterator[dict]:
        """The file's records as written, line by line (not yet re-keyed)."""
        if not self.path.exists():
            return
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("config_hash"), str):
                    raise ValueError("no config_hash")
            except ValueError:
                warn(f"warning: {self.path} line {number} is not a results record; skipped")
                continue
            problem = record_problem(record)
            if problem:
                warn(f"warning: {self.path} line {number} is a damaged results record ({problem}); skipped")
                continue
            yield record

    def run_dir_of(self, record: dict) -> Path:
        return self.root / record.get("run_dir", f"runs/{record['config_hash']}")

    def finished(self) -> set[str]:
        return {r["config_hash"] for r in self.records() if r.get("status") in FINISHED}

    def append(self, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / ".lock"), open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def claim(self, config_hash: str):
        """Yields True while this process holds the run of `config_hash` (nobody else trains
        it meanwhile), False when another process holds it or it finished in the meantime."""
        run_dir = self.run_dir(config_hash)
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / ".claim", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd, attempts=4):
                yield False
                return
            yield config_hash not in self.finished()
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def held(self, config_hash: str) -> bool:
        """Whether another process holds the run of `config_hash` now (reads only: takes and
        drops a shared lock on an existing claim file, creating nothing; `claim` retries, so a
        sweep claiming the run in that instant still gets it)."""
        claim = self.run_dir(config_hash) / ".claim"
        try:
            fd = os.open(claim, os.O_RDONLY)
        except OSError:
            return False  # never claimed, or the store is not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def _try_lock(fd: int, attempts: int) -> bool:
    """An exclusive lock on `fd` within a few tries 50 ms apart: a claim held by a training run
    stays held, a shared lock taken for a moment by `held` is let go."""
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.05)
    return False


@contextlib.contextmanager
def _locked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
