import json

from typer.testing import CliRunner

from fedexperts.cli import app
from fedexperts.data.expertbench import ExpertBench
from fedexperts.models import builtin
from fedexperts.models.builtin import RECIPES

MICRO = RECIPES["micro"]


def test_model_card_holds_the_measured_numbers(built):
    metrics = json.loads((built / builtin.METRICS_FILE).read_text())
    card = (built / "README.md").read_text()
    assert f"accuracy {metrics['probe_accuracy']:.1%}" in card
    assert f"chance {metrics['probe_chance']:.0%}" in card
    assert metrics["probe_count"] == len(ExpertBench.from_seed(0).world.facts)
    for category, value in metrics["routing_entropy_bits"].items():
        assert f"| {category} | {value:.3f} |" in card
        assert 0.0 <= value <= 3.0
    assert f"{metrics['routing_between_categories_tv']:.3f} between categories" in card
    assert MICRO.digest() in card
    assert metrics["train"]["steps"] == MICRO.steps
    assert metrics["train"]["final_loss"] < metrics["train"]["first_loss"]


def test_pretrain_command_reports_and_then_reuses(built):
    runner = CliRunner()
    result = runner.invoke(app, ["pretrain", "--recipe", "micro"])
    assert result.exit_code == 0, result.output
    assert "already built" in result.output
    assert str(built) in result.output.replace("\n", "")
    metrics = json.loads((built / builtin.METRICS_FILE).read_text())
    assert f"probe accuracy {metrics['probe_accuracy']:.1%}" in " ".join(result.output.split())
    result = runner.invoke(app, ["pretrain", "--recipe", "nope"])
    assert result.exit_code == 2
    assert "unknown recipe 'nope'" in result.output
