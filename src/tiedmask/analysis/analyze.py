"""`tiedmask analyze RUN_DIR`: CKA between applications, mask statistics, state dynamics.

Writes RUN_DIR/analysis/: cka_stage<s>.png, analysis.json and summary.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.layers import masked_layers
from ..core.masks import mask_statistics
from ..errors import ConfigError
from ..files import writable_folder
from ..plots import plot_heatmap
from ..training.data import fixed_subset, normalize
from ..training.rundir import RunDir, load_trained
from .cka import MinibatchCKA
from .states import relative_changes, stage_states


def off_diagonal_mean(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    if n < 2:
        return float("nan")
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * n - n))


def _accumulate(model, x_uint8, mean, std, batch_size):
    """Per stage: a CKA accumulator over all batches and the mean relative change per step."""
    accumulators, changes = None, None
    for start in range(0, len(x_uint8) - 3, batch_size):
        batch = x_uint8[start:start + batch_size]
        if len(batch) < 4:
            break
        states = stage_states(model, normalize(batch, mean, std))
        if accumulators is None:
            accumulators = [MinibatchCKA(len(s)) for s in states]
            changes = [[0.0] * (len(s) - 1) for s in states]
        for acc, stage, ch in zip(accumulators, states, changes):
            acc.update(stage)
            for i, c in enumerate(relative_changes(stage)):
                ch[i] += c * len(batch) / len(x_uint8)
    return accumulators, changes


@torch.no_grad()
def analyze_model(model, x_uint8: torch.Tensor, mean, std, batch_size: int = 250) -> dict:
    """CKA matrices, relative changes and mask statistics of `model` on images `x_uint8`."""
    if len(x_uint8) < 4:
        raise ConfigError(f"CKA needs at least 4 images, got {len(x_uint8)}; raise --images")
    accumulators, changes = _accumulate(model, x_uint8, mean, std, batch_size)
    if not accumulators:
        raise ConfigError("this model traces no states to compare (no tied stage or run of blocks); "
                          "name its repeated blocks with model.tie.blocks")
    cka = [acc.compute() for acc in accumulators]
    masks = {}
    for name, layer in masked_layers(model):
        stack = layer.mask_stack()
        if stack is not None:
            stats = mask_statistics(stack)
            masks[name] = {"density": stats["density"], "masks": len(stack),
                           "mean_overlap": stats["mean_overlap"]}
    return {
        "images": len(x_uint8),
        "cka": [m.tolist() for m in cka],
        "cka_offdiag_mean": [off_diagonal_mean(m) for m in cka],
        "cka_adjacent_mean": [float(m.diagonal(1).mean()) if len(m) > 1 else float("nan") for m in cka],
        "relative_change": changes,
        "masks": masks,
    }


def analyze_run(run_dir: str | Path, images: int = 1000, data_root: str = "") -> dict:
    """Analyse a run (a language-model run: CKA between its layers over `images` test tokens)."""
    run_dir = Path(run_dir)
    cfg = RunDir(run_dir).read_config()
    if cfg.task == "lm":
        from .lm_cka import analyze_lm_run  # needs transformers

        result = analyze_lm_run(run_dir, images, data_root)
        out = writable_folder(run_dir / "analysis", "copy the run somewhere writable and analyze that copy")
        label = "layer"
    else:
        model, cfg, data = load_trained(run_dir, data_root)
        out = writable_folder(run_dir / "analysis", "copy the run somewhere writable and analyze that copy")
        x, _ = fixed_subset(data.test_x, data.test_y, images)  # of the run's own test images
        mean, std = data.stats.tensors()
        result = analyze_model(model, x, mean, std)
        label = {"equilibrium": "solver iteration", "untied": "block"}.get(cfg.model.execution, "application")
    m = cfg.model
    for s, matrix in enumerate(result["cka"]):
        plot_heatmap(matrix, out / f"cka_stage{s}.png",
                     f"{m.name} {m.execution} {m.masks.scope} d={m.masks.density}: CKA, stage {s}", label)
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(result, cfg, result["images"]))
    return result


def summary_markdown(result: dict, cfg, images: int) -> str:
    m = cfg.model
    lines = [f"# analysis: {m.name}, {m.execution}, masks {m.masks.kind}/{m.masks.scope} at density {m.masks.density}",
             "", f"CKA (minibatch unbiased, linear) over {images} test {result.get('samples', 'images')}.", "",
             "| stage | states | mean off-diagonal CKA | mean adjacent CKA | relative change first → last |",
             "|---|---:|---:|---:|---|"]
    for s, matrix in enumerate(result["cka"]):
        ch = result["relative_change"][s]
        trend = f"{ch[0]:.3f} → {ch[-1]:.3f}" if ch else "–"
        lines.append(f"| {s} | {len(matrix)} | {result['cka_offdiag_mean'][s]:.3f} "
                     f"| {result['cka_adjacent_mean'][s]:.3f} | {trend} |")
    if result["masks"]:
        lines += ["", "| masked weight | masks | realised density | mean pairwise overlap |", "|---|---:|---:|---:|"]
        for name, st in result["masks"].items():
            lines.append(f"| {name} | {st['masks']} | {st['density']:.3f} | {st['mean_overlap']:.3f} |")
    lines += ["", "Overlap of independent masks at density d is about d; identical masks give 1."]
    return "\n".join(lines) + "\n"
