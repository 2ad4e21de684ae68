"""``eval.mmlu`` in the run record: optional in ``ClientFinal``, averaged by ``RunRecord``, shown in the reports."""

import pytest

from fedexperts.reporting import compare, comparison_markdown, load_run, report_markdown
from fedexperts.reporting.schema import ClientFinal, FinalRecord, RecordError, dump, validate

from .helpers import client_final, client_round, final_line, round_line, run_line, scores, simple_run, write_run


def mmlu(overall, **subjects):
    return {"overall": overall, "subjects": subjects}


TWO_CLIENTS = (mmlu(0.5, anatomy=0.25, virology=0.75), mmlu(0.75, anatomy=1.0, virology=0.5))


def mmlu_run(directory, seed=0, results=TWO_CLIENTS):
    """One round; each client's final record has ``results[i]`` as its MMLU scores (``None``: no ``mmlu`` key)."""
    clients = [str(index) for index in range(len(results))]
    finals = {}
    for client, result in zip(clients, results, strict=True):
        finals[client] = {**client_final(probes=0.5), **({"mmlu": result} if result is not None else {})}
    rounds = round_line(1, {client: client_round(evaluation=scores()) for client in clients})
    return write_run(directory, [run_line(clients, rounds=1, seed=seed), rounds, final_line(finals)])


def test_the_final_record_reads_with_and_without_mmlu():
    old = validate(ClientFinal, client_final())
    assert old.mmlu is None and "mmlu" not in dump(FinalRecord(clients={"0": old}, seconds=1.0))["clients"]["0"]
    new = validate(ClientFinal, {**client_final(), "mmlu": mmlu(0.5, anatomy=0.5)})
    assert new.mmlu is not None and new.mmlu.subjects == {"anatomy": 0.5}
    assert dump(FinalRecord(clients={"0": new}, seconds=1.0))["clients"]["0"]["mmlu"] == mmlu(0.5, anatomy=0.5)
    with pytest.raises(RecordError, match=r"mmlu\.subjects\.anatomy"):
        validate(ClientFinal, {**client_final(), "mmlu": {"overall": 0.5, "subjects": {"anatomy": "high"}}})


def test_run_record_means_over_the_clients_that_scored_mmlu(tmp_path):
    results = (mmlu(0.5, anatomy=0.25, virology=0.75), mmlu(1.0, anatomy=1.0), None)
    record = load_run(mmlu_run(tmp_path / "run", results=results))
    assert record.mmlu == pytest.approx(0.75)
    assert record.mmlu_subjects == {"anatomy": pytest.approx(0.625), "virology": 0.75}
    older = load_run(simple_run(tmp_path / "older"))
    assert older.mmlu is None and older.mmlu_subjects == {}


def test_summary_shows_mmlu_beside_the_probes_only_when_measured(tmp_path):
    text = report_markdown(load_run(mmlu_run(tmp_path / "run")))
    assert "| probes | MMLU |" in text
    assert "| 0.5000 | 0.5000 |" in text and "| 0.5000 | 0.7500 |" in text  # probes, then MMLU, per client
    assert "| 0.5000 | 0.6250 |" in text  # the mean row
    assert "- MMLU accuracy (mean over clients; zero-shot, 2 subjects): 0.6250" in text
    assert "| anatomy | 0.6250 |" in text and "| virology | 0.6250 |" in text
    older = report_markdown(load_run(simple_run(tmp_path / "older")))
    assert "MMLU" not in older


def test_mmlu_is_compared_only_where_measured(tmp_path):
    older = compare({"a": [load_run(simple_run(tmp_path / "a"))]})
    assert "mmlu" not in [metric.key for metric in older.metrics]
    both = compare({"new": [load_run(mmlu_run(tmp_path / f"new-{seed}", seed=seed)) for seed in range(2)]})
    assert both.estimate("mmlu", "new").mean == pytest.approx(0.625)
    assert "MMLU accuracy" in comparison_markdown(both)
