"""Read a run directory (``config.toml`` and ``metrics.jsonl``) into typed records, and derive its numbers.

``metrics.jsonl`` holds one JSON object per line: a ``run`` record first, one ``round`` record per
completed round (round numbers strictly increasing), and a ``final`` record when the run finished.
Every mistake is reported as a :class:`RunFileError` naming the file, the line and the dotted key,
so a schema drift between the runtime and the reports shows up as one readable line.

Conventions for the derived numbers (each client weighs the same in every mean):

* a round's ``eval`` is measured before that client trains in the round, so the mean evaluation of
  round ``r`` scores the federation's model after ``r - 1`` completed rounds (round 1: the start);
* per-round means are over the clients that have an ``eval`` in that round, whatever their status;
* bytes per round are the means over rounds of the round totals; bytes per client per round divide
  each round's totals by the number of clients sampled in it, then take the mean over rounds;
* :meth:`RunRecord.rounds_to_fraction` returns the round *number* ``r`` (not ``r - 1``), and
  ``None`` when every round's mean ROUGE-L is 0 (or no round was evaluated).

Nullable fields (``error``, ``train_loss``, ``eval``, ``peak_memory_bytes``, ``union``, ``probes``,
a final client's ``own``) may also be absent, as for a client that failed before reporting them;
every other key is required. Integer fields accept integral floats (``10.0``). Unknown keys are ignored.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

from fedexperts.errors import FedExpertsError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
Status = Literal["ok", "failed", "rejected"]
STATUSES: tuple[Status, ...] = ("ok", "failed", "rejected")


class RunFileError(FedExpertsError):
    """A run directory whose files are missing, unreadable, or do not fit the metrics schema."""

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = str(path) if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Parameters:
    total: int
    trainable: int
    shared: int
    personal: int
    frozen: int


@dataclass(frozen=True)
class RunInfo:
    """The ``run`` line: what was run."""

    name: str
    algorithm: str
    seed: int
    clients: tuple[str, ...]
    rounds: int
    """Rounds planned (``RunRecord.rounds`` holds the ones completed)."""
    model: str
    parameters: Parameters


@dataclass(frozen=True)
class Scores:
    """One client's evaluation on one test set."""

    loss: float
    exact_match: float
    rouge_l: float
    examples: int


@dataclass(frozen=True)
class ClientSeconds:
    train: float
    eval: float
    total: float


@dataclass(frozen=True)
class ClientRound:
    """One client's part in one round."""

    status: Status
    error: str | None
    examples: int
    train_loss: float | None
    eval: Scores | None
    """Measured before the client trained in this round."""
    bytes_down: int
    bytes_up: int
    peak_memory_bytes: int | None
    """``None`` when the client did not report it (e.g. it failed)."""
    seconds: ClientSeconds


@dataclass(frozen=True)
class RoundSeconds:
    round: float
    train: float
    eval: float
    aggregate: float
    overhead: float


@dataclass(frozen=True)
class RoundRecord:
    round: int
    """1-based."""
    sampled: tuple[str, ...]
    clients: dict[str, ClientRound]
    bytes_down: int
    bytes_up: int
    seconds: RoundSeconds


@dataclass(frozen=True)
class ClientFinal:
    own: Scores | None
    """``None`` when the client's final evaluation failed."""
    union: Scores | None
    probes: float | None
    status: Status = "ok"
    error: str | None = None


@dataclass(frozen=True)
class FinalRecord:
    clients: dict[str, ClientFinal]
    seconds: float


@dataclass(frozen=True)
class MeanScores:
    """Scores averaged over ``count`` clients, each client weighing the same."""

    loss: float
    exact_match: float
    rouge_l: float
    count: int


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
    return MeanScores(
        loss=math.fsum(score.loss for score in chosen) / count,
        exact_match=math.fsum(score.exact_match for score in chosen) / count,
        rouge_l=math.fsum(score.rouge_l for score in chosen) / count,
        count=count,
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


class _Fields:
    """Typed access to one JSON object, naming the file, line and dotted key on every mistake."""

    def __init__(self, data: object, path: Path, line: int, where: str) -> None:
        self.path = path
        self.line = line
        self.where = where
        if not isinstance(data, dict):
            self.fail(f"{self.describe()} must be a JSON object, got {_kind(data)}")
        self.data: dict[str, Any] = cast(dict[str, Any], data)

    def describe(self, key: str | None = None) -> str:
        dotted = ".".join(part for part in (self.where, key) if part)
        return f"key {dotted!r}" if dotted else "the record"

    def fail(self, message: str) -> NoReturn:
        raise RunFileError(self.path, message, self.line)

    def get(self, key: str) -> Any:
        if key not in self.data:
            where = f" in {self.describe()}" if self.where else ""
            self.fail(f"missing key {key!r}{where}")
        return self.data[key]

    def integer(self, key: str) -> int:
        value = self.get(key)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{self.describe(key)} must be an integer, got {_kind(value)}")
        return value

    def optional_integer(self, key: str) -> int | None:
        return None if self.data.get(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"{self.describe(key)} must be a number, got {_kind(value)}")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self.data.get(key) is None else self.number(key)

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            self.fail(f"{self.describe(key)} must be a string, got {_kind(value)}")
        return value

    def optional_text(self, key: str) -> str | None:
        return None if self.data.get(key) is None else self.text(key)

    def ids(self, key: str) -> tuple[str, ...]:
        """A list of client ids; integers are accepted and turned into the strings JSON keys use."""
        value = self.get(key)
        if not isinstance(value, list) or not all(
            isinstance(item, str | int) and not isinstance(item, bool) for item in value
        ):
            self.fail(f"{self.describe(key)} must be a list of client ids, got {_kind(value)}")
        return tuple(str(item) for item in value)

    def child(self, key: str) -> _Fields:
        return _Fields(self.get(key), self.path, self.line, ".".join(part for part in (self.where, key) if part))

    def optional_child(self, key: str) -> _Fields | None:
        return None if self.data.get(key) is None else self.child(key)

    def children(self, key: str) -> dict[str, _Fields]:
        """A JSON object of client id to object."""
        table = self.child(key)
        return {name: table.child(name) for name in table.data}


def _kind(value: object) -> str:
    if value is None:
        return "null"
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }
    return names.get(type(value), type(value).__name__)


def _scores(fields: _Fields) -> Scores:
    return Scores(
        loss=fields.number("loss"),
        exact_match=fields.number("exact_match"),
        rouge_l=fields.number("rouge_l"),
        examples=fields.integer("examples"),
    )


def _run_info(fields: _Fields) -> RunInfo:
    parameters = fields.child("parameters")
    info = RunInfo(
        name=fields.text("name"),
        algorithm=fields.text("algorithm"),
        seed=fields.integer("seed"),
        clients=fields.ids("clients"),
        rounds=fields.integer("rounds"),
        model=fields.text("model"),
        parameters=Parameters(
            total=parameters.integer("total"),
            trainable=parameters.integer("trainable"),
            shared=parameters.integer("shared"),
            personal=parameters.integer("personal"),
            frozen=parameters.integer("frozen"),
        ),
    )
    if len(set(info.clients)) != len(info.clients):
        fields.fail(f"{fields.describe('clients')} lists a client twice")
    return info


def _known(fields: _Fields, key: str, names: Iterable[str], known: set[str]) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        fields.fail(f"{fields.describe(key)} names clients not in the run line: {', '.join(map(repr, unknown))}")


def _status(fields: _Fields, default: Status | None = None) -> Status:
    if default is not None and fields.data.get("status") is None:
        return default
    status = fields.text("status")
    if status not in STATUSES:
        fields.fail(f"{fields.describe('status')} must be one of {', '.join(STATUSES)}, got {status!r}")
    return status


def _client_round(fields: _Fields) -> ClientRound:
    status = _status(fields)
    evaluation = fields.optional_child("eval")
    seconds = fields.child("seconds")
    return ClientRound(
        status=status,
        error=fields.optional_text("error"),
        examples=fields.integer("examples"),
        train_loss=fields.optional_number("train_loss"),
        eval=None if evaluation is None else _scores(evaluation),
        bytes_down=fields.integer("bytes_down"),
        bytes_up=fields.integer("bytes_up"),
        peak_memory_bytes=fields.optional_integer("peak_memory_bytes"),
        seconds=ClientSeconds(
            train=seconds.number("train"), eval=seconds.number("eval"), total=seconds.number("total")
        ),
    )


def _round(fields: _Fields, info: RunInfo) -> RoundRecord:
    number = fields.integer("round")
    if number < 1:
        fields.fail(f"{fields.describe('round')} must be at least 1 (rounds are 1-based), got {number}")
    sampled = fields.ids("sampled")
    clients = {name: _client_round(part) for name, part in fields.children("clients").items()}
    known = set(info.clients)
    _known(fields, "sampled", sampled, known)
    _known(fields, "clients", clients, known)
    seconds = fields.child("seconds")
    return RoundRecord(
        round=number,
        sampled=sampled,
        clients=clients,
        bytes_down=fields.integer("bytes_down"),
        bytes_up=fields.integer("bytes_up"),
        seconds=RoundSeconds(
            round=seconds.number("round"),
            train=seconds.number("train"),
            eval=seconds.number("eval"),
            aggregate=seconds.number("aggregate"),
            overhead=seconds.number("overhead"),
        ),
    )


def _final(fields: _Fields, info: RunInfo) -> FinalRecord:
    clients = {}
    for name, part in fields.children("clients").items():
        own, union = part.optional_child("own"), part.optional_child("union")
        clients[name] = ClientFinal(
            own=None if own is None else _scores(own),
            union=None if union is None else _scores(union),
            probes=part.optional_number("probes"),
            status=_status(part, default="ok"),
            error=part.optional_text("error"),
        )
    _known(fields, "clients", clients, set(info.clients))
    return FinalRecord(clients=clients, seconds=fields.number("seconds"))


def read_metrics(path: str | Path) -> tuple[RunInfo, tuple[RoundRecord, ...], FinalRecord | None]:
    """Parse ``metrics.jsonl``: the run line, the completed rounds, and the final line if any."""
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RunFileError(source, "missing: a run directory needs a metrics.jsonl") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFileError(source, f"cannot read: {error}") from error
    info: RunInfo | None = None
    rounds: list[RoundRecord] = []
    final: FinalRecord | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunFileError(source, f"bad JSON: {error.msg} (column {error.colno})", number) from None
        fields = _Fields(data, source, number, "")
        kind = fields.text("kind")
        if info is None:
            if kind != "run":
                fields.fail(f"no run line: the first record must have kind 'run', got {kind!r}")
            info = _run_info(fields)
        elif final is not None:
            fields.fail(f"a {kind!r} record after the final record")
        elif kind == "round":
            record = _round(fields, info)
            if rounds and record.round <= rounds[-1].round:
                fields.fail(f"round {record.round} comes after round {rounds[-1].round}; rounds must increase")
            rounds.append(record)
        elif kind == "final":
            final = _final(fields, info)
        elif kind == "run":
            fields.fail("a second run record")
        else:
            fields.fail(f"unknown record kind {kind!r}; expected 'round' or 'final'")
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
