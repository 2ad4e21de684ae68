import csv
import json

import pytest

from fedexperts.data.mmlu import MMLUQuestion, load_mmlu, subject_of
from fedexperts.errors import DataError

ROWS = {
    "abstract_algebra": [
        ["Find the degree of Q(sqrt(2)) over Q.", "0", "2", "4", "6", "B"],
        ["Is every group of order 4 abelian?", "Yes", "No", "Only cyclic ones", "None", "A"],
        ['Which, "quoted", is a field?', "Z", "Z/4Z", "Q", "N", "C"],
    ],
    "anatomy": [
        ["Which bone is in the arm?", "Femur", "Tibia", "Fibula", "Humerus", "D"],
        ["How many chambers has the heart?", "2", "3", "4", "5", "C"],
        ["Where is the patella?", "Knee", "Elbow", "Hip", "Wrist", "A"],
    ],
}


def write_csv_folder(folder, rows=ROWS):
    """The original release's layout: one headerless ``<subject>_test.csv`` per subject."""
    folder.mkdir(parents=True, exist_ok=True)
    for subject, lines in rows.items():
        with (folder / f"{subject}_test.csv").open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(lines)
    return folder


def write_hub_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


HUB_ROWS = [
    {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
    {
        "question": "Capital of France?",
        "subject": "geography",
        "choices": ["Rome", "Oslo", "Paris", "Bern"],
        "answer": 2,
    },
    {"question": "3 * 3?", "subject": "elementary_mathematics", "choices": ["9", "6", "3", "1"], "answer": 0},
]


def test_a_folder_of_the_csv_release_gives_every_subject(tmp_path):
    folder = write_csv_folder(tmp_path / "test")
    (folder / "abstract_algebra_dev.csv").write_text("a,b,c,d,e,A\n")  # another split: not read
    (folder / "README.txt").write_text("not data")
    questions = load_mmlu(folder)
    assert [q.subject for q in questions] == ["abstract_algebra"] * 3 + ["anatomy"] * 3
    assert [q.answer_index for q in questions] == [1, 0, 2, 3, 2, 0]
    assert questions[2].question == 'Which, "quoted", is a field?'
    assert questions[0].options == ("0", "2", "4", "6")


def test_the_prompt_is_the_standard_zero_shot_one():
    question = MMLUQuestion("abstract_algebra", "Find x.", ("1", "2", "3", "4"), 2)
    assert question.prompt == (
        "The following is a multiple choice question about abstract algebra.\n\n"
        "Find x.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert question.choices == (" A", " B", " C", " D")


def test_one_csv_file_and_its_subject(tmp_path):
    folder = write_csv_folder(tmp_path / "test")
    questions = load_mmlu(folder / "anatomy_test.csv")
    assert {q.subject for q in questions} == {"anatomy"} and len(questions) == 3
    assert subject_of(folder / "college_biology_val.csv") == "college_biology"
    assert subject_of(tmp_path / "mine.csv") == "mine"


def test_hub_columns_in_jsonl_and_parquet(tmp_path):
    path = write_hub_jsonl(tmp_path / "test.jsonl", HUB_ROWS)
    questions = load_mmlu(path)
    assert [(q.subject, q.answer_index) for q in questions] == [
        ("elementary_mathematics", 1),
        ("elementary_mathematics", 0),
        ("geography", 2),
    ]
    assert questions[2].options == ("Rome", "Oslo", "Paris", "Bern")

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "hub" / "test-00000-of-00001.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(HUB_ROWS), parquet)
    pq.write_table(pa.Table.from_pylist(HUB_ROWS[:1]), parquet.parent / "dev-00000-of-00001.parquet")
    assert load_mmlu(parquet.parent) == questions  # the folder's test file only


def test_a_hub_row_without_subject_takes_the_file_name(tmp_path):
    rows = [{"question": "q?", "choices": ["a", "b", "c", "d"], "answer": "D"}]
    (question,) = load_mmlu(write_hub_jsonl(tmp_path / "virology_test.jsonl", rows))
    assert question.subject == "virology" and question.answer_index == 3


def test_per_subject_bound_is_a_seeded_subset_in_file_order(tmp_path):
    many = {"anatomy": [[f"Question {i}?", "a", "b", "c", "d", "A"] for i in range(30)]}
    folder = write_csv_folder(tmp_path / "test", {**ROWS, **many})
    questions = load_mmlu(folder, per_subject=2, seed=3)
    assert [q.subject for q in questions] == ["abstract_algebra"] * 2 + ["anatomy"] * 2
    anatomy = [q.question for q in questions if q.subject == "anatomy"]
    assert anatomy == sorted(anatomy, key=lambda text: int(text.split()[1][:-1]))
    assert load_mmlu(folder, per_subject=2, seed=3) == questions
    assert load_mmlu(folder, per_subject=2, seed=4) != questions
    assert len(load_mmlu(folder, per_subject=None)) == 3 + 30


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["q?", "a", "b", "c", "d", "E"], "row 2 (line 2): answer 'E' is not one of A-D"),
        (["q?", "a", "b", "c", "d"], "row 2 (line 2): has 5 columns, expected 6 (question, A, B, C, D, answer"),
        (["  ", "a", "b", "c", "d", "A"], "row 2 (line 2): question is empty"),
    ],
)
def test_a_bad_csv_row_names_the_file_and_row(tmp_path, row, message):
    folder = write_csv_folder(tmp_path / "test", {"anatomy": [ROWS["anatomy"][0], row]})
    with pytest.raises(DataError) as caught:
        load_mmlu(folder)
    text = str(caught.value)
    assert text.startswith(str(folder / "anatomy_test.csv")) and message in text
    assert "\n" not in text and "Femur" not in text  # one line, no data rows


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"answer": 4}, "row 2 (line 2): answer 4 is not one of 0-3 (or A-D)"),
        ({"answer": True}, "answer True is not one of 0-3"),
        ({"choices": ["a", "b", "c"]}, "row 2 (line 2): choices is 3 items, expected a list of 4"),
        ({"choices": "abcd"}, "choices is a str, expected a list of 4"),
        ({"choices": ["a", "b", None, "d"]}, "choice C is a NoneType, expected text"),
        ({"question": None}, "question is a NoneType, expected text"),
    ],
)
def test_a_bad_hub_row_names_the_file_and_row(tmp_path, change, message):
    path = write_hub_jsonl(tmp_path / "test.jsonl", [HUB_ROWS[0], {**HUB_ROWS[1], **change}])
    with pytest.raises(DataError, match="^" + str(path)) as caught:
        load_mmlu(path)
    assert message in str(caught.value) and "Paris" not in str(caught.value)


def test_missing_columns_files_and_folders(tmp_path):
    path = write_hub_jsonl(tmp_path / "test.jsonl", [{"question": "q?", "subject": "x"}])
    with pytest.raises(DataError, match=r"row 1 \(line 1\): no choices, answer \(expected question, subject"):
        load_mmlu(path)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl, row 1 \(line 1\): not valid JSON"):
        load_mmlu(tmp_path / "broken.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_mmlu(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder holds no MMLU test file"):
        load_mmlu(tmp_path / "empty")
    (tmp_path / "empty_test.csv").write_text("")
    with pytest.raises(DataError, match=r"empty_test\.csv: no questions"):
        load_mmlu(tmp_path / "empty_test.csv")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_mmlu(tmp_path / "data.txt")
