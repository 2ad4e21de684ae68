import datasets
import pytest

from fedexperts.data import PartitionSpec, Scheme, partition, partition_table, plot_partition
from fedexperts.data.partition import ROW_ID
from fedexperts.errors import DataError

CATEGORIES = ["a", "b", "c", "d", "e"]


def make_dataset(per_category=60):
    names = [name for name in CATEGORIES for _ in range(per_category)]
    return datasets.Dataset.from_dict({"instruction": [f"q{i}" for i in range(len(names))], "category": names})


def row_ids(split):
    return [row for client in split.clients for part in (client.train, client.test) for row in part[ROW_ID]]


SPECS = [
    PartitionSpec(Scheme.IID, num_clients=6, seed=3),
    PartitionSpec(Scheme.DIRICHLET, num_clients=6, alpha=0.5, seed=3),
    PartitionSpec(Scheme.PATHOLOGICAL, num_clients=6, classes_per_client=2, seed=3),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.scheme.value)
def test_partitions_are_disjoint_cover_the_data_and_are_deterministic(spec):
    data = make_dataset()
    first, second = partition(data, spec), partition(data, spec)
    ids = row_ids(first)
    assert len(ids) == len(set(ids)), "a row went to two clients (or to train and test)"
    assert sorted(ids) == list(range(len(data)))
    assert first.unassigned == 0
    assert ids == row_ids(second)
    other_seed = partition(
        data, PartitionSpec(spec.scheme, spec.num_clients, spec.alpha, spec.classes_per_client, seed=4)
    )
    assert row_ids(other_seed) != ids


def test_a_client_part_can_be_partitioned_again():
    first = partition(make_dataset(), PartitionSpec(Scheme.IID, num_clients=2, test_fraction=0.0, seed=0))
    again = partition(first.clients[0].train, PartitionSpec(Scheme.IID, num_clients=3, seed=0))
    assert sorted(row_ids(again)) == list(range(len(first.clients[0].train)))


def test_each_client_tests_on_every_category_it_holds():
    split = partition(make_dataset(), PartitionSpec(Scheme.IID, num_clients=4, test_fraction=0.25, seed=0))
    for client in split.clients:
        assert set(client.test["category"]) == set(client.train["category"])
        assert len(client.test) == pytest.approx(0.25 * client.size, abs=len(CATEGORIES))


def test_pathological_gives_each_client_exactly_k_categories():
    split = partition(make_dataset(), PartitionSpec(Scheme.PATHOLOGICAL, num_clients=5, classes_per_client=2, seed=1))
    assert [len(+counts) for counts in split.counts()] == [2] * 5


def test_pathological_with_too_few_clients_reports_unassigned_rows():
    split = partition(make_dataset(), PartitionSpec(Scheme.PATHOLOGICAL, num_clients=2, classes_per_client=1, seed=0))
    assert split.unassigned == 3 * 60


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_near_uniform():
    data = make_dataset(per_category=200)
    measured = {
        alpha: partition(data, PartitionSpec(Scheme.DIRICHLET, num_clients=5, alpha=alpha, seed=0)).heterogeneity()
        for alpha in (0.1, 1.0, 10.0, 1000.0)
    }
    iid = partition(data, PartitionSpec(Scheme.IID, num_clients=5, seed=0)).heterogeneity()
    # measured with seed 0: 0.44, 0.39, 0.11, 0.013 (IID: 0.05)
    assert measured[0.1] > 0.35
    assert measured[1000.0] < 0.03
    assert iid < 0.1
    values = list(measured.values())
    assert values == sorted(values, reverse=True), measured
    skewed = partition(data, PartitionSpec(Scheme.DIRICHLET, num_clients=5, alpha=0.1, seed=0))
    largest_share = [max(counts.values()) / sum(counts.values()) for counts in skewed.counts()]
    assert sum(largest_share) / len(largest_share) > 0.5


def test_bad_requests_are_data_errors():
    data = make_dataset(per_category=2)
    with pytest.raises(DataError, match="cannot be split across 20 clients"):
        partition(data, PartitionSpec(Scheme.IID, num_clients=20))
    with pytest.raises(DataError, match="cannot partition by 'topic'"):
        partition(data, PartitionSpec(by="topic"))
    with pytest.raises(DataError, match="cannot make a dirichlet partition"):
        partition(data, PartitionSpec(Scheme.DIRICHLET, num_clients=5, alpha=0.05, min_partition_size=3))


def test_report_table_and_plot(tmp_path):
    from rich.console import Console

    split = partition(make_dataset(), PartitionSpec(Scheme.DIRICHLET, num_clients=3, alpha=1.0, seed=0))
    console = Console(record=True, width=160)
    console.print(partition_table(split))
    text = console.export_text()
    for name in [*CATEGORIES, "train", "test", "heterogeneity", "alpha 1"]:
        assert name in text
    for counts in split.counts():
        assert str(sum(counts.values())) in text
    path = plot_partition(split, tmp_path / "plots" / "partition.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partition_command_reports_a_local_file_and_saves_the_plot(tmp_path):
    import json

    from typer.testing import CliRunner

    from fedexperts.cli import app

    rows = [{"instruction": f"q{i}", "response": "a", "category": CATEGORIES[i % 5]} for i in range(50)]
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    plot = tmp_path / "partition.png"
    runner = CliRunner()
    result = runner.invoke(
        app, ["partition", str(source), "--scheme", "pathological", "--clients", "5", "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    assert "pathological partition of 5 clients" in result.output
    assert "unassigned rows: 0" in " ".join(result.output.split())
    assert plot.read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["partition", str(source), "--scheme", "random"])
    assert result.exit_code == 2
    assert "--scheme (data.scheme): Input should be 'iid', 'dirichlet' or 'pathological'" in result.output


def test_a_validation_split_is_held_out_of_the_training_rows():
    from fedexperts.data.partition import hold_out_validation

    rows = datasets.Dataset.from_dict({"row_id": list(range(20))})
    rest, held = hold_out_validation(rows, 0.1, seed=3, client="c")
    assert len(held) == 2 and len(rest) == 18
    assert set(held["row_id"]).isdisjoint(rest["row_id"]) and len(set(held["row_id"]) | set(rest["row_id"])) == 20
    assert hold_out_validation(rows, 0.1, seed=3, client="c")[1]["row_id"] == held["row_id"]  # seeded
    assert len(hold_out_validation(rows.select(range(3)), 0.01, seed=0, client="c")[1]) == 1  # at least one row
    assert hold_out_validation(rows, 0.0, seed=0, client="c") == (rows, None)
    with pytest.raises(DataError, match=r"c has 1 training rows: data\.validation_fraction = 0\.5 leaves none"):
        hold_out_validation(rows.select([0]), 0.5, seed=0, client="c")
