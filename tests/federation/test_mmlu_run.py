"""``eval.mmlu`` end to end: loaded with the evaluation sets, scored per client in the final evaluation, reported."""

from dataclasses import replace

import pytest

from fedexperts.config import load_config
from fedexperts.errors import DataError
from fedexperts.experiment import build_setting, federated_rows, with_evaluation
from fedexperts.federation.inprocess import run_experiment
from fedexperts.reporting import load_run, report_markdown

from ..data.test_mmlu import ROWS, write_csv_folder


def test_eval_mmlu_is_a_path_and_a_bound_per_subject(tmp_path):
    default = load_config(None, [])
    assert default.eval.mmlu is None and default.eval.mmlu_examples == 20
    config = load_config(None, [f'eval.mmlu="{tmp_path}"', "eval.mmlu_examples=5"])
    assert config.eval.mmlu == tmp_path and config.eval.mmlu_examples == 5


def test_a_micro_run_reports_mmlu_per_subject_in_the_final_record(micro_config, tmp_path):
    folder = write_csv_folder(tmp_path / "mmlu")
    config = micro_config("federation.rounds=1", f'eval.mmlu="{folder}"', "eval.mmlu_examples=2")
    setting = build_setting(config)
    assert [question.subject for question in setting.mmlu] == ["abstract_algebra"] * 2 + ["anatomy"] * 2

    result = run_experiment(config, setting=setting)
    rounds = [line for line in result.records if line["kind"] == "round"]
    assert all("mmlu" not in entry for record in rounds for entry in record["clients"].values())  # final only
    final = result.records[-1]
    assert final["kind"] == "final" and len(final["clients"]) == 3
    for entry in final["clients"].values():
        assert set(entry["mmlu"]["subjects"]) == {"abstract_algebra", "anatomy"}
        assert all(value in (0.0, 0.5, 1.0) for value in entry["mmlu"]["subjects"].values())
        assert entry["mmlu"]["overall"] == pytest.approx(sum(entry["mmlu"]["subjects"].values()) / 2)
        assert 0.0 <= entry["probes"] <= 1.0  # beside the probes
    record = load_run(result.run_dir)
    assert record.mmlu is not None and "MMLU accuracy (mean over clients" in report_markdown(record)

    bad = write_csv_folder(tmp_path / "bad", {"anatomy": [*ROWS["anatomy"], ["q?", "a", "b", "c", "d", "E"]]})
    bad_config = micro_config(f'eval.mmlu="{bad}"')
    with pytest.raises(DataError, match=r"anatomy_test\.csv, row 4 \(line 4\): answer 'E' is not one of A-D"):
        with_evaluation(replace(setting, config=bad_config), federated_rows(bad_config))
