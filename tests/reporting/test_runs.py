import json
import math

import pytest

from fedexperts.errors import FedExpertsError
from fedexperts.reporting import RunFileError, load_run

from .helpers import (
    client_final,
    client_round,
    final_line,
    round_line,
    run_line,
    scores,
    simple_run,
    write_run,
)


def _mixed_run(tmp_path):
    """Two rounds with partial participation, a failure, a rejection and a client without eval."""
    first = round_line(
        1,
        {
            "a": client_round(evaluation=scores(0.2, 0.1, 2.0), bytes_down=100, bytes_up=40, peak_memory_bytes=500),
            "b": client_round(evaluation=scores(0.4, 0.3, 1.0), bytes_down=100, bytes_up=60, peak_memory_bytes=900),
        },
        seconds={"round": 10.0, "train": 6.0, "eval": 2.0, "aggregate": 1.5, "overhead": 0.5},
    )
    second = round_line(
        2,
        {
            "c": client_round("failed", scores(0.6, 0.5, 0.5), error="out of\nmemory", bytes_down=150, bytes_up=0,
                              peak_memory_bytes=2_000),
            "a": client_round("rejected", None, error="norm too large", bytes_down=0, bytes_up=30),
        },
        seconds={"round": 30.0, "train": 20.0, "eval": 5.0, "aggregate": 2.5, "overhead": 2.5},
    )  # fmt: skip
    final = final_line(
        {
            "a": client_final(scores(0.3, 0.2, 1.5), scores(0.1, 0.0, 3.0), probes=None),
            "b": client_final(scores(0.5, 0.4, 1.0), None, probes=0.75),
            "c": client_final(scores(0.7, 0.3, 0.5), scores(0.3, 0.2, 2.0), probes=0.25),
        },
        seconds=4.0,
    )
    return write_run(tmp_path / "run", [run_line(["a", "b", "c"], rounds=2), first, second, final])


def test_records_are_parsed(tmp_path):
    record = load_run(_mixed_run(tmp_path))
    assert record.info.clients == ("a", "b", "c")
    assert record.info.parameters.trainable == 100
    assert [item.round for item in record.rounds] == [1, 2]
    assert record.rounds[1].clients["c"].error == "out of\nmemory"
    assert record.rounds[1].clients["a"].eval is None
    assert record.final is not None and record.final.clients["b"].union is None
    assert record.config == {"model": {"name": "builtin"}, "algorithm": {"name": "fedavg"}}
    assert record.finished


def test_derived_numbers_by_hand(tmp_path):
    record = load_run(_mixed_run(tmp_path))
    personalized = record.personalized
    assert personalized is not None
    assert personalized.rouge_l == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    assert personalized.exact_match == pytest.approx((0.2 + 0.4 + 0.3) / 3)
    assert personalized.count == 3
    assert (personalized.rouge_1, personalized.token_f1, personalized.accuracy) == (None, None, None)  # older runs
    union = record.union
    assert union is not None and union.count == 2  # b has no union score
    assert union.rouge_l == pytest.approx(0.2)
    assert record.probes == pytest.approx(0.5)  # mean of 0.75 and 0.25; a's null left out
    # Round totals: down 200 and 150, up 100 and 30; sampled 2 clients in each round.
    per_round = record.bytes_per_round
    assert per_round is not None and (per_round.down, per_round.up) == (175.0, 65.0)
    per_client = record.bytes_per_client_round
    assert per_client is not None
    assert per_client.down == pytest.approx((200 / 2 + 150 / 2) / 2)
    assert per_client.up == pytest.approx((100 / 2 + 30 / 2) / 2)
    peak = record.peak_memory
    assert peak is not None and (peak.bytes, peak.client, peak.round) == (2_000, "c", 2)
    split = record.time_split
    assert (split.round, split.train, split.eval, split.aggregate, split.overhead) == (40.0, 26.0, 7.0, 4.0, 3.0)
    assert split.final == 4.0 and split.total == 44.0
    assert split.share(split.train) == pytest.approx(0.65)
    means = record.round_means
    assert [mean.round for mean in means] == [1, 2]
    assert means[0].scores.rouge_l == pytest.approx(0.3) and means[0].scores.loss == pytest.approx(1.5)
    assert means[1].scores.count == 1  # the rejected client had no eval; the failed one had
    assert means[1].scores.rouge_l == pytest.approx(0.6)
    assert [(f.round, f.client, f.status) for f in record.failures] == [(2, "c", "failed"), (2, "a", "rejected")]


def test_bytes_per_client_divide_by_sampled_clients(tmp_path):
    lines = [
        run_line(["a", "b"], rounds=2),
        round_line(1, {"a": client_round(bytes_down=100), "b": client_round(bytes_down=100)}),
        round_line(2, {"a": client_round(bytes_down=150)}),
    ]
    record = load_run(write_run(tmp_path / "run", lines))
    assert record.bytes_per_round is not None and record.bytes_per_round.down == 175.0
    assert record.bytes_per_client_round is not None and record.bytes_per_client_round.down == 125.0


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ((0.1, 0.5, 0.8, 0.85), 3),  # 0.9 * 0.85 = 0.765: round 3 is the first at or above it
        ((0.2, 0.9, 1.0), 2),  # exactly 90% counts
        ((0.5, 0.3, 0.2), 1),  # the starting model is the best
        ((0.0, 0.0), None),  # a best of 0: undefined, not "reached at once"
    ],
)
def test_rounds_to_ninety_percent(tmp_path, curve, expected):
    record = load_run(simple_run(tmp_path / "run", curve=curve))
    assert record.rounds_to_90 == expected


def test_rounds_to_fraction_skips_rounds_without_evaluation(tmp_path):
    lines = [
        run_line(["a"], rounds=3),
        round_line(1, {"a": client_round(evaluation=None)}),
        round_line(2, {"a": client_round(evaluation=scores(0.5))}),
        round_line(3, {"a": client_round(evaluation=scores(1.0))}),
    ]
    record = load_run(write_run(tmp_path / "run", lines))
    assert [mean.round for mean in record.round_means] == [2, 3]
    assert record.rounds_to_fraction(0.5) == 2
    assert record.rounds_to_90 == 3


def test_unfinished_run(tmp_path):
    record = load_run(simple_run(tmp_path / "run", finished=False))
    assert not record.finished
    assert record.personalized is None and record.union is None and record.probes is None
    assert record.time_split.final is None
    assert record.rounds_to_90 == 3  # 0.9 * 0.6 = 0.54: round 3


def test_run_line_only(tmp_path):
    record = load_run(write_run(tmp_path / "run", [run_line()], config=None))
    assert record.rounds == () and record.config is None
    assert record.bytes_per_round is None and record.peak_memory_bytes is None and record.rounds_to_90 is None
    assert record.time_split.round == 0.0 and record.time_split.share(0.0) is None


def test_blank_lines_are_ignored_and_nan_is_read(tmp_path):
    lines = [run_line(["a"]), "", round_line(1, {"a": client_round(evaluation=scores(loss=math.nan))}), "  "]
    record = load_run(write_run(tmp_path / "run", lines))
    assert math.isnan(record.round_means[0].scores.loss)


def _without(mapping, *keys):
    return {key: value for key, value in mapping.items() if key not in keys}


def test_absent_nullable_fields_as_the_runtime_writes_failures(tmp_path):
    """A client that raised reports no train_loss, eval or peak memory; a failed final has no own scores."""
    failed = _without(
        client_round("failed", error="ValueError: boom", bytes_up=0), "train_loss", "eval", "peak_memory_bytes"
    )
    ok = client_round(evaluation=scores(0.4, examples=10.0), peak_memory_bytes=700)
    finals = {
        "a": {"status": "ok", "error": None, "own": scores(0.6), "union": None, "probes": None},
        "b": {"status": "failed", "error": "RuntimeError: oom", "own": None, "union": None, "probes": None},
    }
    lines = [run_line(["a", "b"], rounds=1), round_line(1, {"a": ok, "b": failed}), final_line(finals)]
    record = load_run(write_run(tmp_path / "run", lines))
    part = record.rounds[0].clients["b"]
    assert (part.train_loss, part.eval, part.peak_memory_bytes) == (None, None, None)
    assert record.rounds[0].clients["a"].eval.examples == 10
    assert record.peak_memory_bytes == 700
    assert record.personalized is not None and record.personalized.count == 1
    assert record.personalized.rouge_l == pytest.approx(0.6)
    assert [(f.round, f.client, f.status, f.error) for f in record.failures] == [
        (1, "b", "failed", "ValueError: boom"),
        (None, "b", "failed", "RuntimeError: oom"),
    ]  # fmt: skip


def _broken(tmp_path, lines):
    directory = write_run(tmp_path / "run", lines)
    with pytest.raises(RunFileError) as caught:
        load_run(directory)
    assert isinstance(caught.value, FedExpertsError)
    return caught.value


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(RunFileError, match="no such folder"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFileError) as caught:
        load_run(tmp_path / "empty")
    assert caught.value.path == tmp_path / "empty" / "metrics.jsonl"
    assert str(tmp_path / "empty" / "metrics.jsonl") in str(caught.value) and "missing" in str(caught.value)


def test_bad_json_names_file_and_line(tmp_path):
    error = _broken(tmp_path, [run_line(), round_line(1, {"0": client_round()}), '{"kind": "round", "round": 2'])
    assert error.line == 3
    assert f"{tmp_path / 'run' / 'metrics.jsonl'}:3: bad JSON" in str(error)


def test_missing_nested_key_names_line_and_key(tmp_path):
    broken = round_line(1, {"0": client_round(evaluation=scores())})
    del broken["clients"]["0"]["eval"]["rouge_l"]
    error = _broken(tmp_path, [run_line(), broken])
    assert error.line == 2
    assert "metrics.jsonl:2: missing key 'rouge_l' in key 'clients.0.eval'" in str(error)


def test_missing_top_level_key(tmp_path):
    line = run_line()
    del line["seed"]
    error = _broken(tmp_path, [line])
    assert "metrics.jsonl:1: missing key 'seed'" in str(error)


def test_no_run_line(tmp_path):
    error = _broken(tmp_path, [round_line(1, {"0": client_round()})])
    assert error.line == 1 and "no run line" in str(error)
    error = _broken(tmp_path, [])
    assert error.line is None and "no run line" in str(error)


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        ([run_line(seed="0")], 1, "key 'seed' must be an integer, got a string"),
        ([run_line(seed=True)], 1, "key 'seed' must be an integer, got a boolean"),
        ([run_line(clients=["a", "a"])], 1, "lists a client twice"),
        ([json.dumps([1, 2])], 1, "the record must be a JSON object, got a list"),
        ([run_line(), round_line(1, {"0": client_round("crashed")})], 2, "must be one of ok, failed, rejected"),
        ([run_line(), round_line(1, {"9": client_round()})], 2, "names clients not in the run line: '9'"),
        ([run_line(), round_line(0, {"0": client_round()})], 2, "rounds are 1-based"),
        ([run_line(), round_line(2, {}), round_line(2, {})], 3, "round 2 comes after round 2"),
        ([run_line(), final_line({}), round_line(1, {})], 3, "after the final record"),
        ([run_line(), run_line()], 2, "a second run record"),
        ([run_line(), {"kind": "checkpoint"}], 2, "unknown record kind 'checkpoint'"),
        ([run_line(), {"kind": "final", "clients": {}}], 2, "missing key 'seconds'"),
        (
            [run_line(), round_line(1, {"0": _without(client_round(), "bytes_up")})],
            2,
            "missing key 'bytes_up' in key 'clients.0'",
        ),
        (
            [run_line(), round_line(1, {"0": client_round(evaluation=scores(examples=2.5))})],
            2,
            "key 'clients.0.eval.examples' must be an integer, got a number",
        ),
    ],
)
def test_schema_mistakes(tmp_path, lines, line, message):
    error = _broken(tmp_path, lines)
    assert error.line == line
    assert message in str(error)
    assert str(error).startswith(f"{tmp_path / 'run' / 'metrics.jsonl'}:{line}: ")


def test_bad_config_names_the_file(tmp_path):
    directory = write_run(tmp_path / "run", [run_line()], config="[model\nname = 1\n")
    with pytest.raises(RunFileError) as caught:
        load_run(directory)
    assert caught.value.path == directory / "config.toml"
    assert "config.toml" in str(caught.value) and "bad TOML" in str(caught.value)


def test_later_scores_are_averaged_only_when_every_client_has_them():
    from fedexperts.reporting.runs import mean_scores
    from fedexperts.reporting.schema import Scores

    new = [Scores(**scores(rouge_l=value, rouge_1=value, token_f1=1.0)) for value in (0.25, 0.75)]
    mean = mean_scores(new)
    assert mean is not None and mean.rouge_1 == pytest.approx(0.5) and mean.token_f1 == 1.0
    assert mean.rouge_2 is None and mean.accuracy is None
    mixed = mean_scores([*new, Scores(**scores())])
    assert mixed is not None and mixed.rouge_l == pytest.approx(0.5) and mixed.rouge_1 is None
