"""The run-record schema: each line of ``metrics.jsonl`` and each file under ``records/``, as written and read.

The server builds these models and writes them with :func:`dump`; the reports read them back with
:func:`parse_record`. Three kinds, told apart by ``kind``: one :class:`RunInfo` (``"run"``) first,
one :class:`RoundRecord` (``"round"``) per completed round, and a :class:`FinalRecord` (``"final"``)
once the run finished. Models are frozen and refuse unknown keys, so a field renamed on one side
is an error naming it, not a silently missing number.

*Absent is not null.* Fields with a default may be absent: a client that failed before reporting
writes no ``train_loss``, ``eval``, ``peak_memory_bytes`` or ``seconds.setup``, and only final
evaluations carry ``union``, ``probes`` and (with ``eval.mmlu``) ``mmlu``. :func:`dump` leaves out
the fields the writer never set, so the files hold exactly the keys the server meant. Integers
accept integral floats (``10.0``); client ids in ``clients`` and ``sampled`` accept integers
(turned into the strings JSON keys use).

Torch-free on purpose: reading a run directory must not load the training stack.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"

Status = Literal["ok", "failed", "rejected"]
STATUSES: tuple[Status, ...] = get_args(Status)


def _integral(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _client_id(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Int = Annotated[int, Strict(), BeforeValidator(_integral)]
Float = Annotated[float, Strict()]
Text = Annotated[str, Strict()]
ClientId = Annotated[str, Strict(), BeforeValidator(_client_id)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Scores(_Record):
    """One model's evaluation on one test set.

    Every text score is a mean over the examples of greedy completions against the references; the
    definitions are in :mod:`fedexperts.metrics`. The fields after ``examples`` were added later and
    are optional, so run files written before them still read (``None``: not measured).
    """

    loss: Float
    """Mean next-token loss over the references' tokens (teacher forcing)."""
    exact_match: Float
    """SQuAD exact match (lowercased, punctuation and articles dropped). Runs written before the
    SQuAD metrics hold the earlier, stricter match here (only whitespace normalised)."""
    rouge_l: Float
    """ROUGE-L F-measure (rouge-score, stemmed unless ``eval.rouge_stemmer=false``); the primary metric."""
    examples: Int
    rouge_1: Float | None = None
    """ROUGE-1 F-measure (unigrams), same tokenizer and stemming as ``rouge_l``."""
    rouge_2: Float | None = None
    """ROUGE-2 F-measure (bigrams), same tokenizer and stemming as ``rouge_l``."""
    token_f1: Float | None = None
    """SQuAD token F1 over the normalised bags of words."""
    accuracy: Float | None = None
    """Label accuracy: the prediction's normalised first line equals the normalised reference."""

    def as_dict(self) -> dict[str, float | int]:
        """The measured fields by name (unmeasured ones left out), in field order."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


class MMLUScores(_Record):
    """Accuracy on MMLU-format multiple-choice questions (``eval.mmlu``), by log-likelihood of the answer letter."""

    overall: Float
    """Over every question scored (so subjects weigh by their question count, as the original MMLU code)."""
    subjects: dict[str, Float]
    """Per subject, as named by the files (``abstract_algebra``)."""


class Parameters(_Record):
    total: Int
    trainable: Int
    shared: Int
    personal: Int
    frozen: Int


class RunInfo(_Record):
    """The ``run`` line: what was run."""

    kind: Literal["run"] = "run"
    name: Text
    algorithm: Text
    seed: Int
    clients: tuple[ClientId, ...]
    rounds: Int
    """Rounds planned (``RunRecord.rounds`` holds the ones completed)."""
    model: Text
    model_note: Text | None = None
    """How the model's MoE was found and what of it trains, when not the plain case (a wrapper config's
    text model, a family without a descriptor); see docs/families.md."""
    parameters: Parameters
    groups: dict[str, Text] | None = None
    """Each client's majority category (its id when its data has none), as the server's distinct sampling and
    per-task reports read it; absent in runs written before it."""

    @field_validator("clients")
    @classmethod
    def _distinct(cls, clients: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(clients)) != len(clients):
            raise PydanticCustomError("duplicate_client", "lists a client twice")
        return clients


class ClientSeconds(_Record):
    setup: Float = 0.0
    """Absent for a client that failed; never part of ``train`` or ``eval``."""
    train: Float
    eval: Float
    total: Float
    """The whole exchange as the server saw it."""


class ClientRound(_Record):
    """One client's part in one round (or in the final evaluation, before it is cut to a :class:`ClientFinal`)."""

    status: Status
    error: Text | None = None
    examples: Int
    bytes_down: Int
    bytes_up: Int
    train_loss: Float | None = None
    eval: Scores | None = None
    """Measured before the client trained in this round."""
    validation: Scores | None = None
    """On the client's validation rows, before it trained (runs with a validation split; what decisions read)."""
    peak_memory_bytes: Int | None = None
    """``None`` when the client did not report it (e.g. it failed)."""
    model_bytes: Int | None = None
    """Bytes of the weights the client's model of this step holds (:func:`~fedexperts.federation.accounting.held_bytes`:
    a FedMoE sub-MoE's, the whole model's otherwise); absent in runs written before it and for failed clients."""
    seconds: ClientSeconds
    union: Scores | None = None
    probes: Float | None = None
    mmlu: MMLUScores | None = None
    report: dict[str, Int | Float | Text] | None = None
    """What the algorithm reported of the step (FedMoE: ``experts`` held and ``paper_bytes``, one direction's
    bytes as its paper counts them: the whole sub-MoE in float32); absent when it reported nothing."""
    refused: Text | None = None
    """With status ``rejected``: the rule that refused the reply (``size``, ``metadata``, ``identity``, ``round``,
    ``nonce``, ``examples``, ``keys``, ``shape``, ``dtype``, ``non-finite``, ``experts``...; docs/flower.md)."""


class RoundSeconds(_Record):
    round: Float
    train: Float
    eval: Float
    aggregate: Float
    overhead: Float


class PrivacyRound(_Record):
    """Client-level differential privacy after a round (docs/privacy.md): the mechanism and the privacy spent so far."""

    mode: Literal["central", "local"]
    clip: Float
    """L2 bound on each client's update (reply minus the global state it started from)."""
    noise_multiplier: Float
    noise_std: Float
    """Of the Gaussian noise added to each coordinate: of the aggregate (central) or of each reply (local)."""
    sampled: Int
    """Clients sampled this round (the fixed denominator of the aggregate)."""
    population: Int
    clipped: Int
    """Accepted updates whose norm exceeded ``clip`` and were scaled down (central; local: not seen, 0)."""
    delta: Float
    epsilon: Float
    """Spent through this round at ``delta``, by Flower's RDP accountant."""
    releases: Int
    """Private releases composed so far (rounds)."""


class RoundRecord(_Record):
    kind: Literal["round"] = "round"
    round: Int
    """1-based."""
    sampled: tuple[ClientId, ...]
    clients: dict[str, ClientRound]
    bytes_down: Int
    bytes_up: Int
    seconds: RoundSeconds
    privacy: PrivacyRound | None = None
    """Only in runs with ``privacy.clip``."""

    @field_validator("round")
    @classmethod
    def _one_based(cls, number: int) -> int:
        if number < 1:
            raise PydanticCustomError("round_number", "must be at least 1 (rounds are 1-based)")
        return number


class ClientFinal(_Record):
    status: Status = "ok"
    error: Text | None = None
    own: Scores | None = None
    """``None`` when the client's final evaluation failed."""
    union: Scores | None = None
    probes: Float | None = None
    mmlu: MMLUScores | None = None
    """Only in runs with ``eval.mmlu`` (absent in older run files)."""


class FinalRecord(_Record):
    kind: Literal["final"] = "final"
    clients: dict[str, ClientFinal]
    seconds: Float


_Model = TypeVar("_Model", bound=_Record)
Record = Annotated[RunInfo | RoundRecord | FinalRecord, Field(discriminator="kind")]
RECORD: TypeAdapter[RunInfo | RoundRecord | FinalRecord] = TypeAdapter(Record)


class RecordError(ValueError):
    """A record that does not fit the schema; the message names the dotted key, never the data."""


def dump(record: RunInfo | RoundRecord | FinalRecord) -> dict[str, Any]:
    """The record as JSON data, ``kind`` first, without the fields its writer never set (see the module docstring)."""
    return {"kind": record.kind, **record.model_dump(mode="json", exclude_unset=True)}


def parse_record(data: object) -> RunInfo | RoundRecord | FinalRecord:
    """One decoded JSON line as its record, or :class:`RecordError` describing the first mistake."""
    try:
        return RECORD.validate_python(data)
    except ValidationError as error:
        raise RecordError(explain(error, tagged=True)) from None


def validate(model: type[_Model], data: object) -> _Model:
    """``data`` (e.g. built from a client's reply) as ``model``, or :class:`RecordError` naming the first mistake."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RecordError(explain(error)) from None


def explain(error: ValidationError, *, tagged: bool = False) -> str:
    """One line for a validation error: the first problem, by dotted key (``tagged``: the loc starts with ``kind``)."""
    problems = error.errors(include_url=False)
    text = _problem(problems[0], tagged=tagged)
    more = len(problems) - 1
    return text if more == 0 else f"{text} (and {more} more problem{'s' if more > 1 else ''})"


def kind_of(value: object) -> str:
    """How a JSON value is named in messages (its type, not its content)."""
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


def _key(loc: tuple[int | str, ...]) -> str:
    return f"key {'.'.join(map(str, loc))!r}" if loc else "the record"


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
}


def _problem(problem: ErrorDetails, *, tagged: bool) -> str:
    kind, ctx = problem["type"], problem.get("ctx", {})
    if kind == "union_tag_not_found":
        return "missing key 'kind'"
    if kind == "union_tag_invalid":
        return f"unknown record kind {ctx['tag']!r}; expected one of {ctx['expected_tags']}"
    loc = tuple(problem["loc"])[1:] if tagged else tuple(problem["loc"])
    if kind in ("missing", "extra_forbidden"):
        where = f" in {_key(loc[:-1])}" if loc[:-1] else ""
        return f"{'missing' if kind == 'missing' else 'unknown'} key {str(loc[-1])!r}{where}"
    if kind in _EXPECTED:
        return f"{_key(loc)} must be {_EXPECTED[kind]}, got {kind_of(problem['input'])}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx["expected"]))
        return f"{_key(loc)} must be one of {', '.join(allowed)}"
    if kind in ("duplicate_client", "round_number"):
        return f"{_key(loc)} {problem['msg']}"
    return f"{_key(loc)}: {problem['msg']}"
