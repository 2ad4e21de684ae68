"""FLEx's Dolly-15k splits on a generated file in the published ``databricks-dolly-15k.jsonl`` format."""

import json
from collections import Counter

import pytest

from fedexperts.config import load_config
from fedexperts.data import PartitionSpec, Scheme, load_instructions, partition
from fedexperts.data.partition import ROW_ID, spec_from_config
from fedexperts.errors import DataError

PAPER = ("closed_qa", "information_extraction", "classification", "summarization")
OTHERS = ("open_qa", "brainstorming")


def write_dolly(path, per_category=150):
    """Dolly's own fields and order; open_qa and brainstorming rows have no context, as in the real file."""
    with path.open("w", encoding="utf-8") as handle:
        for category in (*PAPER, *OTHERS):
            for index in range(per_category):
                context = "" if category in OTHERS else f"the passage {index} about {category}"
                row = {
                    "instruction": f"what is item {index} of {category}?",
                    "context": context,
                    "response": f"item {index} is {category}",
                    "category": category,
                }
                handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def dolly_file(tmp_path):
    return write_dolly(tmp_path / "databricks-dolly-15k.jsonl")


def test_dolly_columns_are_mapped_and_context_is_the_input(dolly_file):
    data = load_instructions(dolly_file).dataset
    assert len(data) == 6 * 150
    first = data[0]
    assert first["context"] == "the passage 0 about closed_qa" and first["category"] == "closed_qa"
    assert Counter(data["category"])["open_qa"] == 150


def test_category_filter_keeps_only_the_listed_categories(dolly_file):
    data = load_instructions(dolly_file).dataset
    split = partition(data, PartitionSpec(Scheme.IID, num_clients=3, categories=PAPER))
    seen = {name for client in split.clients for part in (client.train, client.test) for name in part["category"]}
    assert seen == set(PAPER) and split.categories == tuple(sorted(PAPER))
    assert split.dropped == 2 * 150 and split.unassigned == 0


def test_an_unknown_category_is_an_error_naming_it_and_the_categories_present(dolly_file):
    data = load_instructions(dolly_file).dataset
    with pytest.raises(DataError) as error:
        partition(data, PartitionSpec(Scheme.IID, num_clients=2, categories=("closed_qa", "poetry")))
    message = str(error.value)
    assert "'poetry'" in message
    assert all(name in message.split("categories are:")[1] for name in (*PAPER, *OTHERS))


def test_pathological_four_clients_one_category_each_with_100_test_rows(dolly_file):
    config = load_config(
        None,
        [
            f'data.source="{dolly_file}"',
            "data.scheme=pathological",
            "data.classes_per_client=1",
            f"data.categories={list(PAPER)!r}".replace("'", '"'),
            "data.test_per_category=100",
            "federation.clients=4",
        ],
    )
    split = partition(load_instructions(dolly_file).dataset, spec_from_config(config.data, 4))
    held = []
    for client in split.clients:
        train, test = set(client.train["category"]), set(client.test["category"])
        assert len(train) == 1 and test == train
        assert len(client.train) == 50 and len(client.test) == 100
        held.append(train.pop())
        assert not set(client.train[ROW_ID]) & set(client.test[ROW_ID])
    assert sorted(held) == sorted(PAPER)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_dirichlet_ten_clients_of_1000_rows_with_replacement_and_100_test_rows_per_category(dolly_file, alpha):
    spec = PartitionSpec(
        Scheme.DIRICHLET, num_clients=10, alpha=alpha, categories=PAPER, rows_per_client=1000, test_per_category=100
    )
    split = partition(load_instructions(dolly_file).dataset, spec)
    assert split.held_out is not None
    assert Counter(split.held_out["category"]) == dict.fromkeys(PAPER, 100)
    test_ids = set(split.held_out[ROW_ID])
    for client in split.clients:
        assert len(client.train) == 1000
        ids = client.train[ROW_ID]
        assert len(set(ids)) < len(ids), "1000 draws from 200 training rows repeat rows"
        assert not set(ids) & test_ids, "a held-out test row was drawn for training"
        assert set(client.train["category"]) <= set(PAPER)
        assert set(client.test[ROW_ID]) <= test_ids
    again = partition(load_instructions(dolly_file).dataset, spec)
    assert [c.train[ROW_ID] for c in again.clients] == [c.train[ROW_ID] for c in split.clients]
    mixes = [Counter(client.train["category"]) for client in split.clients]
    assert len({tuple(sorted(mix.items())) for mix in mixes}) == 10, "each client has its own Dirichlet mix"


def test_the_defaults_leave_the_rows_split_without_repeats(dolly_file):
    data = load_instructions(dolly_file).dataset
    split = partition(data, spec_from_config(load_config(None, []).data, 5))
    ids = [row for client in split.clients for part in (client.train, client.test) for row in part[ROW_ID]]
    assert len(ids) == len(set(ids)) and split.held_out is None and split.dropped == 0


def test_partition_command_takes_the_categories_and_the_run_defaults(dolly_file):
    from typer.testing import CliRunner

    from fedexperts.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["partition", str(dolly_file), "--categories", ",".join(PAPER), "--clients", "4"])
    assert result.exit_code == 0, result.output
    assert "pathological partition of 4 clients" in result.output  # data.scheme's default, as `run` uses
    assert "open_qa" not in result.output and "rows left out by category: 300" in result.output
    bad = runner.invoke(app, ["partition", str(dolly_file), "--categories", "closed_qa,poetry"])
    assert bad.exit_code == 2 and "poetry" in bad.output and "brainstorming" in bad.output


def test_flex_runs_in_process_on_a_dolly_file_with_the_category_filter(micro_config, dolly_file):
    from fedexperts.federation.inprocess import run_experiment

    config = micro_config(
        "algorithm.name=flex",
        f'data.source="{dolly_file}"',
        'data.categories=["closed_qa", "summarization"]',
        "data.scheme=pathological",
        "data.test_per_category=10",
        "federation.clients=2",
    )
    result = run_experiment(config)
    kinds = [line["kind"] for line in result.records]
    assert kinds == ["run", "round", "round", "final"]
    assert all(entry["status"] == "ok" for record in result.records[1:3] for entry in record["clients"].values())


def test_the_dolly_keys_round_trip_through_a_flower_run_config():
    from fedexperts.federation.flower.runconfig import config_from_run_config, config_to_run_config

    for overrides in (
        [f"data.categories={list(PAPER)!r}".replace("'", '"'), "data.rows_per_client=1000", "data.test_per_category=9"],
        [],
    ):
        config = load_config(None, overrides)
        back = config_from_run_config(config_to_run_config(config))
        assert back == config.model_copy(update={"output_dir": config.output_dir.resolve()})
