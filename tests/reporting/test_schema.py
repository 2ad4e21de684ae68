import copy
import json

import pytest

from fedexperts.reporting import RunFileError, load_run
from fedexperts.reporting.schema import (
    CONFIG_FILE,
    METRICS_FILE,
    ClientRound,
    FinalRecord,
    RecordError,
    RoundRecord,
    RunInfo,
    Scores,
    dump,
    parse_record,
    validate,
)

from .helpers import write_run


def _scores(loss, examples=3):
    return {"loss": loss, "exact_match": 0.0, "rouge_l": 0.25, "examples": examples}


# The three kinds of line exactly as the server writes them (key order included): an ok client with
# ``seconds.setup``, a failed one without the numbers it never reported, and a final evaluation.
SERVER_LINES = [
    {
        "kind": "run",
        "name": "fedavg",
        "algorithm": "fedavg",
        "seed": 0,
        "clients": ["client-0", "client-1"],
        "rounds": 1,
        "model": "micro",
        "parameters": {"total": 75040, "trainable": 4096, "shared": 4096, "personal": 0, "frozen": 70944},
    },
    {
        "kind": "round",
        "round": 1,
        "sampled": ["client-0", "client-1"],
        "clients": {
            "client-0": {
                "status": "ok",
                "error": None,
                "examples": 19,
                "bytes_down": 18264,
                "bytes_up": 18560,
                "train_loss": 5.5,
                "eval": _scores(5.25),
                "peak_memory_bytes": 765374464,
                "seconds": {"setup": 0.5, "train": 0.25, "eval": 0.125, "total": 1.0},
            },
            "client-1": {
                "status": "failed",
                "error": "RuntimeError: out of memory",
                "examples": 19,
                "bytes_down": 18264,
                "bytes_up": 0,
                "seconds": {"train": 0.0, "eval": 0.0, "total": 0.5},
            },
        },
        "bytes_down": 36528,
        "bytes_up": 18560,
        "seconds": {"round": 2.0, "train": 0.25, "eval": 0.125, "aggregate": 0.125, "overhead": 1.5},
    },
    {
        "kind": "final",
        "clients": {
            "client-0": {"status": "ok", "error": None, "own": _scores(5.0), "union": _scores(5.5, 4), "probes": 0.25},
            "client-1": {"status": "failed", "error": "boom", "own": None, "union": None, "probes": None},
        },
        "seconds": 0.75,
    },
]


def test_server_lines_round_trip_key_for_key():
    for line in SERVER_LINES:
        record = parse_record(copy.deepcopy(line))
        assert dump(record) == line
        assert json.dumps(dump(record)) == json.dumps(line)  # same keys in the same order
    kinds = [type(parse_record(line)) for line in SERVER_LINES]
    assert kinds == [RunInfo, RoundRecord, FinalRecord]


def test_server_lines_are_read_with_absent_fields_and_setup_seconds(tmp_path):
    record = load_run(write_run(tmp_path / "run", SERVER_LINES))
    failed = record.rounds[0].clients["client-1"]
    assert (failed.train_loss, failed.eval, failed.peak_memory_bytes, failed.seconds.setup) == (None, None, None, 0.0)
    assert record.rounds[0].clients["client-0"].eval == Scores(loss=5.25, exact_match=0.0, rouge_l=0.25, examples=3)
    assert record.time_split.setup == 0.5
    assert record.union is not None and record.union.count == 1
    assert [(f.round, f.client) for f in record.failures] == [(1, "client-1"), (None, "client-1")]


def test_models_are_frozen_and_written_without_unset_fields():
    entry = validate(ClientRound, SERVER_LINES[1]["clients"]["client-1"])
    with pytest.raises(ValueError, match="frozen"):
        entry.status = "ok"  # type: ignore[misc]
    assert "train_loss" not in entry.model_dump(exclude_unset=True)
    assert "setup" not in entry.model_dump(exclude_unset=True)["seconds"]


def test_unknown_field_is_rejected_by_name(tmp_path):
    lines = copy.deepcopy(SERVER_LINES)
    lines[1]["clients"]["client-0"]["peak_memory"] = 1
    with pytest.raises(RunFileError) as caught:
        load_run(write_run(tmp_path / "run", lines))
    assert caught.value.line == 2
    assert str(caught.value).endswith(":2: unknown key 'peak_memory' in key 'clients.client-0'")


def test_wrong_type_names_the_dotted_field_and_line_but_not_the_value(tmp_path):
    lines = copy.deepcopy(SERVER_LINES)
    lines[1]["clients"]["client-0"]["seconds"]["setup"] = "half a second"
    with pytest.raises(RunFileError) as caught:
        load_run(write_run(tmp_path / "run", lines))
    message = str(caught.value)
    assert (
        message
        == f"{tmp_path / 'run' / METRICS_FILE}:2: key 'clients.client-0.seconds.setup' must be a number, got a string"
    )
    assert "half a second" not in message and "\n" not in message


def test_several_mistakes_make_one_line_naming_the_first():
    line = {**SERVER_LINES[0], "seed": "0", "rounds": None}
    with pytest.raises(RecordError) as caught:
        parse_record(line)
    assert str(caught.value) == "key 'seed' must be an integer, got a string (and 1 more problem)"


NEW_SCORES = {"rouge_1": 0.5, "rouge_2": 0.125, "token_f1": 0.375, "accuracy": 0.0}


def _final(own):
    line = copy.deepcopy(SERVER_LINES[2])
    line["clients"]["client-0"]["own"] = own
    return line


def test_scores_round_trip_with_and_without_the_later_fields():
    old = _final(_scores(1.0))
    record = parse_record(copy.deepcopy(old))
    own = record.clients["client-0"].own
    assert own is not None and (own.rouge_1, own.rouge_2, own.token_f1, own.accuracy) == (None,) * 4
    assert json.dumps(dump(record)) == json.dumps(old)  # the absent fields stay absent
    assert own.as_dict() == _scores(1.0)
    new = _final({**_scores(1.0), **NEW_SCORES})
    record = parse_record(copy.deepcopy(new))
    assert json.dumps(dump(record)) == json.dumps(new)
    own = record.clients["client-0"].own
    assert own is not None and own.as_dict() == {**_scores(1.0), **NEW_SCORES}


def test_later_scores_are_numbers_or_absent():
    line = _final({**_scores(1.0), "token_f1": "high"})
    with pytest.raises(RecordError, match=r"key 'clients\.client-0\.own\.token_f1' must be a number, got a string"):
        parse_record(line)


def test_one_scores_type_and_the_file_names():
    from fedexperts import evaluation

    assert evaluation.Scores is Scores
    scores = Scores(loss=1.0, exact_match=0.5, rouge_l=0.25, examples=2)
    assert scores.as_dict() == {"loss": 1.0, "exact_match": 0.5, "rouge_l": 0.25, "examples": 2}
    assert (METRICS_FILE, CONFIG_FILE) == ("metrics.jsonl", "config.toml")
