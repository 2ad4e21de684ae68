"""One run's report: ``summary.md`` with its plots in the run directory, and a rich table for the terminal."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table
from rich.text import Text

from fedexperts.atomic import atomic_file
from fedexperts.reporting import format as fmt
from fedexperts.reporting.plots import plot_bytes, plot_clients, plot_rounds
from fedexperts.reporting.runs import MeanScores, RunRecord, load_run
from fedexperts.reporting.schema import Scores
from fedexperts.runfiles import tracked_writes

SUMMARY_FILE = "summary.md"
CLIENTS_PLOT = "plot_clients.png"
ROUNDS_PLOT = "plot_rounds.png"
BYTES_PLOT = "plot_bytes.png"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "---:") -> list[str]:
    """A Markdown table whose first column is left-aligned and the others as ``align``."""
    return [_row(header), "|---|" + f"{align}|" * (len(header) - 1), *(_row(row) for row in rows)]


def _scores(scores: Scores | MeanScores | None) -> list[str]:
    if scores is None:
        return [fmt.MISSING] * 3
    return [fmt.score(scores.exact_match), fmt.score(scores.rouge_l), fmt.score(scores.loss)]


_MORE_SCORES = (("ROUGE-1", "rouge_1"), ("ROUGE-2", "rouge_2"), ("token F1", "token_f1"), ("accuracy", "accuracy"))
"""Shown after the headline's ROUGE-L and exact match when the run measured them."""


def _headline(scores: MeanScores | None) -> str:
    if scores is None:
        return fmt.MISSING
    parts = [f"ROUGE-L {fmt.score(scores.rouge_l)}", f"exact match {fmt.score(scores.exact_match)}"]
    parts += [
        f"{label} {fmt.score(value)}" for label, key in _MORE_SCORES if (value := getattr(scores, key)) is not None
    ]
    return f"{', '.join(parts)} ({scores.count} clients)"


def _what_ran(record: RunRecord) -> list[str]:
    info = record.info
    parameters = info.parameters
    trainable = f" = {parameters.trainable / parameters.total:.2%}" if parameters.total else ""
    if record.finished:
        state = f"finished: {len(record.rounds)} of {info.rounds} rounds and the final evaluation"
    else:
        state = f"**incomplete**: {len(record.rounds)} of {info.rounds} rounds, no final record"
    return [
        f"- algorithm: `{info.algorithm}`, model: `{info.model}`, seed: {info.seed}",
        f"- clients: {len(info.clients)} ({', '.join(info.clients)})",
        f"- state: {state}",
        f"- parameters: total {fmt.count(parameters.total)}, trainable {fmt.count(parameters.trainable)}{trainable}"
        f" (shared {fmt.count(parameters.shared)}, personal {fmt.count(parameters.personal)}),"
        f" frozen {fmt.count(parameters.frozen)}",
        f"- run directory: `{record.directory}`",
        *_privacy_line(record),
    ]


def _privacy_line(record: RunRecord) -> list[str]:
    """The privacy spent after the last completed round, in runs with ``privacy.clip`` (docs/privacy.md)."""
    spent = record.rounds[-1].privacy if record.rounds else None
    if spent is None:
        return []
    return [
        f"- differential privacy ({spent.mode}, client-level): epsilon {spent.epsilon:.4g} at delta {spent.delta:g}"
        f" after {spent.releases} rounds (clip {spent.clip:g}, noise multiplier {spent.noise_multiplier:g},"
        f" {spent.sampled} of {spent.population} clients a round; Flower's RDP accountant)"
    ]


def _final_section(record: RunRecord) -> list[str]:
    lines = ["## Final scores per client", ""]
    if record.final is None:
        return [*lines, "No final record: the run did not finish.", ""]
    header = ["client", "own EM", "own ROUGE-L", "own loss", "own examples", "union EM", "union ROUGE-L", "probes"]
    rows = []
    for client, final in record.final.clients.items():
        union = _scores(final.union)[:2]
        own = _scores(final.own)
        rows.append(
            [
                fmt.markdown_cell(client),
                *own,
                fmt.count(None if final.own is None else final.own.examples),
                *union,
                fmt.score(final.probes),
            ]
        )
    union_mean = _scores(record.union)[:2]
    rows.append(["**mean**", *_scores(record.personalized), "", *union_mean, fmt.score(record.probes)])
    if record.mmlu is not None:  # runs with eval.mmlu: its overall accuracy beside the probes
        header.append("MMLU")
        for row, final in zip(rows, record.final.clients.values(), strict=False):
            row.append(fmt.score(None if final.mmlu is None else final.mmlu.overall))
        rows[-1].append(fmt.score(record.mmlu))
    lines += _table(header, rows)
    missing = [client for client in record.info.clients if client not in record.final.clients]
    if missing:
        lines += ["", f"Clients without a final record: {', '.join(missing)}."]
    lines += [
        "",
        "- personalized score (mean over clients of each final model on its own test split): "
        + _headline(record.personalized),
        "- union score (mean over clients, union test set): " + _headline(record.union),
        "- probe accuracy (mean over clients): "
        + (fmt.score(record.probes) if record.probes is not None else "– (no probes)"),
    ]
    if record.mmlu is not None:
        subjects = record.mmlu_subjects
        lines += [
            f"- MMLU accuracy (mean over clients; zero-shot, {len(subjects)} subjects): {fmt.score(record.mmlu)}",
            "",
            "MMLU accuracy per subject (mean over clients):",
            "",
            *_table(["subject", "accuracy"], [[fmt.markdown_cell(name), fmt.score(v)] for name, v in subjects.items()]),
        ]
    return [*lines, ""]


def _rounds_section(record: RunRecord) -> list[str]:
    lines = [
        "## Rounds",
        "",
        "Each round's evaluation is measured before the clients train in it, so round r scores the model "
        "after r − 1 completed rounds (round 1: the starting model). Means are over the clients evaluated "
        "in the round.",
        "",
    ]
    if not record.rounds:
        return [*lines, "No round completed.", ""]
    means = {mean.round: mean.scores for mean in record.round_means}
    header = ["round", "sampled", "ok", "failed", "rejected", "evaluated", "mean EM", "mean ROUGE-L", "mean loss"]
    header += ["bytes down", "bytes up", "seconds"]
    rows = []
    for item in record.rounds:
        statuses = Counter(part.status for part in item.clients.values())
        scores = means.get(item.round)
        rows.append(
            [
                str(item.round),
                str(len(item.sampled)),
                *(str(statuses[name]) for name in ("ok", "failed", "rejected")),
                str(0 if scores is None else scores.count),
                *_scores(scores),
                fmt.size(item.bytes_down),
                fmt.size(item.bytes_up),
                fmt.seconds(item.seconds.round),
            ]
        )
    lines += _table(header, rows)
    target = record.rounds_to_90
    if target is not None:
        best = max(record.round_means, key=lambda mean: mean.scores.rouge_l)
        lines += [
            "",
            f"Rounds to 90% of the best: round {target} (the model after {target - 1} completed rounds) is the first "
            f"whose mean eval ROUGE-L is at least 0.9 × the best round's ({fmt.score(best.scores.rouge_l)}, "
            f"round {best.round}).",
        ]
    elif record.round_means:
        lines += ["", "Rounds to 90% of the best: undefined, as no round's mean eval ROUGE-L is above 0."]
    return [*lines, ""]


def _traffic_section(record: RunRecord) -> list[str]:
    lines = ["## Communication and memory", ""]
    per_round, per_client = record.bytes_per_round, record.bytes_per_client_round
    if per_round is not None:
        lines.append(
            f"- bytes per round (mean of round totals): down {fmt.size(per_round.down)}, up {fmt.size(per_round.up)},"
            f" total {fmt.size(per_round.total)}"
        )
    if per_client is not None:
        lines.append(
            f"- bytes per client per round (round totals over sampled clients, mean over rounds): "
            f"down {fmt.size(per_client.down)}, up {fmt.size(per_client.up)}, total {fmt.size(per_client.total)}"
        )
    if record.rounds:
        down = sum(item.bytes_down for item in record.rounds)
        up = sum(item.bytes_up for item in record.rounds)
        lines.append(f"- whole run: down {fmt.size(down)}, up {fmt.size(up)}")
    peak = record.peak_memory
    if peak is not None:
        where = f"client {peak.client}, round {peak.round}"
        lines.append(f"- peak memory (max over clients and rounds): {fmt.size(peak.bytes)} ({where})")
    if len(lines) == 2:
        lines.append("No round completed.")
    return [*lines, ""]


def _time_section(record: RunRecord) -> list[str]:
    split = record.time_split
    rows = [
        [name, fmt.seconds(value), fmt.percent(split.share(value))]
        for name, value in (
            ("train", split.train),
            ("eval", split.eval),
            ("aggregate", split.aggregate),
            ("overhead", split.overhead),
            ("**rounds**", split.round),
        )
    ]
    rows.append(["final evaluation", fmt.seconds(split.final), ""])
    rows.append(["**run**", fmt.seconds(split.total), ""])
    lines = ["## Time", "", "Round-level seconds summed over rounds; percentages are of the rounds' time.", ""]
    return [*lines, *_table(["part", "seconds", "% of rounds"], rows), ""]


def _failures_section(record: RunRecord) -> list[str]:
    lines = ["## Failures and rejections", ""]
    failures = record.failures
    if not failures:
        return [*lines, "None.", ""]
    for failure in failures:
        message = "(no message)" if failure.error is None else " ".join(failure.error.split())
        where = "final evaluation" if failure.round is None else f"round {failure.round}"
        lines.append(f"- {where}: client {failure.client} {failure.status}: {message}")
    return [*lines, ""]


def _config_section(record: RunRecord) -> list[str]:
    if record.config_text is None:
        return []
    longest = max((len(run) for run in re.findall(r"`+", record.config_text)), default=0)
    fence = "`" * max(3, longest + 1)
    return ["## Config", "", f"{fence}toml", record.config_text.rstrip("\n"), fence, ""]


def report_markdown(record: RunRecord, plots: Sequence[str] = ()) -> str:
    """The text of ``summary.md``; ``plots`` are file names (beside it) to embed at the end."""
    lines = [f"# Run report: {record.info.name}", "", *_what_ran(record), ""]
    lines += _final_section(record)
    lines += _rounds_section(record)
    lines += _traffic_section(record)
    lines += _time_section(record)
    lines += _failures_section(record)
    if plots:
        lines += ["## Plots", "", *(f"![{Path(name).stem}]({name})" for name in plots), ""]
    lines += _config_section(record)
    return "\n".join(lines)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``summary.md`` and the plots the run has data for; return the written paths, summary first.

    Files go to ``out_dir`` (default: the run directory), each written beside its target and
    renamed into place, so a reader never sees half a report. An unfinished run gets no client
    plot, and a run without rounds no round or bytes plot.
    """
    record = load_run(run_dir)
    folder = Path(run_dir if out_dir is None else out_dir)
    chosen = [
        (plot, folder / name)
        for plot, name, wanted in (
            (plot_clients, CLIENTS_PLOT, record.final is not None),
            (plot_rounds, ROUNDS_PLOT, bool(record.round_means) or record.personalized is not None),
            (plot_bytes, BYTES_PLOT, bool(record.rounds)),
        )
        if wanted
    ]
    summary = folder / SUMMARY_FILE
    with tracked_writes(folder, summary, *(path for _plot, path in chosen)):
        plots = [plot(record, path) for plot, path in chosen]
        with atomic_file(summary) as staging:
            staging.write_text(report_markdown(record, [path.name for path in plots]), encoding="utf-8")
    return [summary, *plots]


def final_table(record: RunRecord) -> Table:
    """Per-client final scores (own test split, union, probes) and a bold mean row, for the terminal."""
    table = Table(title=f"{record.info.name}: final scores ({record.info.algorithm}, seed {record.info.seed})")
    for name in ("client", "own EM", "own ROUGE-L", "own loss", "union EM", "union ROUGE-L", "probes"):
        table.add_column(name, justify="left" if name == "client" else "right")
    if record.final is None:
        table.caption = f"no final record: {len(record.rounds)} of {record.info.rounds} rounds completed"
        return table
    for client, final in record.final.clients.items():
        table.add_row(Text(client), *_scores(final.own), *_scores(final.union)[:2], fmt.score(final.probes))
    table.add_section()
    union = _scores(record.union)[:2]
    table.add_row("mean", *_scores(record.personalized), *union, fmt.score(record.probes), style="bold")
    return table
