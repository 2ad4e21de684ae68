"""FedMoE's table layout: one score per task type, total communication and the memory a client's model holds.

FedMoE (arXiv 2408.11304) reports, per method, each task type's own score (AG News accuracy, SQuAD F1, XSum
ROUGE-2), the communication of the whole training in GB and a client's memory in GB. The per-task score of a run
is the mean over the clients whose majority category is that task (``RunInfo.groups``) of their final model's
score on their own test rows; communication is the run's exact wire bytes, down and up, summed over every round;
memory is the mean over every client step of the weights its model held (``ClientRound.model_bytes``: a FedMoE
sub-MoE's when the client loads only that, the whole model's otherwise). GB are 10^9 bytes, as the paper writes.

The paper's own numbers are not transcribed here: the stored copy of the paper holds its opening only, so the
table leaves their column to the reader rather than guess (docs/RESULTS.md says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

from fedexperts.atomic import atomic_file
from fedexperts.reporting import format as fmt
from fedexperts.reporting.compare import Comparison, Metric, estimate_cell
from fedexperts.reporting.runs import RunRecord

PAPER_TABLE_FILE = "paper_table.md"
GB = 1e9
_SCORE_NAMES = {"accuracy": "accuracy", "token_f1": "F1", "rouge_2": "ROUGE-2", "rouge_l": "ROUGE-L"}


def task_score(category: str, score: str) -> Callable[[RunRecord], float | None]:
    """The mean ``score`` of the final models of the clients whose group is ``category`` (``None``: none scored)."""

    def value(run: RunRecord) -> float | None:
        groups = run.info.groups
        if run.final is None or groups is None:
            return None
        own = [client.own for cid, client in run.final.clients.items() if groups.get(cid) == category]
        scored = [scores for scores in own if scores is not None]
        values = [float(value) for value in (getattr(scores, score) for scores in scored) if value is not None]
        return math.fsum(values) / len(values) if values else None

    return value


def total_traffic(run: RunRecord) -> float | None:
    """Exact wire bytes of the whole run, both directions, every round (``None``: no round completed)."""
    return math.fsum(record.bytes_down + record.bytes_up for record in run.rounds) if run.rounds else None


def client_model_bytes(run: RunRecord) -> float | None:
    """Mean over client steps of the bytes their model held (``None``: no client reported it)."""
    reported = (part.model_bytes for record in run.rounds for part in record.clients.values())
    values = [value for value in reported if value is not None]
    return math.fsum(values) / len(values) if values else None


def _gigabytes(value: float) -> str:
    """Three significant figures: the built-in models' clients hold a few MB, the paper's a few GB."""
    return f"{value / GB:.3g}"


def paper_metrics(tasks: Mapping[str, str]) -> tuple[Metric, ...]:
    """The metrics of FedMoE's table: one per task (category -> score name), communication and memory."""
    per_task = tuple(
        Metric(
            f"task_{category}_{score}",
            f"{category} {_SCORE_NAMES.get(score, score)}",
            True,
            task_score(category, score),
            fmt.score,
            optional=True,
        )
        for category, score in tasks.items()
    )
    return (
        *per_task,
        Metric("total_traffic_gb", "communication, whole run (GB)", False, total_traffic, _gigabytes),
        Metric("client_model_gb", "client model memory (GB)", False, client_model_bytes, _gigabytes, optional=True),
    )


def paper_table_markdown(comparison: Comparison, tasks: Mapping[str, str]) -> str:
    """``paper_table.md``: methods as rows, FedMoE's columns, mean ± 95% CI over seeds (the comparison's estimates)."""
    metrics = [metric for metric in paper_metrics(tasks) if metric.key in comparison.estimates]
    lines = [
        "# In the FedMoE paper's layout",
        "",
        "Mean over seeds ± half-width of the 95% t-interval. Per task: the mean over that task's clients of their "
        "final model on their own test rows. Communication: wire bytes of the whole run, down and up. Memory: the "
        "weights a client's model held, mean over client steps. GB = 10^9 bytes. The paper's numbers are not "
        "transcribed (see docs/RESULTS.md).",
        "",
        "| method | seeds | " + " | ".join(fmt.markdown_cell(metric.label) for metric in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for label in comparison.labels:
        cells = [estimate_cell(comparison, metric, label) for metric in metrics]
        seeds = len(comparison.runs[label])
        lines.append(f"| {fmt.markdown_cell(label)} | {seeds} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def write_paper_table(out_dir: str | Path, comparison: Comparison, tasks: Mapping[str, str]) -> Path:
    """Write ``paper_table.md`` into ``out_dir`` atomically."""
    path = Path(out_dir) / PAPER_TABLE_FILE
    with atomic_file(path) as staging:
        staging.write_text(paper_table_markdown(comparison, tasks), encoding="utf-8")
    return path
