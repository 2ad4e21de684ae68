"""Rendering paired differences: a Markdown section per pair, a cell, a terminal table (see :mod:`.intervals`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from fedexperts.reporting import format as fmt
from fedexperts.reporting.intervals import PairedDifference

if TYPE_CHECKING:
    from fedexperts.reporting.compare import Comparison, Metric


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
    if len(seeds) > 1:
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
