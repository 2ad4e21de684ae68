import math

import pytest
from rich.console import Console

from fedexperts.reporting import (
    ComparisonError,
    compare,
    comparison_markdown,
    comparison_table,
    estimate,
    load_run,
    paired_table,
    write_comparison,
)

from .helpers import simple_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T_975_2 = 4.303  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def _group(tmp_path, name, rouges, **options):
    """One method over seeds 0, 1, ...: every client's own ROUGE-L is the seed's value."""
    return [
        load_run(simple_run(tmp_path / f"{name}-{seed}", seed=seed, own_rouge_l=(value,) * 3, **options))
        for seed, value in enumerate(rouges)
    ]


def test_estimate_by_hand():
    result = estimate([0.5, 0.6, 0.7])
    assert result.mean == pytest.approx(0.6)
    # sample standard deviation 0.1, n = 3
    assert result.ci == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), rel=1e-3)
    assert result.interval == pytest.approx((0.6 - result.ci, 0.6 + result.ci))
    assert estimate([1.0, 1.0]).ci == 0.0  # no spread: a defined interval of width zero


def test_single_seed_ci_is_undefined():
    result = estimate([0.4])
    assert result.mean == 0.4 and result.ci is None and result.interval is None
    empty = estimate([])
    assert empty.mean is None and empty.ci is None and empty.n == 0


def test_compare_groups(tmp_path):
    comparison = compare(
        {
            "flex": _group(tmp_path, "flex", [0.5, 0.6, 0.7], bytes_down=100),
            "fedavg": _group(tmp_path, "fedavg", [0.0, 0.05, 0.1], bytes_down=300),
        }
    )
    assert comparison.labels == ("flex", "fedavg")
    rouge = comparison.estimate("personalized_rouge_l", "flex")
    assert rouge.n == 3 and rouge.mean == pytest.approx(0.6)
    assert rouge.ci == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), rel=1e-3)
    verdict = comparison.verdict("personalized_rouge_l")
    # |0.6 - 0.05| = 0.55 > 0.248 + 0.124: the intervals do not overlap
    assert (verdict.best, verdict.runner_up, verdict.overlap) == ("flex", "fedavg", False)
    # bytes: lower is better; down 100 + up 50 per client against 300 + 50, identical over seeds
    traffic = comparison.verdict("bytes_per_client_round")
    assert traffic.best == "flex" and comparison.estimate("bytes_per_client_round", "flex").mean == 150.0
    assert traffic.overlap is False  # both widths are zero
    assert comparison.estimate("probes", "flex").mean == pytest.approx(0.5)
    memory = comparison.verdict("peak_memory_bytes")
    assert memory.tie and memory.tied == ("flex", "fedavg") and memory.overlap is True  # both 1000 bytes
    text = comparison_markdown(comparison)
    assert "- peak memory (lower is better): a tie between **flex** 1,000 B ± 0 B, **fedavg** 1,000 B ± 0 B." in text
    assert "- personalized ROUGE-L (higher is better): **flex** 0.6000 ± 0.2484; runner-up fedavg" in text
    assert "the CIs do not overlap." in text


def test_later_scores_are_compared_only_where_measured(tmp_path):
    older = compare({"a": _group(tmp_path, "a", [0.5, 0.6])})
    assert "personalized_token_f1" not in [metric.key for metric in older.metrics]
    assert "token F1" not in comparison_markdown(older)
    later = {"rouge_1": 0.75, "rouge_2": 0.125, "token_f1": 0.5, "accuracy": 0.25}
    mixed = compare({"new": _group(tmp_path, "new", [0.5, 0.6], later=later), "old": _group(tmp_path, "old", [0.4])})
    assert mixed.estimate("personalized_token_f1", "new").mean == pytest.approx(0.5)
    assert mixed.estimate("personalized_token_f1", "old").n == 0
    assert mixed.estimate("personalized_accuracy", "new").mean == pytest.approx(0.25)
    assert "| personalized token F1 ↑ | 0.5000 ± 0.0000 | – |" in comparison_markdown(mixed)


def test_overlapping_intervals(tmp_path):
    comparison = compare({"a": _group(tmp_path, "a", [0.5, 0.6, 0.7]), "b": _group(tmp_path, "b", [0.45, 0.55, 0.65])})
    verdict = comparison.verdict("personalized_rouge_l")
    assert (verdict.best, verdict.overlap, verdict.tie) == ("a", True, False)
    assert "the CIs overlap, so the lead is not clear at 95%" in comparison_markdown(comparison)


def test_single_seed_comparison_files(tmp_path):
    comparison = compare(
        {
            "solo": _group(tmp_path, "solo", [0.6], probes=None),
            "pair": _group(tmp_path, "pair", [0.2, 0.3], probes=None),
        }
    )
    assert comparison.estimate("personalized_rouge_l", "solo").ci is None
    assert comparison.verdict("personalized_rouge_l").overlap is None
    assert comparison.estimate("probes", "pair").mean is None
    written = write_comparison(tmp_path / "out", comparison)
    assert [path.name for path in written] == ["comparison.md", "comparison.png"]
    assert written[1].read_bytes().startswith(PNG_MAGIC)
    text = written[0].read_text()
    assert "| personalized ROUGE-L ↑ | 0.6000 ± n/a | 0.2500 ± " in text
    assert "| seeds (n) | 1 (0) | 2 (0, 1) |" in text
    assert "personalized ROUGE-L (higher is better): **solo** 0.6000 ± n/a; runner-up pair" in text
    assert "overlap cannot be told" in text
    assert "probe accuracy (higher is better): no method has a value." in text


def test_partial_metric_and_duplicate_seeds(tmp_path):
    finished = _group(tmp_path, "done", [0.4, 0.5])
    unfinished = load_run(simple_run(tmp_path / "cut", seed=0, finished=False))
    comparison = compare({"m": [*finished, unfinished]})
    assert comparison.estimate("personalized_rouge_l", "m").n == 2
    text = comparison_markdown(comparison)
    assert "(n=2)" in text
    assert "seeds occurring more than once: 0" in text
    assert "no other method has a value" in text


def test_comparison_table(tmp_path):
    comparison = compare({"[x]": _group(tmp_path, "x", [0.5, 0.6, 0.7])})
    console = Console(record=True, width=200)
    console.print(comparison_table(comparison))
    text = console.export_text()
    assert "[x]" in text and "0.6000 ± 0.2484" in text


def test_nothing_to_compare(tmp_path):
    with pytest.raises(ComparisonError):
        compare({})
    with pytest.raises(ComparisonError, match="'empty'"):
        compare({"empty": []})


def test_paired_differences_by_seed_tell_apart_what_the_per_method_intervals_cannot(tmp_path):
    # both methods swing with the seed (0.2 .. 0.6) but a beats b by 0.02 on every seed
    comparison = compare(
        {
            "a": _group(tmp_path, "a", [0.22, 0.62, 0.42]),
            "b": _group(tmp_path, "b", [0.20, 0.60, 0.40]),
        },
        reference="a",
    )
    assert comparison.pairs == (("a", "b"),)
    assert comparison.verdict("personalized_rouge_l").overlap is True
    paired = comparison.paired("personalized_rouge_l", "a", "b")
    assert paired.n == 3 and paired.mean == pytest.approx(0.02) and paired.ci == pytest.approx(0.0, abs=1e-9)
    text = comparison_markdown(comparison)
    assert "## a − b, paired by seed" in text
    assert "the interval excludes 0: a is better" in text
    with pytest.raises(ComparisonError, match="reference method 'c' has no runs"):
        compare({"a": comparison.runs["a"]}, reference="c")


def test_every_method_is_paired_with_the_reference_and_only_seeds_both_ran_count(tmp_path):
    comparison = compare(
        {
            "a": _group(tmp_path, "a", [0.3, 0.4, 0.5]),
            "ref": _group(tmp_path, "ref", [0.5, 0.5, 0.5, 0.9]),
            "c": _group(tmp_path, "c", [0.1, 0.2]),
        },
        reference="ref",
    )
    assert comparison.pairs == (("ref", "a"), ("ref", "c"))
    assert comparison.paired("personalized_rouge_l", "ref", "a").values == pytest.approx((0.2, 0.1, 0.0))
    with_c = comparison.paired("personalized_rouge_l", "ref", "c")
    assert with_c.seeds == (0, 1) and with_c.values == pytest.approx((0.4, 0.3))
    assert compare({"a": comparison.runs["a"]}).pairs == ()  # no reference: no paired section
    table = paired_table(comparison)
    assert table is not None and [str(column.header) for column in table.columns][1:] == ["− a", "− c"]
    assert paired_table(compare({"a": comparison.runs["a"]})) is None


def test_a_paired_interval_containing_zero_says_so(tmp_path):
    comparison = compare(
        {"a": _group(tmp_path, "a", [0.3, 0.5, 0.4]), "b": _group(tmp_path, "b", [0.4, 0.4, 0.4])},
        reference="a",
    )
    assert "the interval contains 0: no difference is shown" in comparison_markdown(comparison)


def test_a_reference_adds_the_paired_panel_and_table_to_the_files(tmp_path):
    comparison = compare(
        {"a": _group(tmp_path, "a", [0.3, 0.5, 0.4]), "b": _group(tmp_path, "b", [0.2, 0.45, 0.38])},
        reference="a",
    )
    plain = write_comparison(tmp_path / "plain", compare(dict(comparison.runs)))
    written = write_comparison(tmp_path / "paired", comparison)
    assert written[1].read_bytes().startswith(PNG_MAGIC)
    assert written[1].stat().st_size != plain[1].stat().st_size  # the second panel is drawn
    text = written[0].read_text()
    assert "| metric | mean difference | 95% CI | Wilcoxon p | detectable (80% power) | outcome |" in text
    # differences 0.1, 0.05, 0.02: all positive, so the exact two-sided p is 2 / 2**3
    assert "| personalized ROUGE-L | +0.0567 | [" in text and "| 0.25 |" in text
    assert "cannot give p below 0.25" in text


def test_rounds_to_90_is_left_out_when_no_run_evaluated_its_rounds(tmp_path):
    evaluated = compare({"a": _group(tmp_path, "a", [0.3, 0.5])})
    assert "rounds_to_90" in [metric.key for metric in evaluated.metrics]
    final_only = compare({"b": _group(tmp_path, "b", [0.3, 0.5], curve=())})
    assert "rounds_to_90" not in [metric.key for metric in final_only.metrics]
    assert "rounds to 90%" not in comparison_markdown(final_only)
