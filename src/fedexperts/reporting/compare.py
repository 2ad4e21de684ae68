"""Compare methods over seeds: mean and 95% Student-t confidence interval of each headline metric.

Each group is one method (its label) run with several seeds; a seed is one sample. The interval's
half-width is ``t(0.975, n - 1) * s / sqrt(n)`` with ``s`` the sample standard deviation
(``ddof=1``). With a single seed there is no spread to estimate, so the interval is undefined
(``None``, shown as ``± n/a``), never zero. Runs that lack a metric (no final record, no probes)
are left out of that metric's sample, and the table says so with its own ``n``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

from fedexperts.atomic import atomic_file
from fedexperts.errors import FedExpertsError
from fedexperts.reporting import format as fmt
from fedexperts.reporting.intervals import CONFIDENCE, Estimate, PairedDifference, estimate, paired_difference
from fedexperts.reporting.paired import paired_lines
from fedexperts.reporting.runs import RunRecord

MARKDOWN_FILE = "comparison.md"
PLOT_FILE = "comparison.png"


class ComparisonError(FedExpertsError):
    """Groups that cannot be compared (none, or a method without runs)."""


@dataclass(frozen=True)
class Metric:
    """One compared number: how to read it from a run, which way is better, how to print it."""

    key: str
    label: str
    higher_is_better: bool
    value: Callable[[RunRecord], float | None]
    show: Callable[[float], str]
    optional: bool = False
    """Left out of a comparison in which no run has it (scores that older runs did not measure)."""


def _personalized_rouge_l(run: RunRecord) -> float | None:
    return None if run.personalized is None else run.personalized.rouge_l


def _personalized_exact_match(run: RunRecord) -> float | None:
    return None if run.personalized is None else run.personalized.exact_match


def _personalized(name: str) -> Callable[[RunRecord], float | None]:
    """The personalized mean of an optional score (``None`` for runs that did not measure it)."""

    def value(run: RunRecord) -> float | None:
        scores = run.personalized
        return None if scores is None else getattr(scores, name)

    return value


def _union_rouge_l(run: RunRecord) -> float | None:
    return None if run.union is None else run.union.rouge_l


def _bytes_per_client_round(run: RunRecord) -> float | None:
    traffic = run.bytes_per_client_round
    return None if traffic is None else traffic.total


def _optional_int(value: int | None) -> float | None:
    return None if value is None else float(value)


METRICS: tuple[Metric, ...] = (
    Metric("personalized_rouge_l", "personalized ROUGE-L", True, _personalized_rouge_l, fmt.score),
    Metric("personalized_exact_match", "personalized exact match", True, _personalized_exact_match, fmt.score),
    Metric("personalized_rouge_1", "personalized ROUGE-1", True, _personalized("rouge_1"), fmt.score, optional=True),
    Metric("personalized_rouge_2", "personalized ROUGE-2", True, _personalized("rouge_2"), fmt.score, optional=True),
    Metric("personalized_token_f1", "personalized token F1", True, _personalized("token_f1"), fmt.score, optional=True),
    Metric(
        "personalized_accuracy",
        "personalized label accuracy",
        True,
        _personalized("accuracy"),
        fmt.score,
        optional=True,
    ),
    Metric("union_rouge_l", "union ROUGE-L", True, _union_rouge_l, fmt.score),
    Metric("probes", "probe accuracy", True, lambda run: run.probes, fmt.score),
    Metric("mmlu", "MMLU accuracy", True, lambda run: run.mmlu, fmt.score, optional=True),
    Metric("bytes_per_client_round", "bytes per client per round (down+up)", False, _bytes_per_client_round, fmt.size),
    Metric("peak_memory_bytes", "peak memory", False, lambda run: _optional_int(run.peak_memory_bytes), fmt.size),
    Metric(
        "rounds_to_90",
        "rounds to 90% of best ROUGE-L",
        False,
        lambda run: _optional_int(run.rounds_to_90),
        lambda value: f"{value:.2f}",
        optional=True,  # only runs that evaluate every round (``eval.every``) have it
    ),
)


@dataclass(frozen=True)
class Verdict:
    """The best method on one metric and whether its CI overlaps the runner-up's.

    ``overlap`` is ``None`` when it cannot be told: no runner-up, or either CI undefined. ``tied``
    lists every method whose mean equals the best one (just the best when there is no tie).
    """

    metric: Metric
    best: str | None
    runner_up: str | None
    overlap: bool | None
    tied: tuple[str, ...] = ()

    @property
    def tie(self) -> bool:
        return len(self.tied) > 1


@dataclass(frozen=True)
class Comparison:
    labels: tuple[str, ...]
    runs: dict[str, tuple[RunRecord, ...]]
    metrics: tuple[Metric, ...]
    estimates: dict[str, dict[str, Estimate]]
    """Metric key, then method label."""
    reference: str | None = None
    """The method every other one is compared with, paired by seed (``reference - other``)."""

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """``(reference, other)`` for every other method: the paired differences the report shows."""
        if self.reference is None:
            return ()
        return tuple((self.reference, label) for label in self.labels if label != self.reference)

    def metric(self, key: str) -> Metric:
        for metric in self.metrics:
            if metric.key == key:
                return metric
        raise KeyError(key)

    def estimate(self, key: str, label: str) -> Estimate:
        return self.estimates[key][label]

    def verdict(self, key: str) -> Verdict:
        """Rank methods by mean (ties keep the groups' order) and compare the top two intervals."""
        metric = self.metric(key)
        ranked = [
            label
            for label in self.labels
            if (mean := self.estimates[key][label].mean) is not None and not math.isnan(mean)
        ]
        sign = -1.0 if metric.higher_is_better else 1.0
        ranked.sort(key=lambda label: sign * (self.estimates[key][label].mean or 0.0))
        if not ranked:
            return Verdict(metric, None, None, None)
        top = self.estimates[key][ranked[0]].mean
        tied = tuple(label for label in ranked if self.estimates[key][label].mean == top)
        if len(ranked) == 1:
            return Verdict(metric, ranked[0], None, None, tied)
        first, second = self.estimates[key][ranked[0]], self.estimates[key][ranked[1]]
        overlap = None
        if first.ci is not None and second.ci is not None and first.mean is not None and second.mean is not None:
            overlap = abs(first.mean - second.mean) <= first.ci + second.ci
        return Verdict(metric, ranked[0], ranked[1], overlap, tied)

    def paired(self, key: str, first: str, second: str) -> PairedDifference:
        """``first - second`` on one metric, seed by seed over the seeds both have (see :mod:`.paired`).

        Runs of one seed share the data, partition and initialisation, so the paired interval is the one
        that tells two methods apart (the per-method intervals also carry the seeds' spread).
        """
        metric = self.metric(key)
        one = {run.info.seed: metric.value(run) for run in self.runs[first]}
        other = {run.info.seed: metric.value(run) for run in self.runs[second]}
        shared = sorted(seed for seed in one.keys() & other.keys() if one[seed] is not None and other[seed] is not None)
        return paired_difference(shared, [float(one[seed]) - float(other[seed]) for seed in shared])  # type: ignore[arg-type]

    def duplicate_seeds(self, label: str) -> list[int]:
        """Seeds that occur more than once in a group (usually the same run loaded twice)."""
        counts = Counter(run.info.seed for run in self.runs[label])
        return sorted(seed for seed, times in counts.items() if times > 1)


def compare(
    groups: Mapping[str, Sequence[RunRecord]],
    metrics: Sequence[Metric] = METRICS,
    reference: str | None = None,
) -> Comparison:
    """Estimate every metric for every method (group label) over its seeds; with a ``reference`` method, every
    other method's paired difference to it is reported too."""
    if not groups:
        raise ComparisonError("nothing to compare: no groups of runs")
    empty = [label for label, runs in groups.items() if not runs]
    if empty:
        raise ComparisonError(f"methods without runs: {', '.join(map(repr, empty))}")
    runs = {label: tuple(group) for label, group in groups.items()}
    metrics = [
        metric
        for metric in metrics
        if not metric.optional or any(metric.value(run) is not None for group in runs.values() for run in group)
    ]
    estimates = {
        metric.key: {
            label: estimate([value for run in group if (value := metric.value(run)) is not None])
            for label, group in runs.items()
        }
        for metric in metrics
    }
    if reference is not None and reference not in runs:
        raise ComparisonError(f"reference method {reference!r} has no runs; methods: {', '.join(runs)}")
    return Comparison(tuple(runs), runs, tuple(metrics), estimates, reference)


def estimate_cell(comparison: Comparison, metric: Metric, label: str) -> str:
    """``mean ± half-width`` of one method on one metric (``± n/a`` with one seed, ``(n=k)`` when runs lack it)."""
    item = comparison.estimate(metric.key, label)
    if item.mean is None:
        return fmt.MISSING
    text = f"{metric.show(item.mean)} ± {'n/a' if item.ci is None else metric.show(item.ci)}"
    if item.n != len(comparison.runs[label]):
        text += f" (n={item.n})"
    return text


def _seeds(comparison: Comparison, label: str) -> str:
    seeds = ", ".join(str(run.info.seed) for run in comparison.runs[label])
    return f"{len(comparison.runs[label])} ({seeds})"


def _direction(metric: Metric) -> str:
    return "higher is better" if metric.higher_is_better else "lower is better"


def verdict_line(comparison: Comparison, verdict: Verdict) -> str:
    """One sentence: the best method on a metric and whether its lead is clear at 95%."""
    metric = verdict.metric
    head = f"{metric.label} ({_direction(metric)}):"
    if verdict.best is None:
        return f"{head} no method has a value."
    if verdict.tie:
        methods = ", ".join(f"**{label}** {estimate_cell(comparison, metric, label)}" for label in verdict.tied)
        return f"{head} a tie between {methods}."
    best = f"**{verdict.best}** {estimate_cell(comparison, metric, verdict.best)}"
    if verdict.runner_up is None:
        return f"{head} {best}; no other method has a value."
    runner_up = f"runner-up {verdict.runner_up} {estimate_cell(comparison, metric, verdict.runner_up)}"
    if verdict.overlap is None:
        outcome = "overlap cannot be told (a CI is undefined: one seed)"
    elif verdict.overlap:
        outcome = "the CIs overlap, so the lead is not clear at 95%"
    else:
        outcome = "the CIs do not overlap"
    return f"{head} {best}; {runner_up}; {outcome}."


def comparison_markdown(comparison: Comparison) -> str:
    """``comparison.md``: the table of mean ± CI per metric and method, then the best method per metric."""
    labels = comparison.labels
    lines = [
        "# Comparison",
        "",
        f"Mean over seeds ± half-width of the {CONFIDENCE:.0%} confidence interval (Student t, n − 1 degrees "
        "of freedom). With one seed the interval is undefined (`± n/a`). `(n=k)` marks a metric that only "
        "k of the method's runs have.",
        "",
        "| metric | " + " | ".join(fmt.markdown_cell(label) for label in labels) + " |",
        "|---|" + "---|" * len(labels),
        "| seeds (n) | " + " | ".join(_seeds(comparison, label) for label in labels) + " |",
    ]
    for metric in comparison.metrics:
        arrow = "↑" if metric.higher_is_better else "↓"
        cells = " | ".join(estimate_cell(comparison, metric, label) for label in labels)
        lines.append(f"| {metric.label} {arrow} | {cells} |")
    lines += ["", "## Best method per metric", ""]
    lines += [f"- {verdict_line(comparison, comparison.verdict(metric.key))}" for metric in comparison.metrics]
    for first, second in comparison.pairs:
        lines += ["", f"## {first} − {second}, paired by seed", "", *paired_lines(comparison, first, second)]
    notes = [
        f"- {label}: seeds occurring more than once: {', '.join(map(str, seeds))}"
        for label in labels
        if (seeds := comparison.duplicate_seeds(label))
    ]
    if notes:
        lines += ["", "## Warnings", "", *notes]
    lines += ["", f"![personalized score per method]({PLOT_FILE})", ""]
    return "\n".join(lines)


def comparison_table(comparison: Comparison) -> Table:
    """A rich table for the terminal: one row per metric, one column per method."""
    table = Table(title=f"comparison: mean ± {CONFIDENCE:.0%} CI over seeds (n/a: one seed; best in green)")
    table.add_column("metric")
    for label in comparison.labels:
        table.add_column(Text(label), justify="right")
    table.add_row("seeds (n)", *(_seeds(comparison, label) for label in comparison.labels), end_section=True)
    for metric in comparison.metrics:
        best = comparison.verdict(metric.key).tied
        cells = [
            Text(estimate_cell(comparison, metric, label), style="bold green" if label in best else "")
            for label in comparison.labels
        ]
        table.add_row(f"{metric.label} {'↑' if metric.higher_is_better else '↓'}", *cells)
    return table


def write_comparison(out_dir: str | Path, comparison: Comparison) -> list[Path]:
    """Write ``comparison.md`` and ``comparison.png`` into ``out_dir``, each atomically."""
    from fedexperts.reporting.plots import plot_comparison

    folder = Path(out_dir)
    markdown = folder / MARKDOWN_FILE
    with atomic_file(markdown) as staging:
        staging.write_text(comparison_markdown(comparison), encoding="utf-8")
    return [markdown, plot_comparison(comparison, folder / PLOT_FILE)]
