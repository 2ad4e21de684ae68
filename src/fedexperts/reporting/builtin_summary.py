"""The built-in model's main numbers for the terminal (``fedexperts pretrain``), read from its metrics file."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from fedexperts.data.expertbench import CATEGORIES
from fedexperts.models.builtin import METRICS_FILE


def model_summary(path: Path) -> list[RenderableType]:
    """Size, pretraining time and probe accuracy; a table of held-out scores and routing per category."""
    metrics = json.loads((path / METRICS_FILE).read_text())
    head = Text(
        f"{path}\n{metrics['parameters'] / 1e6:.2f}M parameters; pretraining took {metrics['train']['seconds']:.0f} s "
        f"(whole command {metrics['total_seconds']:.0f} s, {metrics['threads']} threads); "
        f"probe accuracy {metrics['probe_accuracy']:.1%} on {metrics['probe_count']} facts "
        f"(chance {metrics['probe_chance']:.0%})"
    )
    table = Table(title="held-out tasks (greedy) and routing per category")
    for column in ("category", "EM canonical", "ROUGE-L canonical", "EM clients", "ROUGE-L clients", "routing entropy"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category in CATEGORIES:
        canonical, clients = metrics["canonical"][category], metrics["client_styles"][category]
        table.add_row(
            category,
            f"{canonical['exact_match']:.2f}",
            f"{canonical['rouge_l']:.2f}",
            f"{clients['exact_match']:.2f}",
            f"{clients['rouge_l']:.2f}",
            f"{metrics['routing_entropy_bits'][category]:.3f} bits",
        )
    routing = Text(
        f"routing: total variation {metrics['routing_between_categories_tv']:.3f} between categories vs "
        f"{metrics['routing_within_category_tv']:.3f} within a category (split halves); card: {path / 'README.md'}"
    )
    return [head, table, routing]
