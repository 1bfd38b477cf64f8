"""What translate test-time augmentation adds to flip TTA (issue 13): every finished run of the
given stores is scored twice on its test set, with flip TTA (2 views) and with flip + one-pixel
translations (6 views, weights 1/2, 1/4, 1/4); the gain is paired by run.

    python benchmarks/tta_gain.py runs/paper-claims-fast --data-root ../shared/data

No training: a few minutes a run on 1 CPU thread for tied-fast width 40 (10,000 test images, 6 views).
Writes benchmarks/results/tta_gain.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from paper_claims import mean_interval  # this folder's sibling script
from tiedmask.errors import ArgumentParser, run_script
from tiedmask.experiments.store import ResultsStore
from tiedmask.training.evaluate import score_run
from tiedmask.training.runtime import hardware_name

VIEWS = ("flip", "flip_translate")


def scores(run_dir: Path, data_root: str) -> dict[str, float]:
    return {tta: 100 * score_run(run_dir, data_root, tta)[0] for tta in VIEWS}


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--data-root", default="", help="dataset folder, if it moved since training")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for store in map(ResultsStore, args.stores):
        for record in store.records():
            if record.get("status") == "ok":
                acc = scores(store.run_dir_of(record), args.data_root)
                rows.append({"store": store.root.name, "variant": record["variant"], "seed": record["seed"], **acc,
                             "gain": acc["flip_translate"] - acc["flip"]})
                print(f"{rows[-1]['variant']:<28} seed {record['seed']}  flip {acc['flip']:.2f}  "
                      f"flip+translate {acc['flip_translate']:.2f}  gain {rows[-1]['gain']:+.2f}", flush=True)
    summary = mean_interval([r["gain"] for r in rows])
    if summary["n"] > 1:
        print(f"\ngain over {summary['n']} runs: {summary['mean']:+.2f} points, 95% CI "
              f"[{summary['low']:+.2f}, {summary['high']:+.2f}]")
    out = Path(__file__).resolve().parent / "results" / "tta_gain.json"
    out.write_text(json.dumps({"hardware": hardware_name(torch.device("cpu")), "summary": summary,
                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
