"""MMLU-format multiple-choice questions from local files, for knowledge retention on real models (``eval.mmlu``).

Two formats are read:

- the **original CSV release** (Hendrycks et al.): no header, six columns ``question, A, B, C, D,
  answer`` with the answer a letter ``A``-``D``; one file per subject named ``<subject>_test.csv``
  (``_val``/``_dev`` also accepted), so the subject is the file name without that suffix;
- the **hub copy's columns** (``cais/mmlu``) in Parquet or JSONL: ``question``, ``subject``,
  ``choices`` (a list of four) and ``answer`` (an integer 0-3; a letter ``A``-``D`` is accepted too).
  A row without ``subject`` takes the file's name as its subject.

``eval.mmlu`` is one such file, or a folder whose *test* files are read: ``*_test.csv``, and
``.jsonl``/``.parquet`` files whose name starts with ``test`` or whose stem ends in ``_test`` (so a
folder of the release or of a hub snapshot does not mix in its dev, validation or auxiliary splits).
A bad file or row stops the load with one line naming the file, the row and what was expected,
never the row's text.

**Prompt.** The standard zero-shot MMLU prompt (as in the original evaluation code, without
few-shot examples)::

    The following is a multiple choice question about <subject, underscores as spaces>.

    <question>
    A. <first choice>
    B. <second choice>
    C. <third choice>
    D. <fourth choice>
    Answer:

and the four continuations `` A``, `` B``, `` C``, `` D``: the model is scored on the letter, not on
the choice's text, so long and short choices compete on equal terms. Each question is right when
its answer's letter has the highest log-likelihood
(:func:`fedexperts.evaluation.multiple_choice_accuracy`).

Torch-free: only the Parquet reader (pyarrow) is imported, and only for Parquet files.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedexperts.errors import DataError

LETTERS = ("A", "B", "C", "D")
SUFFIXES = (".csv", ".jsonl", ".parquet")
_SPLIT_SUFFIXES = ("_test", "_val", "_dev")
CSV_COLUMNS = "question, A, B, C, D, answer"


@dataclass(frozen=True)
class MMLUQuestion:
    subject: str
    """As in the file name or ``subject`` column (``abstract_algebra``)."""
    question: str
    options: tuple[str, str, str, str]
    answer_index: int
    """0-3: which of ``options`` (and of ``choices``) is right."""

    @property
    def prompt(self) -> str:
        lines = [f"The following is a multiple choice question about {self.subject.replace('_', ' ')}.", ""]
        lines.append(self.question.strip())
        lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, self.options, strict=True)]
        return "\n".join([*lines, "Answer:"])

    @property
    def choices(self) -> tuple[str, ...]:
        """The continuations scored: the letters, each after a space."""
        return tuple(f" {letter}" for letter in LETTERS)


def load_mmlu(source: str | Path, *, per_subject: int | None = None, seed: int = 0) -> tuple[MMLUQuestion, ...]:
    """Every question of ``source`` (a file or a folder, see the module docstring), grouped by subject.

    ``per_subject`` bounds the rows kept of each subject: a seeded subset (``seed``), kept in file
    order, so every client and every runtime scores the same questions. Subjects come out sorted.
    """
    path = Path(source)
    if not path.exists():
        raise DataError(f"eval.mmlu: {path} does not exist (expected an MMLU file or a folder of them)")
    by_subject: dict[str, list[MMLUQuestion]] = {}
    for file in _files(path):
        questions = list(_read(file))
        if not questions:
            raise DataError(f"{file}: no questions")
        for question in questions:
            by_subject.setdefault(question.subject, []).append(question)
    chosen: list[MMLUQuestion] = []
    for subject in sorted(by_subject):
        rows = by_subject[subject]
        if per_subject is not None and len(rows) > per_subject:
            keep = sorted(random.Random(f"{seed}:{subject}").sample(range(len(rows)), per_subject))
            rows = [rows[index] for index in keep]
        chosen.extend(rows)
    return tuple(chosen)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(file for file in path.iterdir() if file.is_file() and _is_test_file(file))
    if not files:
        raise DataError(
            f"{path}: folder holds no MMLU test file (expected <subject>_test.csv, or .jsonl/.parquet files "
            "named test* or *_test)"
        )
    return files


def _is_test_file(file: Path) -> bool:
    suffix, stem = file.suffix.lower(), file.stem.lower()
    if suffix == ".csv":
        return stem.endswith("_test")
    return suffix in SUFFIXES and (stem.startswith("test") or stem.endswith("_test"))


def subject_of(file: Path) -> str:
    """The subject a file's name gives: ``abstract_algebra_test.csv`` -> ``abstract_algebra``."""
    stem = file.stem
    for suffix in _SPLIT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _read(file: Path) -> Iterator[MMLUQuestion]:
    suffix = file.suffix.lower()
    if suffix == ".csv":
        yield from _csv_questions(file)
    elif suffix == ".jsonl":
        yield from _jsonl_questions(file)
    else:
        yield from _parquet_questions(file)


def _csv_questions(file: Path) -> Iterator[MMLUQuestion]:
    subject = subject_of(file)
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            for index, cells in enumerate(reader, start=1):
                where = f"{file}, row {index} (line {reader.line_num})"
                if not cells:
                    continue
                if len(cells) != len(LETTERS) + 2:
                    raise DataError(f"{where}: has {len(cells)} columns, expected 6 ({CSV_COLUMNS}; no header)")
                if index == 1 and cells[-1].strip().lower() == "answer":
                    continue  # a header row, though the original release has none
                question, *options, answer = cells
                letter = answer.strip().upper()
                if letter not in LETTERS:
                    raise DataError(f"{where}: answer {_short(answer)} is not one of A-D")
                yield _question(where, subject, question, options, LETTERS.index(letter))
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except csv.Error as error:
        raise DataError(f"{file}: not a readable CSV file ({error})") from error


def _jsonl_questions(file: Path) -> Iterator[MMLUQuestion]:
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    index = 0
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        index += 1
        where = f"{file}, row {index} (line {line_number})"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from error
        yield _hub_question(where, file, value)


def _parquet_questions(file: Path) -> Iterator[MMLUQuestion]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as error:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{file}: cannot read as Parquet ({type(error).__name__})") from error
    missing = [name for name in ("question", "choices", "answer") if name not in table.column_names]
    if missing:
        raise DataError(
            f"{file}: no column(s) {', '.join(missing)}; expected question, subject, choices, answer; "
            f"its columns are: {', '.join(table.column_names) or 'none'}"
        )
    for index, values in enumerate(table.to_pylist(), start=1):
        yield _hub_question(f"{file}, row {index}", file, values)


def _hub_question(where: str, file: Path, value: Any) -> MMLUQuestion:
    if not isinstance(value, dict):
        raise DataError(f"{where}: not a JSON object (expected question, subject, choices, answer)")
    missing = [name for name in ("question", "choices", "answer") if name not in value]
    if missing:
        raise DataError(f"{where}: no {', '.join(missing)} (expected question, subject, choices, answer)")
    subject = value.get("subject") or subject_of(file)
    if not isinstance(subject, str):
        raise DataError(f"{where}: subject is a {type(subject).__name__}, expected text")
    choices = value["choices"]
    if not isinstance(choices, list | tuple) or len(choices) != len(LETTERS):
        count = f"{len(choices)} items" if isinstance(choices, list | tuple) else f"a {type(choices).__name__}"
        raise DataError(f"{where}: choices is {count}, expected a list of 4")
    answer = value["answer"]
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
        raise DataError(f"{where}: answer {_short(answer)} is not one of 0-3 (or A-D)")
    return _question(where, subject, value["question"], list(choices), answer)


def _question(where: str, subject: str, question: Any, options: Sequence[Any], answer: int) -> MMLUQuestion:
    if not isinstance(question, str):
        raise DataError(f"{where}: question is a {type(question).__name__}, expected text")
    if not question.strip():
        raise DataError(f"{where}: question is empty")
    if not subject.strip():
        raise DataError(f"{where}: subject is empty")
    texts = []
    for letter, option in zip(LETTERS, options, strict=True):
        if isinstance(option, int | float) and not isinstance(option, bool):
            option = str(option)
        if not isinstance(option, str):
            raise DataError(f"{where}: choice {letter} is a {type(option).__name__}, expected text")
        texts.append(option)
    return MMLUQuestion(subject.strip(), question, (texts[0], texts[1], texts[2], texts[3]), answer)


def _short(value: Any) -> str:
    """A field's value for an error message, cut short (a misplaced column could hold a whole question)."""
    text = repr(value)
    return text if len(text) <= 12 else text[:10] + "…"
