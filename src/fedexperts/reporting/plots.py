"""PNG charts of a run and of a comparison, drawn off-screen (Agg) and written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedexperts.atomic import atomic_file
from fedexperts.reporting.runs import RunRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from fedexperts.reporting.compare import Comparison

_DPI = 120


def _figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas: no pyplot state, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    """Write the PNG beside its target first, so a reader never sees half a file."""
    target = Path(path)
    figure.tight_layout()
    with atomic_file(target) as staging:
        figure.savefig(staging, format="png", dpi=_DPI)
    return target


def _mark_zeros(axes: Axes, positions: Sequence[float], values: Sequence[float], width: float, color: object) -> None:
    """A bar of height 0 draws nothing; give it a thick stroke on the baseline and a "0" above, so it reads as 0."""
    for x, value in zip(positions, values, strict=True):
        if value == 0:
            axes.plot([x - width / 2, x + width / 2], [0, 0], color=color, linewidth=3, solid_capstyle="butt")
            axes.annotate(
                "0",
                (x, 0),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize="x-small",
                color=color,
            )


def _grouped_bars(
    axes: Axes,
    names: Sequence[str],
    series: Sequence[tuple[str, Sequence[float], dict[str, object]]],
    errors: Sequence[Sequence[float | None]] | None = None,
) -> None:
    """Bars of several series side by side for each name, with optional symmetric error bars."""
    positions = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    for index, (label, values, style) in enumerate(series):
        offsets = positions + (index - (len(series) - 1) / 2) * width
        axes.bar(offsets, values, width, label=label, **style)  # type: ignore[arg-type]
        _mark_zeros(axes, list(offsets), values, width, style.get("color", style.get("edgecolor", "black")))
        if errors is not None:
            shown = [(x, y, e) for x, y, e in zip(offsets, values, errors[index], strict=True) if e is not None]
            if shown:
                xs, ys, es = zip(*shown, strict=True)
                axes.errorbar(xs, ys, yerr=es, fmt="none", ecolor="black", capsize=4, linewidth=1)
    axes.set_xticks(positions)
    axes.set_xticklabels(names, rotation=30 if max((len(name) for name in names), default=0) > 6 else 0)


def plot_clients(record: RunRecord, path: str | Path) -> Path:
    """Grouped bars of each client's final exact match and ROUGE-L (own test split; union when measured)."""
    if record.final is None:
        raise ValueError("the run has no final record to plot")
    clients = list(record.final.clients)
    finals = [record.final.clients[name] for name in clients]
    series: list[tuple[str, Sequence[float], dict[str, object]]] = [
        ("exact match (own)", [np.nan if f.own is None else f.own.exact_match for f in finals], {"color": "tab:blue"}),
        ("ROUGE-L (own)", [np.nan if f.own is None else f.own.rouge_l for f in finals], {"color": "tab:orange"}),
    ]
    if any(final.union is not None for final in finals):
        union = [final.union for final in finals]
        series += [
            ("exact match (union)", [np.nan if u is None else u.exact_match for u in union], _hatched("tab:blue")),
            ("ROUGE-L (union)", [np.nan if u is None else u.rouge_l for u in union], _hatched("tab:orange")),
        ]
    figure = _figure(min(16.0, max(5.0, 0.3 * len(clients) * len(series) + 2.5)), 3.8)
    axes = figure.add_subplot()
    _grouped_bars(axes, clients, series)
    axes.set_xlabel("client")
    axes.set_ylabel("score")
    axes.set_ylim(0, 1.05)
    axes.set_title(f"{record.info.name}: final scores per client")
    axes.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return _save(figure, path)


def _hatched(color: str) -> dict[str, object]:
    return {"facecolor": "white", "edgecolor": color, "hatch": "//"}


def plot_rounds(record: RunRecord, path: str | Path) -> Path:
    """Mean evaluation of each round at its number (as in summary.md's table), the final evaluation one further.

    Round r is evaluated before its clients train (round 1: the starting model); the final evaluation
    comes after the last round, so it is drawn at rounds + 1 and labelled "final".
    """
    from matplotlib.ticker import MaxNLocator

    means = record.round_means
    if not means and record.personalized is None:
        raise ValueError("the run has no evaluation to plot")
    numbers = [mean.round for mean in means]
    figure = _figure(9.0, 3.6)
    scores, losses = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    scores.plot(numbers, [mean.scores.rouge_l for mean in means], marker="o", label="ROUGE-L", color="tab:orange")
    scores.plot(numbers, [mean.scores.exact_match for mean in means], marker="o", label="exact match")
    losses.plot(numbers, [mean.scores.loss for mean in means], marker="o", color="tab:red", label="loss")
    final = record.personalized
    if final is not None:
        at = (record.rounds[-1].round if record.rounds else 0) + 1
        scores.scatter([at], [final.rouge_l], marker="*", s=120, color="tab:orange", label="final ROUGE-L")
        scores.scatter([at], [final.exact_match], marker="*", s=120, color="tab:blue", label="final exact match")
        losses.scatter([at], [final.loss], marker="*", s=120, color="tab:red", label="final loss")
        for axes, value in ((scores, max(final.rouge_l, final.exact_match)), (losses, final.loss)):
            axes.annotate(
                "final", (at, value), xytext=(0, 8), textcoords="offset points", ha="center", fontsize="small"
            )
    scores.set_ylim(0, 1.05)
    scores.set_ylabel("mean score over evaluated clients")
    losses.set_ylabel("mean eval loss")
    for axes in (scores, losses):
        axes.set_xlabel("round (evaluated before its training)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    figure.suptitle(f"{record.info.name}: evaluation per round, then the final evaluation")
    return _save(figure, path)


def _unit(largest: float) -> tuple[str, float]:
    for name, factor in (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
        if largest >= factor:
            return name, factor
    return "B", 1.0


def plot_bytes(record: RunRecord, path: str | Path) -> Path:
    """Bytes sent down (server to clients) and up (clients to server) in each round."""
    from matplotlib.ticker import MaxNLocator

    if not record.rounds:
        raise ValueError("the run has no rounds to plot")
    down = [float(item.bytes_down) for item in record.rounds]
    up = [float(item.bytes_up) for item in record.rounds]
    unit, factor = _unit(max([*down, *up]))
    numbers = np.array([item.round for item in record.rounds], dtype=float)
    figure = _figure(min(12.0, max(5.0, 0.35 * len(numbers) + 3)), 3.5)
    axes = figure.add_subplot()
    for offset, values, label, color in ((-0.2, down, "down", "tab:blue"), (0.2, up, "up", "tab:green")):
        scaled = [value / factor for value in values]
        axes.bar(numbers + offset, scaled, 0.4, label=label, color=color)
        _mark_zeros(axes, list(numbers + offset), scaled, 0.4, color)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel(unit)
    axes.set_title(f"{record.info.name}: bytes per round")
    axes.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return _save(figure, path)


def plot_comparison(comparison: Comparison, path: str | Path) -> Path:
    """Mean personalized ROUGE-L and exact match per method, with 95% CI error bars (none for one seed); with a
    reference method, a second panel of its paired differences to every other method, with their intervals."""
    labels = list(comparison.labels)
    keys = ("personalized_rouge_l", "personalized_exact_match")
    estimates = [[comparison.estimate(key, label) for label in labels] for key in keys]
    series: list[tuple[str, Sequence[float], dict[str, object]]] = [
        (
            comparison.metric(key).label,
            [np.nan if item.mean is None else item.mean for item in row],
            {"color": color},
        )
        for key, row, color in zip(keys, estimates, ("tab:orange", "tab:blue"), strict=True)
    ]
    errors = [[item.ci for item in row] for row in estimates]
    width = max(5.0, 1.2 * len(labels) + 2.5)
    figure = _figure(width + (4.5 if comparison.pairs else 0.0), 3.8)
    axes = figure.add_subplot(1, 2 if comparison.pairs else 1, 1)
    _grouped_bars(axes, labels, series, errors)
    seeds = ", ".join(f"{label}: n={len(comparison.runs[label])}" for label in labels)
    axes.set_xlabel(f"method ({seeds})", fontsize="small")
    axes.set_ylabel("personalized score (mean over seeds)")
    axes.set_ylim(0, 1.05)
    axes.set_title("personalized score per method, 95% CI")
    axes.legend(fontsize="small")
    if comparison.pairs:
        _paired_differences(figure.add_subplot(1, 2, 2), comparison, keys)
    return _save(figure, path)


def _paired_differences(axes: Axes, comparison: Comparison, keys: Sequence[str]) -> None:
    """Horizontal intervals of ``reference - other`` per method and metric, a line at 0."""
    others = [other for _, other in comparison.pairs]
    offsets = np.linspace(-0.15, 0.15, len(keys))
    for key, offset, color in zip(keys, offsets, ("tab:orange", "tab:blue"), strict=True):
        items = [comparison.paired(key, first, second) for first, second in comparison.pairs]
        means = [np.nan if item.mean is None else item.mean for item in items]
        spans = [0.0 if item.ci is None else item.ci for item in items]
        positions = np.arange(len(others)) + offset
        axes.errorbar(means, positions, xerr=spans, fmt="o", color=color, capsize=3, label=comparison.metric(key).label)
    axes.axvline(0.0, color="grey", linewidth=1)
    axes.set_yticks(np.arange(len(others)), [f"− {other}" for other in others], fontsize="small")
    axes.invert_yaxis()
    axes.set_xlabel(f"{comparison.reference} − method, per seed (mean, 95% CI)", fontsize="small")
    axes.set_title("paired by seed")
    axes.legend(fontsize="x-small")
