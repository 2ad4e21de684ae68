"""Number formatting shared by the Markdown reports and the terminal tables, so both read the same."""

from __future__ import annotations

import math

MISSING = "–"


def score(value: float | None) -> str:
    """A score in [0, 1] (or a loss) with four decimals."""
    return MISSING if value is None else f"{value:.4f}"


def count(value: float | None) -> str:
    """An integer-like value with thousands separators (means of counts keep one decimal)."""
    if value is None:
        return MISSING
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def size(value: float | None) -> str:
    """Bytes in binary units (KiB, MiB, ...) with three significant figures."""
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return str(value)
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    magnitude = abs(value)
    index = 0
    while magnitude >= 1024 and index < len(units) - 1:
        magnitude /= 1024
        index += 1
    if index == 0:
        return f"{value:,.0f} B" if float(value).is_integer() else f"{value:,.1f} B"
    return f"{math.copysign(magnitude, value):.3g} {units[index]}"


def seconds(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.2f}"


def percent(share: float | None) -> str:
    return MISSING if share is None else f"{100 * share:.1f}%"


def markdown_cell(text: str) -> str:
    """One Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")
