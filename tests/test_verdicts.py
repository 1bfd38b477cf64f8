"""Words that match their numbers: the verdict rule against closed forms, and the docs' verdict
blocks against the shipped records."""

import json
import math
import sys
from pathlib import Path

import pytest

from tiedmask.experiments.verdict import mean_interval, paired_difference, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_the_interval_is_the_t_interval_of_the_paired_differences():
    # values 1, 2, 3: mean 2, sd 1, t(0.975, 2 df) = 4.302653 (tables): half-width 4.302653 / sqrt(3)
    diff = paired_difference({0: 3.0, 1: 5.0, 2: 7.0}, {0: 2.0, 1: 3.0, 2: 4.0, 9: 0.0})
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(2.0) and diff["std"] == pytest.approx(1.0)
    assert diff["high"] - diff["mean"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert verdict(diff, "a", "b") == "not significant"  # [-0.48, 4.48] contains 0
    assert math.isnan(mean_interval([1.0])["low"])


@pytest.mark.parametrize("values, word", [
    ([1.0, 1.1, 0.9], "a"), ([-1.0, -1.1, -0.9], "b"), ([1.0, 1.1], "inconclusive (2 paired seeds, 3 needed)"),
    ([0.5, -0.5, 0.1], "not significant"),
])
def test_the_rule_names_a_winner_only_with_three_pairs_and_an_interval_clear_of_zero(values, word):
    assert verdict(mean_interval(values), "a", "b") == word
    assert verdict(mean_interval(values), "a", "b", post_hoc=True) == f"{word} (post hoc)"
    assert verdict(None).startswith("inconclusive (0 paired")


def test_readme_and_results_quote_the_verdicts_the_records_earn():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import paper_claims
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    records = [json.loads(x) for x in paper_claims.RECORDS.read_text().splitlines() if x.strip()]
    expected = paper_claims.verdict_table(records)
    for doc in ("README.md", "docs/results.md"):
        text = (ROOT / doc).read_text()
        block = text.split(paper_claims.VERDICTS_START)[1].split(paper_claims.VERDICTS_END)[0]
        assert block.strip() == expected.strip(), f"{doc}: run `python benchmarks/paper_claims.py --docs`"


def test_a_claims_table_warns_when_its_seeds_trained_in_different_number_formats():
    """`precision: auto` may time bf16 in on one machine and not on another: a claim whose seeds
    mix bf16 and fp32 must say so (records from before the field count as fp32)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import paper_claims
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    records = [json.loads(x) for x in paper_claims.RECORDS.read_text().splitlines() if x.strip()]
    claim = records[0]["claim"]
    mine = [r for r in records if r["claim"] == claim]
    assert "Warning" not in paper_claims.table(mine)  # the shipped records: all fp32
    mixed = [dict(mine[0], precision="bf16"), *mine[1:]]
    assert "Warning: these runs trained in bf16 and fp32" in paper_claims.table(mixed)
