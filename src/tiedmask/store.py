"""A results store: one JSONL record per run, keyed by the hash of the resolved config.

Layout of a store directory:

    results.jsonl          one record per finished run (ok, diverged or failed)
    runs/<hash>/           the run directory of each config (config, metrics, checkpoint)

`bench` and `sweep` both write here and `report` reads any store, so there is one format.
A config whose latest record is ok or diverged is finished and skipped on a re-run; a failed
one is tried again.
"""

from __future__ import annotations

import json
from pathlib import Path

FINISHED = ("ok", "diverged")


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
                record = json.loads(line)
                latest[record["config_hash"]] = record
        return list(latest.values())

    def finished(self) -> set[str]:
        return {r["config_hash"] for r in self.records() if r.get("status") in FINISHED}

    def append(self, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one line per write: O_APPEND keeps lines whole
            f.write(json.dumps(record, sort_keys=True) + "\n")
