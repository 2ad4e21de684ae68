import csv
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedexperts.data import ColumnMapping, load_instructions, parse_mapping
from fedexperts.errors import DataError

DOLLY_ROWS = [
    {"instruction": "Name a metal.", "context": "", "response": "iron", "category": "open_qa"},
    {"instruction": "Who sold salt?", "context": "Maren sold salt.", "response": "Maren", "category": "closed_qa"},
]
ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "hello"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def as_records(dataset):
    return [dict(row) for row in dataset]


EXPECTED_DOLLY = [
    {"instruction": "Name a metal.", "context": "", "response": "iron", "category": "open_qa"},
    {"instruction": "Who sold salt?", "context": "Maren sold salt.", "response": "Maren", "category": "closed_qa"},
]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_each_local_format_loads_dolly_rows(tmp_path, suffix):
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, DOLLY_ROWS)
    elif suffix == "json":
        path.write_text(json.dumps(DOLLY_ROWS))
    elif suffix == "csv":
        write_csv(path, DOLLY_ROWS)
    else:
        pq.write_table(pa.Table.from_pylist(DOLLY_ROWS), path)
    data = load_instructions(path)
    assert data.dataset.column_names == ["instruction", "context", "response", "category"]
    assert as_records(data.dataset) == EXPECTED_DOLLY
    assert data.skipped == ()


def test_alpaca_layout_is_recognised_and_gets_the_default_category(tmp_path):
    data = load_instructions(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS))
    assert as_records(data.dataset) == [
        {"instruction": "Add the numbers.", "context": "2 and 3", "response": "5", "category": "general"},
        {"instruction": "Say hello.", "context": "", "response": "hello", "category": "general"},
    ]


def test_folder_loads_every_supported_file_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", DOLLY_ROWS[1:])
    write_csv(tmp_path / "a.csv", DOLLY_ROWS[:1])
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_instructions(tmp_path, columns="dolly")
    assert [row["response"] for row in data.dataset] == ["iron", "Maren"]


def test_explicit_mapping_renames_columns(tmp_path):
    rows = [{"q": "Why?", "a": "Because.", "kind": "general_qa"}]
    mapping = parse_mapping("instruction=q, response=a, category=kind")
    assert mapping == ColumnMapping(instruction="q", response="a", category="kind")
    data = load_instructions(write_jsonl(tmp_path / "x.jsonl", rows), columns=mapping)
    assert as_records(data.dataset) == [
        {"instruction": "Why?", "context": "", "response": "Because.", "category": "general_qa"}
    ]


def test_hub_names_go_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ALPACA_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_instructions("someone/alpaca-like", columns="alpaca", split="train")
    assert calls == [("someone/alpaca-like", "train")]
    assert [row["response"] for row in data.dataset] == ["5", "hello"]


def test_hub_failure_is_a_data_error_naming_the_source(monkeypatch):
    def failing(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match=r"'nobody/nothing' is not a local file or folder.*no network"):
        load_instructions("nobody/nothing")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"instruction": "Q", "context": "", "category": "x"},
            r"row 2 \(line 2\): field 'response' \(column 'response'\) is missing",
        ),
        (
            {"instruction": "Q", "response": "  ", "category": "x"},
            r"row 2 \(line 2\): field 'response' \(column 'response'\) is empty",
        ),
        (
            {"instruction": ["Q"], "response": "A", "category": "x"},
            r"row 2 \(line 2\): field 'instruction' .* is not text: list",
        ),
    ],
)
def test_bad_row_names_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [DOLLY_ROWS[0], row])
    with pytest.raises(DataError, match=message) as caught:
        load_instructions(path)
    assert str(path) in str(caught.value)


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps(DOLLY_ROWS[0])
        + "\n{not json\n"
        + json.dumps({"instruction": "Q", "response": ""})
        + "\n"
        + json.dumps(DOLLY_ROWS[1])
        + "\n"
    )
    data = load_instructions(path, columns="dolly", skip_bad_rows=True)
    assert [row["response"] for row in data.dataset] == ["iron", "Maren"]
    assert len(data.skipped) == 2
    assert "row 2 (line 2): not valid JSON" in data.skipped[0]
    assert "row 3 (line 3): field 'response' (column 'response') is empty" in data.skipped[1]


def test_csv_row_with_extra_fields_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,response\nQ,A\nQ2,A2,surplus\n")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): more fields than the header has"):
        load_instructions(path)


def test_unknown_column_in_mapping_lists_the_real_columns(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    with pytest.raises(
        DataError, match=r"mapped column\(s\) not found: response -> 'answer'.*instruction, input, output"
    ):
        load_instructions(path, columns="instruction=instruction,response=answer")


def test_preset_that_does_not_fit_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    with pytest.raises(
        DataError, match=r"no instruction/response columns of dolly; its columns are: instruction, input, output"
    ):
        load_instructions(path, columns="dolly")


def test_unrecognisable_layout_asks_for_a_mapping(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "Q", "completion": "A"}])
    with pytest.raises(DataError, match="pass a preset"):
        load_instructions(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("instruction=q", "does not say which column holds response"),
        ("answer=a,instruction=q,response=r", "unknown field 'answer'"),
        ("nonsense", "expected a preset"),
    ],
)
def test_malformed_mapping_is_refused(text, message):
    with pytest.raises(DataError, match=message):
        parse_mapping(text)


def test_empty_file_and_empty_folder_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl has no rows"):
        load_instructions(empty, columns="dolly")
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(DataError, match="folder holds no"):
        load_instructions(folder)


def test_all_rows_skipped_is_still_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "", "response": "A"}])
    with pytest.raises(DataError, match=r"no usable rows .* all 1 rows were skipped"):
        load_instructions(path, columns="dolly", skip_bad_rows=True)


def test_broken_json_file_and_unsupported_suffix(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        load_instructions(broken)
    text = tmp_path / "data.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_instructions(text)
