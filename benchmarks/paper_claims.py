"""The paper's claims at real accuracy (issue 11): records and paired comparisons.

Runs come from `tiedmask sweep` stores (one grid per claim family; each grid file says how
long it takes); this script turns their finished runs into one record per run in
benchmarks/results/paper_claims.jsonl and prints the claims table: mean ± std per variant, and
the difference of each variant from multi-mask, paired by seed, with a 95% t-interval. Beside
accuracy, the last epoch's mean training loss (augmented images, label smoothing, as training
saw them) and its paired difference: a variant that wins on test accuracy by fitting the
training set better has more capacity; one that wins with a higher training loss regularises.

    tiedmask sweep benchmarks/grids/paper_claims_fast.yaml --out runs/paper-claims-fast
    python benchmarks/paper_claims.py runs/paper-claims-fast --docs   # --docs: into docs/results.md §0
                                                                      # --ship: into `advise`'s results

Records already in the JSONL are kept (keyed by claim, variant and seed) and updated from the
stores, so the file grows across sessions as sweeps continue. Each store's results.jsonl is
also copied to benchmarks/results/stores/<name>.results.jsonl: put it back into a fresh store
folder and the sweep skips the runs it holds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tiedmask.errors import ArgumentParser, run_script
from tiedmask.experiments.advise import ship
from tiedmask.experiments.store import ResultsStore, setting
from tiedmask.experiments.verdict import RULE, mean_interval, paired_difference, verdict as rule_verdict

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "results" / "paper_claims.jsonl"
GRID_CLAIMS = {  # store folder name -> the claim its runs test
    "paper-claims-fast": "multi-vs-same-vs-dense-vs-untied (fast family, depth 4)",
    "paper-claims-depth8": "multi-vs-same-vs-dense-vs-untied (fast family, depth 8)",
    "paper-claims-resnet": "multi-vs-same-vs-dense (the paper's GroupNorm ResNet cell, depth 6)",
    "transfer-test": "multi-mask LoRA vs LoRA (CIFAR-10 base -> Fashion-MNIST)",
    "transfer-split-test": "multi-mask LoRA vs LoRA (CIFAR-10 classes 0-4 -> 5-9)",
}
REFERENCE = "tied-multi"
REFERENCES = {  # claim -> the multi-mask variant the others are paired against, when not REFERENCE
    GRID_CLAIMS["transfer-test"]: "multimask-lora",
    GRID_CLAIMS["transfer-split-test"]: "multimask-lora",
}
TRAIN_IMAGES = {"cifar10": 50_000, "fashion_mnist": 60_000}  # both balanced across their 10 classes
OTHER_PAIRS = [  # (a, b): a − b paired by seed, shown under a claim's table when both have runs
    ("tied-dense", "tied-same"),
    ("tied-channel-multi", "tied-dense"),  # issue 13: channel masks, equal epochs
    ("tied-channel-multi-10ep", "tied-dense"),  # ... and about equal time
    ("tied-channel-multi-10ep", "tied-multi"),
    ("tied-multi-width-56", "tied-multi-depth-8"),  # claim 4a: width against depth, about equal MACs
    ("tied-multi-width-56-density-0.25", "tied-multi-depth-8"),  # ... and equal kept tied weights
]
POOLED = {  # a pooled comparison -> the claims whose seeds it pairs (each within its own claim)
    "fast family, depths 4 and 8": (GRID_CLAIMS["paper-claims-fast"], GRID_CLAIMS["paper-claims-depth8"]),
}


FAST4, FAST8 = GRID_CLAIMS["paper-claims-fast"], GRID_CLAIMS["paper-claims-depth8"]
RESNET = GRID_CLAIMS["paper-claims-resnet"]
# The comparisons whose words the README and results §0 quote: (label, claims whose seeds pair
# within each, a, b, word if a > b, word if b > a, chosen after seeing the data).
COMPARISONS = [
    ("3. multi − same, fast family depth 4", (FAST4,), "tied-multi", "tied-same", "multi-mask better", "same-mask better", False),
    ("3. multi − dense, fast family depth 4", (FAST4,), "tied-multi", "tied-dense", "multi-mask better", "dense better", False),
    ("3. same − dense, fast family depth 4", (FAST4,), "tied-same", "tied-dense", "same-mask better", "dense better", False),
    ("3. multi − same, fast family depth 8", (FAST8,), "tied-multi", "tied-same", "multi-mask better", "same-mask better", False),
    ("3. multi − dense, fast family depth 8", (FAST8,), "tied-multi", "tied-dense", "multi-mask better", "dense better", False),
    ("3. same − dense, fast family depth 8", (FAST8,), "tied-same", "tied-dense", "same-mask better", "dense better", False),
    ("3. multi − dense, depths 4 and 8 pooled", (FAST4, FAST8), "tied-multi", "tied-dense", "multi-mask better", "dense better", True),
    ("3. multi − same, depths 4 and 8 pooled", (FAST4, FAST8), "tied-multi", "tied-same", "multi-mask better", "same-mask better", True),
    ("3. multi − same, the paper's GroupNorm cell", (RESNET,), "tied-multi", "tied-same", "multi-mask better", "same-mask better", False),
    ("3. multi − dense, the paper's GroupNorm cell", (RESNET,), "tied-multi", "tied-dense", "multi-mask better", "dense better", False),
    ("3. same − dense, the paper's GroupNorm cell", (RESNET,), "tied-same", "tied-dense", "same-mask better", "dense better", False),
    ("4a. wider (w56, density 0.25: equal kept tied weights, 893,512 parameters) − deeper (8 applications, 461,992): "
     "about equal MACs, not equal parameters", (FAST4,), "tied-multi-width-56-density-0.25", "tied-multi-depth-8",
     "width better", "depth better", False),
    ("4b. density 0.5 − 0.25 (ResNet-like)", (FAST4,), "tied-multi", "tied-multi-density-0.25", "0.5 better", "0.25 better", False),
    ("4b. density 0.5 − 0.75 (ResNet-like)", (FAST4,), "tied-multi", "tied-multi-density-0.75", "0.5 better", "0.75 better", False),
    ("5. multi-mask LoRA − LoRA, CIFAR-10 classes 0-4 → 5-9", (GRID_CLAIMS["transfer-split-test"],), "multimask-lora",
     "lora", "multi-mask LoRA better", "LoRA better", False),
    ("5. multi-mask LoRA − LoRA, CIFAR-10 → Fashion-MNIST", (GRID_CLAIMS["transfer-test"],), "multimask-lora", "lora",
     "multi-mask LoRA better", "LoRA better", False),
    ("untied: tied multi − untied, equal parameters and epochs, depth 4", (FAST4,), "tied-multi", "untied-equal-params",
     "tied better", "untied better", False),
    ("untied: tied multi − untied, equal parameters and epochs, depth 8", (FAST8,), "tied-multi", "untied-equal-params",
     "tied better", "untied better", False),
    ("untied: tied multi − untied of the same shape (equal FLOPs), depth 4", (FAST4,), "tied-multi", "untied-same-shape",
     "tied better", "untied better", False),
    ("untied: tied multi (8 epochs) − untied, equal parameters, 16 epochs (about equal time)", (FAST4,), "tied-multi",
     "untied-equal-params-16ep", "tied better", "untied better", False),
]


def verdict_table(records: list[dict]) -> str:
    """Every comparison of COMPARISONS with its word by the rule, as README and §0 quote it."""
    lines = [f"Rule: {RULE}.", "", "| comparison (a − b) | points, 95% CI | pairs | verdict |", "|---|---|---:|---|"]
    for label, claims, a, b, better, worse, post_hoc in COMPARISONS:
        def accuracy(variant):
            return {(r["claim"], r["seed"]): r["test_acc"] for r in records if r["claim"] in claims and r["variant"] == variant}
        diff = paired_difference(accuracy(a), accuracy(b))
        shown = "–" if diff is None else interval(diff)
        lines.append(f"| {label} | {shown} | {0 if diff is None else diff['n']} | "
                     f"{rule_verdict(diff, better, worse, post_hoc)} |")
    return "\n".join(lines)


def claim_record(record: dict, claim: str) -> dict:
    """One paper_claims.jsonl record from a results-store record."""
    epochs = setting(record, "epochs")
    budget_s = setting(record, "time_budget_s")
    return {
        "claim": claim, "variant": record["variant"], "config_hash": record["config_hash"],
        "model": setting(record, "model.name"), "execution": setting(record, "model.execution"),
        "mask_scope": setting(record, "model.masks.scope"), "depth": setting(record, "model.depth"),
        "width": setting(record, "model.width"), "density": setting(record, "model.masks.density"),
        "seed": record["seed"], "data": setting(record, "data.name"),
        "train_images": training_images(record),
        "budget": f"{budget_s:.0f} s" if budget_s else f"{epochs} epochs",
        "epochs_done": record.get("epochs"), "test_acc": round(100 * record["test_acc"], 2),
        "final_train_loss": round(record["final_train_loss"], 4),
        "train_time_s": round(record["train_time_s"], 1), "params": record["params"],
        "trainable_params": record["trainable_params"], "lr": setting(record, "optim.lr"),
        "effective_macs": record["macs_effective"], "dense_macs": record["macs_dense"],
        "hardware": record.get("hardware", ""),
        "precision": record.get("precision") or "fp32",  # runs from before it was recorded: fp32 on a CPU
    }


def training_images(record: dict) -> int:
    """How many images a run trained on: its subset, or its classes' share of the training set,
    less the validation split."""
    classes = setting(record, "data.classes") or []
    full = setting(record, "data.train_subset") or TRAIN_IMAGES[setting(record, "data.name")]
    if classes and not setting(record, "data.train_subset"):
        full = full * len(classes) // 10
    return full - (setting(record, "data.val_split") or 0)


def paired(records: list[dict], variant: str, reference: str = REFERENCE,
           field: str = "test_acc") -> dict | None:
    """reference - variant in `field`, paired by seed (within each claim, when `records` pool
    several): mean, std, 95% t-interval, n."""
    by_seed = {v: {(r["claim"], r["seed"]): r[field] for r in records if r["variant"] == v}
               for v in (variant, reference)}
    seeds = sorted(set(by_seed[variant]) & set(by_seed[reference]))
    if not seeds:
        return None
    return mean_interval([by_seed[reference][s] - by_seed[variant][s] for s in seeds])


def verdict(diff: dict | None) -> str:
    """The per-variant table's word for multi − variant (the rule of tiedmask.experiments.verdict)."""
    return rule_verdict(diff, "multi-mask better", "multi-mask worse")


def interval(diff: dict, digits: int = 2) -> str:
    if diff["n"] < 2:
        return f"{diff['mean']:+.{digits}f}"
    return f"{diff['mean']:+.{digits}f} [{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}]"


def mean_sd(values: list[float], digits: int = 2) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def table(records: list[dict]) -> str:
    lines = []
    for claim in sorted({r["claim"] for r in records}):
        rows = [r for r in records if r["claim"] == claim]
        reference = REFERENCES.get(claim, REFERENCE)
        lines += [f"### {claim}", "",
                  "| variant | params (trained) | effective MMACs/img | n | test acc (%) "
                  "| multi − variant (pp), 95% CI | verdict | final train loss "
                  "| variant − multi train loss, 95% CI |",
                  "|---|---:|---:|---:|---:|---|---|---:|---|"]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["variant"] == variant]
            diff = loss_diff = None
            if variant != reference:
                diff = paired(rows, variant, reference)
                # paired() gives reference − variant; the loss column reads variant − multi, so
                # that a positive number favours multi-mask in both columns
                loss_diff = paired(rows, reference, variant, field="final_train_loss")
            shown = "–" if diff is None else f"{interval(diff)} (n={diff['n']})"
            loss_shown = "–" if loss_diff is None else interval(loss_diff, digits=4)
            lines.append(f"| {variant} | {params(mine[0])} | {mine[0]['effective_macs'] / 1e6:.1f} "
                         f"| {len(mine)} | {mean_sd([r['test_acc'] for r in mine])} | {shown} "
                         f"| {'reference' if variant == reference else verdict(diff)} "
                         f"| {mean_sd([r['final_train_loss'] for r in mine], 4)} | {loss_shown} |")
        present = {r["variant"] for r in rows}
        pairs = [(a, b, paired(rows, b, reference=a)) for a, b in OTHER_PAIRS if {a, b} <= present]
        if pairs:
            lines += ["", "| difference | pp, 95% CI | n |", "|---|---|---:|"]
            lines += [f"| {a} − {b} | {interval(d)} | {d['n']} |" for a, b, d in pairs if d]
        budgets = sorted({r["budget"] for r in rows})
        hardware = sorted({r["hardware"] for r in rows if r["hardware"]})
        lines += ["", f"Budget: {', '.join(budgets)}; {rows[0]['train_images']:,} training images; "
                  f"hardware: {'; '.join(hardware) or 'not recorded'}.", ""]
        # `precision: auto` times bf16 on CPUs with bf16 instructions: seeds added on another
        # machine can train in another number format, and their pairs are then not like for like
        if len(precisions := sorted({r.get("precision", "fp32") for r in rows})) > 1:
            lines += [f"Warning: these runs trained in {' and '.join(precisions)}; set `precision` in the "
                      "grid so that every seed trains in one.", ""]
    return "\n".join(lines + pooled_table(records))


def pooled_table(records: list[dict]) -> list[str]:
    """multi − variant over the seeds of several claims, each seed paired within its claim: the
    average effect over those settings, with the interval that their pooled pairs give."""
    lines = []
    for name, claims in POOLED.items():
        rows = [r for r in records if r["claim"] in claims]
        in_each = [{r["variant"] for r in rows if r["claim"] == c} for c in claims]
        compared = set.intersection(*in_each) - {REFERENCE}
        variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v in compared]
        diffs = [(v, d) for v in variants if (d := paired(rows, v)) and d["n"] >= 2]
        if not diffs:
            continue
        lines += [f"### pooled: {name}", "", "| multi − variant | test acc (pp), 95% CI | n pairs "
                  "| variant − multi train loss, 95% CI |", "|---|---|---:|---|"]
        lines += [f"| multi − {v} | {interval(d)} | {d['n']} "
                  f"| {interval(paired(rows, REFERENCE, v, field='final_train_loss'), digits=4)} |"
                  for v, d in diffs]
        lines.append("")
    return lines


def params(record: dict) -> str:
    """All parameters, and the trained ones where fewer are (fine-tuning; a frozen stem)."""
    trained = record.get("trainable_params", record["params"])
    shown = f"{record['params']:,}"
    return shown if trained > 0.99 * record["params"] else f"{shown} ({trained:,})"


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="*", help="results stores written by the claim grids")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/results.md")
    parser.add_argument("--ship", action="store_true",
                        help="add the stores' finished runs to the results `tiedmask advise` ships")
    args = parser.parse_args()
    def key(r):
        return r["claim"], r["variant"], r["seed"]

    kept = {}
    if RECORDS.exists():
        kept = {key(r): r for r in map(json.loads, RECORDS.read_text().splitlines()) if r}
    stores = [ResultsStore.existing(path) for path in args.stores]  # all checked before anything is written
    for store in stores:
        store_dir = store.root
        claim = GRID_CLAIMS.get(store_dir.name, store_dir.name)
        for record in store.records():
            if record.get("status") == "ok":
                row = claim_record(record, claim)
                kept[key(row)] = row
        if store.path.exists():
            copy = ROOT / "benchmarks" / "results" / "stores" / f"{store_dir.name}.results.jsonl"
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(store.path.read_bytes())
        if args.ship:
            ship(store)
    records = sorted(kept.values(), key=lambda r: (r["claim"], r["seed"], r["variant"]))
    RECORDS.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    print(table(records))
    print(verdict_table(records))
    print(f"{len(records)} records in {RECORDS.relative_to(ROOT)}")
    if args.docs:
        write_into_docs(table(records))
        for doc in (ROOT / "docs" / "results.md", ROOT / "README.md"):
            write_into_docs(verdict_table(records), VERDICTS_START, VERDICTS_END, doc)


VERDICTS_START = "<!-- verdicts: written by benchmarks/paper_claims.py --docs -->"
VERDICTS_END = "<!-- /verdicts -->"


def write_into_docs(text: str, start: str = "<!-- paper-claims-table: written by benchmarks/paper_claims.py --docs -->",
                    end: str = "<!-- /paper-claims-table -->", docs: Path = ROOT / "docs" / "results.md") -> None:
    """Replace what stands between the markers `start` and `end` in `docs`."""
    before, rest = docs.read_text().split(start)
    _, after = rest.split(end)
    docs.write_text(f"{before}{start}\n{text.strip()}\n{end}{after}")


if __name__ == "__main__":
    run_script(main)
