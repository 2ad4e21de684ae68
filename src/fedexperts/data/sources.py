"""Instruction datasets from a hub name or local files, mapped to one schema.

Every source ends up as a ``datasets.Dataset`` with the text columns ``instruction``, ``context``,
``response`` and ``category``. Local JSON, JSONL, CSV and Parquet files are read here, row by row,
so that a bad row is reported with its file, row (and line) and field; hub datasets go through
``datasets.load_dataset``. Bad rows either stop the load or, when asked, are skipped and counted.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets

from fedexperts.config import LOCAL_DATA_SUFFIXES
from fedexperts.errors import DataError

SCHEMA = ("instruction", "context", "response", "category")
REQUIRED = ("instruction", "response")
DEFAULT_CATEGORY = "general"


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column holds each schema field (``None``: the source has no such column)."""

    instruction: str
    response: str
    context: str | None = None
    category: str | None = None

    def pairs(self) -> dict[str, str]:
        """Schema field -> source column, for the fields the source provides."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self) if getattr(self, spec.name)}


PRESETS: dict[str, ColumnMapping] = {
    "dolly": ColumnMapping(instruction="instruction", response="response", context="context", category="category"),
    "alpaca": ColumnMapping(instruction="instruction", response="output", context="input"),
}


def parse_mapping(text: str) -> ColumnMapping:
    """A preset name (``dolly``, ``alpaca``) or ``field=column`` pairs: ``instruction=q,response=a``."""
    if text in PRESETS:
        return PRESETS[text]
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        field, sep, column = item.partition("=")
        if not sep or not column.strip():
            raise DataError(f"column mapping {text!r}: expected a preset ({', '.join(PRESETS)}) or field=column pairs")
        if field.strip() not in SCHEMA:
            raise DataError(f"column mapping {text!r}: unknown field {field.strip()!r}; fields: {', '.join(SCHEMA)}")
        pairs[field.strip()] = column.strip()
    missing = [name for name in REQUIRED if name not in pairs]
    if missing:
        raise DataError(f"column mapping {text!r} does not say which column holds {', '.join(missing)}")
    return ColumnMapping(**pairs)


@dataclass(frozen=True)
class InstructionData:
    dataset: datasets.Dataset
    source: str
    skipped: tuple[str, ...] = ()
    """One message per skipped row (file, row and field); empty unless rows were skipped."""


@dataclass(frozen=True)
class _Row:
    where: str
    values: Mapping[str, Any] | None
    """``None`` when the row could not even be parsed (``where`` then says why)."""


def load_instructions(
    source: str | Path,
    *,
    columns: ColumnMapping | str | None = None,
    split: str = "train",
    skip_bad_rows: bool = False,
) -> InstructionData:
    """Load instruction data from a local file or folder, or else from the hub, into the schema.

    ``columns`` is a :class:`ColumnMapping`, ``field=column`` pairs (see :func:`parse_mapping`),
    a preset name (whose optional context/category columns may be absent), or ``None`` to
    recognise Dolly or Alpaca by their columns. With ``skip_bad_rows`` a row with a missing, empty or non-text field
    is dropped and recorded in ``skipped``; otherwise it raises :class:`DataError`.
    """
    path = Path(source)
    if isinstance(columns, str) and columns not in PRESETS:
        parse_mapping(columns)  # a malformed mapping is reported before any file is read
    tables = list(_local_tables(path)) if path.exists() else [_hub_table(str(source), split)]
    records: dict[str, list[str]] = {name: [] for name in SCHEMA}
    skipped: list[str] = []
    for label, header, rows in tables:
        if not rows:
            raise DataError(f"{label} has no rows")
        table_mapping = _table_mapping(label, header, columns)
        for row in rows:
            try:
                record = _record(row, table_mapping)
            except DataError as error:
                if not skip_bad_rows:
                    raise
                skipped.append(str(error))
                continue
            for name in SCHEMA:
                records[name].append(record[name])
    if not records["instruction"]:
        first = f" (first: {skipped[0]})" if skipped else ""
        raise DataError(f"no usable rows in {source}: all {len(skipped)} rows were skipped{first}")
    dataset = datasets.Dataset.from_dict(records, features=_features())
    return InstructionData(dataset=dataset, source=str(source), skipped=tuple(skipped))


def _features() -> datasets.Features:
    return datasets.Features({name: datasets.Value("string") for name in SCHEMA})


def _table_mapping(label: str, header: list[str], columns: ColumnMapping | str | None) -> ColumnMapping:
    """The mapping for one table: explicit mappings must match exactly; presets may lack optional columns."""
    if isinstance(columns, ColumnMapping) or (columns is not None and columns not in PRESETS):
        mapping = columns if isinstance(columns, ColumnMapping) else parse_mapping(columns)
        unknown = [f"{field} -> {column!r}" for field, column in mapping.pairs().items() if column not in header]
        if unknown:
            raise DataError(
                f"{label}: mapped column(s) not found: {', '.join(unknown)}; "
                f"its columns are: {', '.join(header) or 'none'}"
            )
        return mapping
    candidates = [PRESETS[columns]] if columns is not None else list(PRESETS.values())
    for preset in candidates:
        if preset.instruction in header and preset.response in header:
            return ColumnMapping(
                instruction=preset.instruction,
                response=preset.response,
                context=preset.context if preset.context in header else None,
                category=preset.category if preset.category in header else None,
            )
    wanted = " or ".join(f"{name} ({PRESETS[name].instruction}, {PRESETS[name].response})" for name in PRESETS)
    raise DataError(
        f"{label}: no instruction/response columns of {columns or wanted}; its columns are: "
        f"{', '.join(header) or 'none'}; pass a preset ({', '.join(PRESETS)}) or field=column pairs"
    )


def _record(row: _Row, mapping: ColumnMapping) -> dict[str, str]:
    if row.values is None:
        raise DataError(row.where)
    record = {"context": "", "category": DEFAULT_CATEGORY}
    for field, column in mapping.pairs().items():
        value = row.values.get(column)
        if isinstance(value, int | float):
            value = str(value)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{row.where}: field {field!r} (column {column!r}) is not text: {type(value).__name__}")
        if field in REQUIRED and value is None:
            raise DataError(f"{row.where}: field {field!r} (column {column!r}) is missing")
        if field in REQUIRED and not str(value).strip():
            raise DataError(f"{row.where}: field {field!r} (column {column!r}) is empty")
        if value:
            record[field] = value
    return record


_Table = tuple[str, list[str], list[_Row]]


def _local_tables(path: Path) -> Iterator[_Table]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_DATA_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no {', '.join(LOCAL_DATA_SUFFIXES)} file")
    else:
        files = [path]
    readers = {".jsonl": _jsonl_table, ".json": _json_table, ".csv": _csv_table, ".parquet": _parquet_table}
    for file in files:
        reader = readers.get(file.suffix.lower())
        if reader is None:
            raise DataError(
                f"{file}: unsupported file type {file.suffix!r}; use one of {', '.join(LOCAL_DATA_SUFFIXES)}"
            )
        try:
            yield reader(file)
        except UnicodeDecodeError as error:
            raise DataError(
                f"{file}: not UTF-8 text ({error.reason}, byte 0x{error.object[error.start]:02x}); "
                "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None


def _header(rows: list[_Row]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row.values or ()))
    return list(columns)


def _jsonl_table(file: Path) -> _Table:
    rows: list[_Row] = []
    lines = file.read_text(encoding="utf-8").splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{file}, row {len(rows) + 1} (line {line_number})"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            rows.append(_Row(f"{where}: not valid JSON ({error.msg})", None))
            continue
        rows.append(_Row(where, value) if isinstance(value, dict) else _Row(f"{where}: not a JSON object", None))
    return str(file), _header(rows), rows


def _json_table(file: Path) -> _Table:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{file}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(value, list):
        raise DataError(f"{file}: expected a JSON list of objects, found a {type(value).__name__}")
    rows = [
        _Row(f"{file}, row {index}", item)
        if isinstance(item, dict)
        else _Row(f"{file}, row {index}: not a JSON object", None)
        for index, item in enumerate(value, start=1)
    ]
    return str(file), _header(rows), rows


def _csv_table(file: Path) -> _Table:
    with file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = []
        for index, values in enumerate(reader, start=1):
            where = f"{file}, row {index} (line {reader.line_num})"
            extra = values.pop(None, None)
            rows.append(_Row(f"{where}: more fields than the header has", None) if extra else _Row(where, values))
    return str(file), header, rows


def _parquet_table(file: Path) -> _Table:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as error:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{file}: cannot read as Parquet ({error})") from error
    rows = [_Row(f"{file}, row {index}", values) for index, values in enumerate(table.to_pylist(), start=1)]
    return str(file), list(table.column_names), rows


def _hub_table(name: str, split: str) -> _Table:
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # the hub client raises many types; the user needs the message, not the type
        raise DataError(
            f"{name!r} is not a local file or folder, and loading it from the hub failed: {error}"
        ) from error
    label = f"{name} ({split})"
    rows = [_Row(f"{label}, row {index}", values) for index, values in enumerate(dataset, start=1)]
    return label, list(dataset.column_names), rows
