"""The word a comparison earns from its numbers, by one written rule.

Results in docs and README quote these words; `benchmarks/paper_claims.py` writes them and a
test checks the docs against the records, so a word never claims more than its numbers.
"""

from __future__ import annotations

import math
import statistics

RULE = ("a − b paired by seed, 95% t-interval: fewer than 3 pairs → inconclusive; an interval "
        "that contains 0 → not significant; otherwise the sign names the winner; a comparison "
        "chosen after seeing the data is marked post hoc")
MIN_PAIRS = 3


def mean_interval(values: list[float]) -> dict:
    """Mean, std and 95% t-interval of the mean (nan with one value), and n."""
    from scipy import stats  # scikit-learn's dependency; imported late to keep the CLI quick

    mean = statistics.mean(values)
    if len(values) < 2:
        return {"n": len(values), "mean": mean, "std": math.nan, "low": math.nan, "high": math.nan}
    sd = statistics.stdev(values)
    half = stats.t.ppf(0.975, len(values) - 1) * sd / len(values) ** 0.5
    return {"n": len(values), "mean": mean, "std": sd, "low": mean - half, "high": mean + half}


def paired_difference(a: dict, b: dict) -> dict | None:
    """a − b over the keys (seeds) both have: `mean_interval`, or None with no pair."""
    keys = sorted(set(a) & set(b))
    return mean_interval([a[k] - b[k] for k in keys]) if keys else None


def verdict(diff: dict | None, better: str = "a better", worse: str = "b better",
            post_hoc: bool = False) -> str:
    """The rule (`RULE`) applied to a paired difference a − b."""
    if diff is None or diff["n"] < MIN_PAIRS or math.isnan(diff["low"]) or math.isnan(diff["high"]):
        word = f"inconclusive ({0 if diff is None else diff['n']} paired seeds, {MIN_PAIRS} needed)"
    elif diff["low"] <= 0 <= diff["high"]:
        word = "not significant"
    else:
        word = better if diff["low"] > 0 else worse
    return f"{word} (post hoc)" if post_hoc else word
