"""FedMoE's table layout: per-task scores over each task's clients, whole-run traffic, client model memory."""

import pytest

from fedexperts.reporting import compare, load_run
from fedexperts.reporting.compare import METRICS
from fedexperts.reporting.paper_layout import (
    PAPER_TABLE_FILE,
    client_model_bytes,
    paper_metrics,
    task_score,
    total_traffic,
    write_paper_table,
)

from .helpers import client_final, client_round, final_line, round_line, run_line, scores, write_run

TASKS = {"classification": "accuracy", "summarization": "rouge_2"}
GROUPS = {"0": "classification", "1": "classification", "2": "summarization"}


def _run(directory, *, seed=0, accuracy=(0.5, 0.7, 0.0), rouge_2=(0.0, 0.0, 0.3), model_bytes=(1000, 3000, 2000)):
    """Three clients (two of classification, one of summarization), two rounds of all three."""
    clients = list(GROUPS)

    def part(index):
        entry = client_round(bytes_down=100, bytes_up=50)
        return {**entry, "model_bytes": model_bytes[index]}

    lines = [
        run_line(clients, rounds=2, seed=seed, groups=GROUPS),
        round_line(1, {client: part(index) for index, client in enumerate(clients)}),
        round_line(2, {client: part(index) for index, client in enumerate(clients)}),
        final_line(
            {
                client: client_final(own=scores(accuracy=accuracy[index], rouge_2=rouge_2[index]))
                for index, client in enumerate(clients)
            }
        ),
    ]
    return load_run(write_run(directory, lines))


def test_each_task_is_scored_over_its_own_clients_only(tmp_path):
    run = _run(tmp_path / "a")
    assert task_score("classification", "accuracy")(run) == pytest.approx(0.6)  # clients 0 and 1, not client 2
    assert task_score("summarization", "rouge_2")(run) == pytest.approx(0.3)
    assert task_score("closed_qa", "token_f1")(run) is None  # no client of that task
    assert total_traffic(run) == 2 * 3 * (100 + 50)  # every round, both directions
    assert client_model_bytes(run) == pytest.approx(2000)  # mean over the six client steps


def test_runs_without_groups_or_memory_have_no_value(tmp_path):
    lines = [
        run_line(["0"], rounds=1),
        round_line(1, {"0": client_round()}),
        final_line({"0": client_final(own=scores(accuracy=1.0))}),
    ]
    run = load_run(write_run(tmp_path / "old", lines))
    assert task_score("classification", "accuracy")(run) is None and client_model_bytes(run) is None


def test_the_paper_table_lists_each_method_with_its_task_columns(tmp_path):
    groups = {
        "fedmoe": [_run(tmp_path / f"m-{seed}", seed=seed, accuracy=(0.6 + 0.1 * seed,) * 3) for seed in range(2)],
        "fedavg": [_run(tmp_path / f"a-{seed}", seed=seed, model_bytes=(4000,) * 3) for seed in range(2)],
    }
    comparison = compare(groups, metrics=(*METRICS, *paper_metrics(TASKS)), reference="fedmoe")
    assert comparison.estimate("task_classification_accuracy", "fedmoe").mean == pytest.approx(0.65)
    assert comparison.paired("task_classification_accuracy", "fedmoe", "fedavg").mean == pytest.approx(0.05)
    path = write_paper_table(tmp_path, comparison, TASKS)
    assert path.name == PAPER_TABLE_FILE
    text = path.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "classification accuracy" in header and "summarization ROUGE-2" in header and "GB" in header
    fedavg = next(line for line in text.splitlines() if line.startswith("| fedavg"))
    assert "4e-06 ± 0" in fedavg  # 4000 bytes in GB, the same in both seeds
    assert "not transcribed" in text
