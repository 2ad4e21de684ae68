"""Paired differences between two methods over the seeds both ran: the quantity that tells methods apart.

Every method of a study runs on the same data, partition and client sampling for a given seed, so
the per-seed difference removes the seeds' shared swing; its interval is usually far narrower than
the two per-method intervals. For differences ``d_1 .. d_n`` this module reports:

- the mean and the two-sided 95% Student-t interval half-width ``t(0.975, n-1) * s_d / sqrt(n)``;
- the two-sided Wilcoxon signed-rank p-value (scipy's ``wilcoxon``: exact below 50 seeds without
  ties, zeros dropped as Wilcoxon's own method does; all differences zero gives p = 1). Its smallest
  possible value is ``2 / 2**n``: with 5 seeds it can never go below 0.0625, which the report says;
- the smallest difference the seeds could have detected: the paired t-test's minimum detectable
  effect at alpha 0.05 (two-sided) and 80% power for the spread observed,
  ``(t(0.975, n-1) + t(0.80, n-1)) * s_d / sqrt(n)`` (the usual noncentral approximation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from fedexperts.reporting import format as fmt

if TYPE_CHECKING:
    from fedexperts.reporting.compare import Comparison, Metric

CONFIDENCE = 0.95
POWER = 0.80


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences ``first - second`` of one metric and what they show."""

    seeds: tuple[int, ...]
    values: tuple[float, ...]
    mean: float | None
    ci: float | None
    """Half-width of the 95% t-interval (``None`` below two seeds)."""
    p_value: float | None
    """Two-sided Wilcoxon signed-rank p-value (``None`` below two seeds)."""
    detectable: float | None
    """Smallest difference detectable at alpha 0.05 with 80% power for this spread (``None`` below two seeds)."""

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.mean is None or self.ci is None:
            return None
        return self.mean - self.ci, self.mean + self.ci

    @property
    def smallest_p(self) -> float | None:
        """The smallest two-sided p-value the signed-rank test can give at this many seeds."""
        return None if self.n < 2 else 2.0 / 2.0**self.n

    @property
    def excludes_zero(self) -> bool:
        interval = self.interval
        return interval is not None and (interval[0] > 0 or interval[1] < 0)


def paired_difference(seeds: Sequence[int], values: Sequence[float]) -> PairedDifference:
    """Mean, t-interval, signed-rank p-value and detectable difference of per-seed differences."""
    from scipy.stats import t, wilcoxon

    sample = tuple(float(value) for value in values)
    n = len(sample)
    if n == 0:
        return PairedDifference(tuple(seeds), sample, None, None, None, None)
    mean = math.fsum(sample) / n
    if n == 1:
        return PairedDifference(tuple(seeds), sample, mean, None, None, None)
    spread = math.sqrt(math.fsum((value - mean) ** 2 for value in sample) / (n - 1)) / math.sqrt(n)
    critical = float(t.ppf(0.5 + CONFIDENCE / 2, n - 1))
    if all(value == 0 for value in sample):
        p_value = 1.0
    else:
        p_value = float(wilcoxon(sample, zero_method="wilcox", alternative="two-sided").pvalue)
    detectable = (critical + float(t.ppf(POWER, n - 1))) * spread
    return PairedDifference(tuple(seeds), sample, mean, critical * spread, p_value, detectable)


def signed(metric: Metric, value: float) -> str:
    """A difference in the metric's own format, with its sign."""
    text = metric.show(value)
    return f"+{text}" if value > 0 and not text.startswith("+") else text


def paired_outcome(metric: Metric, item: PairedDifference, first: str, second: str) -> str:
    """Whether the paired interval tells ``first`` and ``second`` apart, in words."""
    if item.mean is None:
        return "no seed has both values"
    if item.ci is None:
        return "one seed: no interval"
    if not item.excludes_zero:
        return "the interval contains 0: no difference is shown"
    better = (item.mean > 0) == metric.higher_is_better
    return f"the interval excludes 0: {first if better else second} is better"


def paired_cell(metric: Metric, item: PairedDifference) -> str:
    """``+0.0312 [+0.0101, +0.0523] p=0.031``: mean, interval and signed-rank p-value of the differences."""
    if item.mean is None:
        return fmt.MISSING
    text = signed(metric, item.mean)
    if item.interval is not None:
        low, high = item.interval
        text += f" [{signed(metric, low)}, {signed(metric, high)}]"
    if item.p_value is not None:
        text += f" p={item.p_value:.3g}"
    return text


def paired_lines(comparison: Comparison, first: str, second: str) -> list[str]:
    """The Markdown section of one pair: each metric's mean difference, interval, p-value and detectable size."""
    lines = [
        "| metric | mean difference | 95% CI | Wilcoxon p | detectable (80% power) | outcome |",
        "|---|---|---|---|---|---|",
    ]
    seeds: set[int] = set()
    for metric in comparison.metrics:
        item = comparison.paired(metric.key, first, second)
        seeds.update(item.seeds)
        interval = fmt.MISSING if item.interval is None else ", ".join(signed(metric, v) for v in item.interval)
        cells = (
            metric.label,
            fmt.MISSING if item.mean is None else signed(metric, item.mean),
            interval if item.interval is None else f"[{interval}]",
            fmt.MISSING if item.p_value is None else f"{item.p_value:.3g}",
            fmt.MISSING if item.detectable is None else metric.show(item.detectable),
            paired_outcome(metric, item, first, second),
        )
        lines.append("| " + " | ".join(fmt.markdown_cell(cell) for cell in cells) + " |")
    if seeds:
        smallest = 2.0 / 2.0 ** len(seeds)
        lines += [
            "",
            f"Over {len(seeds)} seeds the signed-rank test cannot give p below {smallest:.3g}; "
            "`detectable` is the smallest difference these seeds detect at alpha 0.05 with 80% power "
            "for the spread observed.",
        ]
    return lines


def paired_table(comparison: Comparison) -> Table | None:
    """A rich table of the paired differences to the reference (``None`` without one): mean [95% CI] p."""
    if not comparison.pairs:
        return None
    table = Table(title=f"paired by seed: {comparison.reference} − each method, mean [95% CI] Wilcoxon p")
    table.add_column("metric")
    for _, other in comparison.pairs:
        table.add_column(Text(f"− {other}"), justify="right")
    for metric in comparison.metrics:
        cells = []
        for first, second in comparison.pairs:
            item = comparison.paired(metric.key, first, second)
            style = ""
            if item.excludes_zero and item.mean is not None:
                style = "bold green" if (item.mean > 0) == metric.higher_is_better else "bold red"
            cells.append(Text(paired_cell(metric, item), style=style))
        table.add_row(metric.label, *cells)
    return table
