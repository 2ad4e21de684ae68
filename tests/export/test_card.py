"""The model card: where the model came from and the run's own scores of it."""

import pytest

from fedexperts.export import export_client, export_global
from fedexperts.export.card import card_metrics
from fedexperts.reporting import load_run
from tests.export.conftest import RUN
from tests.federation.helpers import cheap_config, stopped_after


def test_a_client_card_has_its_final_scores_and_the_global_card_the_means(federation):
    record = load_run(federation("fedavg").run_dir)
    client = dict(card_metrics(record, "client-1"))
    assert client["own test split (final)"].startswith("rouge_l ")
    assert "union test set (final)" not in client  # the runs here skip the union evaluation
    means = dict(card_metrics(record, None))
    assert list(means) == ["final client models on their own test splits (mean)"]


def test_an_unfinished_run_exports_its_latest_round(export_base, tmp_path):
    config = cheap_config(export_base, tmp_path, *RUN, "federation.rounds=2", "eval.every=1", "algorithm.name=fedavg")
    run_dir = stopped_after(config, tmp_path / "run", 1)
    export_client(run_dir, "client-0", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "after round 1 of 2 (unfinished)" in card
    assert "- own test split (start of round 1): rouge_l" in card


@pytest.mark.parametrize("lora", ["merged", "adapter"])
def test_the_card_shows_how_to_load_the_folder(federation, tmp_path, lora):
    export_global(federation("fedavg").run_dir, tmp_path / "out", lora=lora)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: transformers" in card and 'AutoModelForCausalLM.from_pretrained("FOLDER")' in card
    assert ('PeftModel.from_pretrained(model, "FOLDER/adapter")' in card) == (lora == "adapter")
