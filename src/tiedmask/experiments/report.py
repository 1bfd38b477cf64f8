"""Tables (Markdown) and plots (PNG) from a results store: mean ± std over seeds per group.

>>> rows = summarize([{"variant": "a", "test_acc": 0.5, "status": "ok"},
...                   {"variant": "a", "test_acc": 0.7, "status": "ok"}], by=("variant",))
>>> round(rows[0]["test_acc"][0], 3), rows[0]["n"]
(0.6, 2)
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..plots import plt
from .store import setting

METRICS = {  # key: (column title, scale, digits)
    "test_acc": ("test acc (%)", 100.0, 2),
    "final_train_loss": ("final train loss", 1.0, 3),
    "train_time_s": ("train time (s)", 1.0, 1),
    "s_per_epoch": ("s / epoch", 1.0, 1),
    "img_per_s": ("img/s", 1.0, 0),
    "peak_mem_mb": ("peak mem (MB)", 1.0, 0),
    "epochs": ("epochs", 1.0, 1),
    "data_epochs": ("passes over the data", 1.0, 2),  # fractional where a clock stopped an epoch
    "macs_effective": ("effective MMACs/img", 1e-6, 1),
    "cka_offdiag_mean": ("mean off-diagonal CKA", 1.0, 3),
    "test_ppl": ("test perplexity", 1.0, 2),  # language-model runs
    "val_ppl": ("validation perplexity", 1.0, 2),
    "tokens_per_s": ("tokens/s", 1.0, 0),
}
LM_METRICS = ("test_ppl", "val_ppl", "test_acc", "final_train_loss", "tokens_per_s", "train_time_s")


def _value(record: dict, key: str):
    if key in record:
        return record[key]
    return record.get("solver", {}).get(key)


def summarize(records: list[dict], by: tuple[str, ...], metrics=tuple(METRICS)) -> list[dict]:
    """One row per group: n runs, (mean, std) per metric over the ok runs, failures counted."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    rows = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        row = {**dict(zip(by, key)), "n": len(ok), "failed": len(rs) - len(ok),
               "reasons": sorted({r.get("reason", "") for r in rs if r.get("status") != "ok"})}
        for m in metrics:
            values = [v for v in (_value(r, m) for r in ok) if isinstance(v, (int, float))]
            if values:
                row[m] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        if ok:
            row["params"] = ok[0].get("params")
        rows.append(row)
    return rows


def failures(records: list[dict]) -> list[str]:
    """One line per run that did not end ok: what it was, and why."""
    return [f"- {r.get('variant', '?')} seed {r.get('seed', '?')}: {r.get('status', '?')}: "
            f"{r.get('reason') or 'no reason recorded'}" for r in records if r.get("status") != "ok"]


def flagged(records: list[dict]) -> list[str]:
    """One line per run that ended ok but carries a warning (e.g. chance accuracy)."""
    return [f"- {r.get('variant', '?')} seed {r.get('seed', '?')}: {r['warning']}"
            for r in records if r.get("status") == "ok" and r.get("warning")]


def fmt(pair, scale=1.0, digits=2, single: bool = False) -> str:
    """'mean ± std'; the mean alone for a `single` run (it has no spread to show)."""
    if not pair:
        return "–"
    mean, std = pair
    return f"{mean * scale:.{digits}f}" + ("" if single else f" ± {std * scale:.{digits}f}")


def markdown_table(rows: list[dict], by: tuple[str, ...], metrics=tuple(METRICS)) -> str:
    shown = [m for m in metrics if any(m in r for r in rows)]
    head = [*by, "params", "runs", *[METRICS.get(m, (m, 1, 3))[0] for m in shown]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        runs = f"{r['n']}" + (f" (+{r['failed']} failed)" if r["failed"] else "")
        params = f"{r['params']:,}" if r.get("params") else "–"
        cells = [str(r.get(k)) for k in by] + [params, runs]
        cells += [fmt(r.get(m), *METRICS.get(m, (m, 1.0, 3))[1:], single=r["n"] < 2) for m in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finish(fig, ax, path: Path, title: str, xlabel: str | None, ylabel: str, legend: bool) -> Path:
    """Labels, grid, legend, save and close: the same for every plot here."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_plot(rows: list[dict], label_keys: tuple[str, ...], metric: str, path: Path, title: str) -> Path:
    labels = [" / ".join(str(r.get(k)) for k in label_keys) for r in rows if metric in r]
    values = [r[metric] for r in rows if metric in r]
    title_m, scale, _ = METRICS.get(metric, (metric, 1.0, 2))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels)), 4), dpi=120)
    ax.bar(range(len(values)), [v[0] * scale for v in values], yerr=[v[1] * scale for v in values],
           capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right")
    return _finish(fig, ax, path, title, None, title_m, legend=False)


def scatter_plot(rows: list[dict], label_keys, x: str, y: str, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        if x in r and y in r:
            sx, sy = METRICS.get(x, (x, 1.0, 0))[1], METRICS.get(y, (y, 1.0, 0))[1]
            ax.errorbar(r[x][0] * sx, r[y][0] * sy, xerr=r[x][1] * sx, yerr=r[y][1] * sy,
                        fmt="o", capsize=3, label=" / ".join(str(r.get(k)) for k in label_keys))
    return _finish(fig, ax, path, title, METRICS.get(x, (x,))[0], METRICS.get(y, (y,))[0], legend=True)


def speed_ratio(rows: list[dict], slow: str, fast: str, key: str = "s_per_epoch") -> float:
    """Mean `key` of variant `slow` over that of `fast` (NaN if either is missing)."""
    pick = {r.get("variant"): r.get(key) for r in rows}
    if not pick.get(slow) or not pick.get(fast):
        return math.nan
    return pick[slow][0] / pick[fast][0]


def _model(record: dict, key: str):
    return setting(record, f"model.{key}")


def line_plot(records: list[dict], x_key: str, series_key, path: Path, title: str, metric="test_acc") -> Path:
    """Mean ± std of `metric` against model setting `x_key`, one line per series."""
    series: dict[str, dict] = {}
    for r in records:
        if r.get("status") == "ok" and _model(r, x_key) is not None:
            series.setdefault(series_key(r), {}).setdefault(_model(r, x_key), []).append(r[metric])
    title_m, scale, _ = METRICS[metric]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, points in sorted(series.items()):
        xs = sorted(points)
        means = [statistics.mean(points[x]) * scale for x in xs]
        stds = [(statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0) * scale for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    return _finish(fig, ax, path, title, x_key, title_m, legend=True)


def write_sweep_report(records: list[dict], out: Path, title: str) -> str:
    """Table per variant, accuracy against density and against depth, CKA against scope."""
    language = any(r.get("task") == "lm" for r in records)
    rows = summarize(records, ("variant",))
    metrics = LM_METRICS if language else ("test_acc", "final_train_loss", "macs_effective", "cka_offdiag_mean",
                                           "train_time_s")
    lines = [f"# sweep: {title}", "", markdown_table(rows, ("variant",), metrics), ""]
    ok = [r for r in records if r.get("status") == "ok"]

    if len({_model(r, "masks.density") for r in ok}) > 1:
        line_plot(ok, "masks.density", lambda r: f"{_model(r, 'cell')} {_model(r, 'masks.scope')} "
                  f"w{_model(r, 'width')} d{_model(r, 'depth')}", out / "acc_vs_density.png",
                  f"{title}: test accuracy against density")
    if len({_model(r, "depth") for r in ok}) > 1:
        line_plot(ok, "depth", lambda r: f"{_model(r, 'masks.scope')} w{_model(r, 'width')} "
                  f"density {_model(r, 'masks.density')}", out / "acc_vs_depth.png",
                  f"{title}: test accuracy against depth")
    with_cka = [r for r in summarize(ok, ("variant",)) if "cka_offdiag_mean" in r]
    if with_cka:
        bar_plot(with_cka, ("variant",), "cka_offdiag_mean", out / "cka_by_variant.png",
                 f"{title}: mean off-diagonal CKA between applications")
    if len(rows) > 1 and language:
        bar_plot(rows, ("variant",), "test_ppl", out / "ppl_by_variant.png", f"{title}: test perplexity")
    elif len(rows) > 1:
        bar_plot(rows, ("variant",), "test_acc", out / "acc_by_variant.png", f"{title}: test accuracy")
    if failures(records):
        lines += ["Runs not ok:", *failures(records), ""]
    if flagged(records):
        lines += ["Runs flagged:", *flagged(records), ""]
    lines += ["Plots: " + ", ".join(sorted(p.name for p in out.glob("*.png")))]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    return report
