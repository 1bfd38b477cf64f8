"""A results store: one JSONL record per run, keyed by the hash of the resolved config.

Layout of a store directory:

    results.jsonl          one record per finished run (ok, diverged or failed)
    runs/<hash>/           the run directory of each config (config, metrics, checkpoint)

`bench` and `sweep` both write here and `report` reads any store, so there is one format.
A config whose latest record is ok or diverged is finished and skipped on a re-run; a failed
one is tried again. Records are re-keyed on reading by the hash of their config as this
version resolves it, so a store stays valid when config fields are added (with defaults);
each record keeps the run directory it was written to.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
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


def setting(record: dict, key: str):
    """A record's config value at a dotted key, e.g. ``model.masks.density`` (None if absent)."""
    node = record.get("config", {})
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class ResultsStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / "results.jsonl"

    def run_dir(self, config_hash: str) -> Path:
        return self.root / "runs" / config_hash

    def records(self) -> list[dict]:
        """The latest record of every config, in the order first seen."""
        if not self.path.exists():
            return []
        latest: dict[str, dict] = {}
        for line in self.path.read_text().splitlines():
            if line.strip():
                record = rekey(json.loads(line))
                latest[record["config_hash"]] = record
        return list(latest.values())

    def run_dir_of(self, record: dict) -> Path:
        return self.root / record.get("run_dir", f"runs/{record['config_hash']}")

    def finished(self) -> set[str]:
        return {r["config_hash"] for r in self.records() if r.get("status") in FINISHED}

    def append(self, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one line per write: O_APPEND keeps lines whole
            f.write(json.dumps(record, sort_keys=True) + "\n")
