from typer.testing import CliRunner

from fedexperts.cli import app

runner = CliRunner()


def test_demo_runs_every_step():
    result = runner.invoke(app, ["demo", "--model-type", "qwen2_moe"])
    assert result.exit_code == 0, result.output
    for step in ("Routing on", "FLEx grafting choice", "differs from the original by 0.00e+00", "Sub-MoE", "done"):
        assert step in result.output


def test_user_error_is_one_line_and_exit_code_two():
    result = runner.invoke(app, ["demo", "--model-type", "llama"])
    assert result.exit_code == 2
    assert "no tiny config for 'llama'" in result.output
    assert "Traceback" not in result.output
