"""Read a run directory (``config.toml`` and ``metrics.jsonl``) into typed records, and derive its numbers.

``metrics.jsonl`` holds one JSON object per line: a ``run`` record first, one ``round`` record per
completed round (round numbers strictly increasing), and a ``final`` record when the run finished.
Each line is read through :mod:`fedexperts.reporting.schema`, the models the server writes; every
mistake is reported as a :class:`RunFileError` naming the file, the line and the dotted key (never
the data), so a schema drift between the runtime and the reports shows up as one readable line.

Conventions for the derived numbers (each client weighs the same in every mean):

* a round's ``eval`` is measured before that client trains in the round, so the mean evaluation of
  round ``r`` scores the federation's model after ``r - 1`` completed rounds (round 1: the start);
* per-round means are over the clients that have an ``eval`` in that round, whatever their status;
* bytes per round are the means over rounds of the round totals; bytes per client per round divide
  each round's totals by the number of clients sampled in it, then take the mean over rounds;
* :meth:`RunRecord.rounds_to_fraction` returns the round *number* ``r`` (not ``r - 1``), and
  ``None`` when every round's mean ROUGE-L is 0 (or no round was evaluated).

Which keys may be absent, and how numbers are accepted: see the schema module. Unknown keys are errors.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from fedexperts.errors import FedExpertsError
from fedexperts.reporting.schema import (
    CONFIG_FILE,
    METRICS_FILE,
    FinalRecord,
    RecordError,
    RoundRecord,
    RunInfo,
    Scores,
    Status,
    kind_of,
    parse_record,
)


class RunFileError(FedExpertsError):
    """A run directory whose files are missing, unreadable, or do not fit the metrics schema."""

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = str(path) if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class MeanScores:
    """Scores averaged over ``count`` clients, each client weighing the same."""

    loss: float
    exact_match: float
    rouge_l: float
    count: int
    rouge_1: float | None = None
    """The optional scores are ``None`` unless every averaged client measured them (older runs did not)."""
    rouge_2: float | None = None
    token_f1: float | None = None
    accuracy: float | None = None


@dataclass(frozen=True)
class Traffic:
    """Bytes sent by the server (down) and by the clients (up)."""

    down: float
    up: float

    @property
    def total(self) -> float:
        return self.down + self.up


@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    client: str
    round: int


@dataclass(frozen=True)
class TimeSplit:
    """Seconds summed over the completed rounds, plus the final evaluation."""

    round: float
    train: float
    eval: float
    aggregate: float
    overhead: float
    final: float | None
    """The final evaluation (``None`` when the run did not finish)."""
    setup: float = 0.0
    """Clients' setup seconds summed over clients and rounds (inside ``overhead``, not ``train`` or ``eval``)."""

    @property
    def total(self) -> float:
        """Wall time of the rounds and the final evaluation together."""
        return self.round + (self.final or 0.0)

    def share(self, seconds: float) -> float | None:
        """``seconds`` as a fraction of the rounds' time (``None`` when no time was recorded)."""
        return seconds / self.round if self.round > 0 else None


@dataclass(frozen=True)
class Failure:
    """A client whose status was not ``ok`` in a round, or in the final evaluation (``round`` is ``None``)."""

    round: int | None
    client: str
    status: Status
    error: str | None


@dataclass(frozen=True)
class RoundMean:
    round: int
    scores: MeanScores
    """Mean over the clients evaluated in this round: the model after ``round - 1`` rounds."""


def mean_scores(scores: Iterable[Scores]) -> MeanScores | None:
    """Unweighted mean over clients (``None`` for no clients), so small clients count as much as big ones."""
    chosen = list(scores)
    if not chosen:
        return None
    count = len(chosen)

    def mean(name: str) -> float | None:
        values = [getattr(score, name) for score in chosen]
        return None if any(value is None for value in values) else math.fsum(values) / count

    return MeanScores(
        loss=math.fsum(score.loss for score in chosen) / count,
        exact_match=math.fsum(score.exact_match for score in chosen) / count,
        rouge_l=math.fsum(score.rouge_l for score in chosen) / count,
        count=count,
        rouge_1=mean("rouge_1"),
        rouge_2=mean("rouge_2"),
        token_f1=mean("token_f1"),
        accuracy=mean("accuracy"),
    )


def first_reaching(curve: Sequence[tuple[int, float]], fraction: float) -> int | None:
    """The first ``x`` whose value is ``>= fraction * max(values)``.

    ``None`` for an empty curve, and when the best value is not positive (or NaN): a fraction of
    nothing is reached at once, which would read as the fastest possible progress.
    """
    best = max((value for _, value in curve), default=math.nan)
    if not best > 0:
        return None
    return next(x for x, value in curve if value >= fraction * best)


@dataclass(frozen=True)
class RunRecord:
    """A loaded run directory and the numbers derived from it."""

    directory: Path
    info: RunInfo
    rounds: tuple[RoundRecord, ...]
    final: FinalRecord | None
    """``None`` when the run has not finished (or was interrupted)."""
    config: dict[str, Any] | None
    """The parsed ``config.toml`` (``None`` when the directory has none)."""
    config_text: str | None

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def personalized(self) -> MeanScores | None:
        """Mean over clients of each final model on its own client's test split (clients without one left out)."""
        if self.final is None:
            return None
        return mean_scores(client.own for client in self.final.clients.values() if client.own is not None)

    @property
    def union(self) -> MeanScores | None:
        """Mean over clients of each final model on the union test set (clients without one left out)."""
        if self.final is None:
            return None
        return mean_scores(client.union for client in self.final.clients.values() if client.union is not None)

    @property
    def probes(self) -> float | None:
        """Mean knowledge-probe accuracy of the final models (``None`` when the data has no probes)."""
        if self.final is None:
            return None
        values = [client.probes for client in self.final.clients.values() if client.probes is not None]
        return math.fsum(values) / len(values) if values else None

    @property
    def mmlu(self) -> float | None:
        """Mean over clients of the final models' overall MMLU accuracy (``None`` without ``eval.mmlu``)."""
        if self.final is None:
            return None
        values = [client.mmlu.overall for client in self.final.clients.values() if client.mmlu is not None]
        return math.fsum(values) / len(values) if values else None

    @property
    def mmlu_subjects(self) -> dict[str, float]:
        """Per MMLU subject, the mean over the clients that scored it (empty without ``eval.mmlu``)."""
        scored: dict[str, list[float]] = {}
        for client in self.final.clients.values() if self.final is not None else ():
            for subject, value in (client.mmlu.subjects if client.mmlu is not None else {}).items():
                scored.setdefault(subject, []).append(value)
        return {subject: math.fsum(values) / len(values) for subject, values in sorted(scored.items())}

    @property
    def bytes_per_round(self) -> Traffic | None:
        """Mean over rounds of the round totals."""
        if not self.rounds:
            return None
        count = len(self.rounds)
        return Traffic(
            down=math.fsum(record.bytes_down for record in self.rounds) / count,
            up=math.fsum(record.bytes_up for record in self.rounds) / count,
        )

    @property
    def bytes_per_client_round(self) -> Traffic | None:
        """Mean over rounds of (round total / clients sampled in it); rounds sampling nobody are left out."""
        rounds = [record for record in self.rounds if record.sampled]
        if not rounds:
            return None
        return Traffic(
            down=math.fsum(record.bytes_down / len(record.sampled) for record in rounds) / len(rounds),
            up=math.fsum(record.bytes_up / len(record.sampled) for record in rounds) / len(rounds),
        )

    @property
    def peak_memory(self) -> PeakMemory | None:
        """The largest ``peak_memory_bytes`` of any client in any round (first one on ties; unreported ones skipped)."""
        best: PeakMemory | None = None
        for record in self.rounds:
            for client, part in record.clients.items():
                if part.peak_memory_bytes is not None and (best is None or part.peak_memory_bytes > best.bytes):
                    best = PeakMemory(part.peak_memory_bytes, client, record.round)
        return best

    @property
    def peak_memory_bytes(self) -> int | None:
        peak = self.peak_memory
        return None if peak is None else peak.bytes

    @property
    def time_split(self) -> TimeSplit:
        """Round-level seconds summed over rounds, and the final evaluation's seconds."""
        return TimeSplit(
            round=math.fsum(record.seconds.round for record in self.rounds),
            train=math.fsum(record.seconds.train for record in self.rounds),
            eval=math.fsum(record.seconds.eval for record in self.rounds),
            aggregate=math.fsum(record.seconds.aggregate for record in self.rounds),
            overhead=math.fsum(record.seconds.overhead for record in self.rounds),
            final=None if self.final is None else self.final.seconds,
            setup=math.fsum(part.seconds.setup for record in self.rounds for part in record.clients.values()),
        )

    @property
    def round_means(self) -> tuple[RoundMean, ...]:
        """Per round, the mean evaluation over the clients evaluated in it (rounds with none are skipped)."""
        means = []
        for record in self.rounds:
            scores = mean_scores(part.eval for part in record.clients.values() if part.eval is not None)
            if scores is not None:
                means.append(RoundMean(record.round, scores))
        return tuple(means)

    def rounds_to_fraction(self, fraction: float = 0.9) -> int | None:
        """The first round number ``r`` whose mean eval ROUGE-L is ``>= fraction *`` the best round's.

        Only round records count (not the final record). Because evaluation precedes training,
        ``r`` means the model after ``r - 1`` completed rounds reached the mark: 1 is the starting
        model. ``None`` when no round has an evaluation or the best mean is 0.
        """
        return first_reaching([(mean.round, mean.scores.rouge_l) for mean in self.round_means], fraction)

    @property
    def rounds_to_90(self) -> int | None:
        """:meth:`rounds_to_fraction` at 0.9."""
        return self.rounds_to_fraction(0.9)

    @property
    def failures(self) -> tuple[Failure, ...]:
        """Every client whose status was ``failed`` or ``rejected``: rounds in order, then the final evaluation."""
        found = [
            Failure(record.round, client, part.status, part.error)
            for record in self.rounds
            for client, part in record.clients.items()
            if part.status != "ok"
        ]
        if self.final is not None:
            found += [
                Failure(None, client, part.status, part.error)
                for client, part in self.final.clients.items()
                if part.status != "ok"
            ]
        return tuple(found)


def _unknown(record: RoundRecord | FinalRecord, known: frozenset[str]) -> str | None:
    """The complaint about clients a record names that the run line does not list, if any."""
    listed = [("sampled", record.sampled)] if isinstance(record, RoundRecord) else []
    for key, names in [*listed, ("clients", tuple(record.clients))]:
        unknown = [name for name in names if name not in known]
        if unknown:
            return f"key {key!r} names clients not in the run line: {', '.join(map(repr, unknown))}"
    return None


def read_metrics(path: str | Path) -> tuple[RunInfo, tuple[RoundRecord, ...], FinalRecord | None]:
    """Parse ``metrics.jsonl``: the run line, the completed rounds, and the final line if any."""
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RunFileError(source, f"missing: a run directory needs a {METRICS_FILE}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFileError(source, f"cannot read: {error}") from error
    info: RunInfo | None = None
    rounds: list[RoundRecord] = []
    final: FinalRecord | None = None
    known: frozenset[str] = frozenset()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue

        def fail(message: str, number: int = number) -> NoReturn:
            raise RunFileError(source, message, number)

        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            fail(f"bad JSON: {error.msg} (column {error.colno})")
        if not isinstance(data, dict):
            fail(f"the record must be a JSON object, got {kind_of(data)}")
        kind = data.get("kind")
        if info is None and isinstance(kind, str) and kind != "run":
            fail(f"no run line: the first record must have kind 'run', got {kind!r}")
        if final is not None:
            fail(f"a {kind!r} record after the final record")
        try:
            record = parse_record(data)
        except RecordError as error:
            fail(str(error))
        if isinstance(record, RunInfo):
            if info is not None:
                fail("a second run record")
            info, known = record, frozenset(record.clients)
            continue
        if info is None:
            fail("no run line: the first record must have kind 'run'")
        problem = _unknown(record, known)
        if problem is not None:
            fail(problem)
        if isinstance(record, FinalRecord):
            final = record
        elif rounds and record.round <= rounds[-1].round:
            fail(f"round {record.round} comes after round {rounds[-1].round}; rounds must increase")
        else:
            rounds.append(record)
    if info is None:
        raise RunFileError(source, "no run line: the file has no records")
    return info, tuple(rounds), final


def load_run(run_dir: str | Path) -> RunRecord:
    """Load a run directory: ``metrics.jsonl`` (required) and ``config.toml`` (read when present)."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise RunFileError(directory, "not a run directory (no such folder)")
    info, rounds, final = read_metrics(directory / METRICS_FILE)
    config_path = directory / CONFIG_FILE
    config: dict[str, Any] | None = None
    config_text: str | None = None
    if config_path.exists():
        try:
            config_text = config_path.read_text(encoding="utf-8")
            config = tomllib.loads(config_text)
        except (OSError, UnicodeDecodeError) as error:
            raise RunFileError(config_path, f"cannot read: {error}") from error
        except tomllib.TOMLDecodeError as error:
            line = getattr(error, "lineno", None)
            raise RunFileError(config_path, f"bad TOML: {getattr(error, 'msg', error)}", line) from None
    return RunRecord(directory, info, rounds, final, config, config_text)
