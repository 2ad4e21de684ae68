import pytest
from typer.testing import CliRunner

from fedexperts import planning
from fedexperts.cli import app
from fedexperts.config import build_config
from fedexperts.planning import PRESETS, plan

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


def micro_args(micro_model_path, tmp_path, *extra):
    from tests.conftest import MICRO_RUN

    return [f'model.name="{micro_model_path}"', f'output_dir="{tmp_path}"', *MICRO_RUN, "federation.rounds=1", *extra]


def test_run_prints_rounds_and_the_client_table_and_report_rebuilds(micro_model_path, tmp_path):
    result = runner.invoke(app, ["run", *micro_args(micro_model_path, tmp_path, "algorithm.name=fedavg")])
    assert result.exit_code == 0, result.output
    assert "round 1: 3/3 clients ok" in result.output
    assert "client-2" in result.output and "mean" in result.output
    run_dir = tmp_path / "default"
    for name in ("config.toml", "metrics.jsonl", "summary.md", "plot_clients.png", "plot_rounds.png", "plot_bytes.png"):
        assert (run_dir / name).is_file(), name
    (run_dir / "summary.md").unlink()
    rebuilt = runner.invoke(app, ["report", str(run_dir)])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (run_dir / "summary.md").is_file()
    again = runner.invoke(app, ["run", *micro_args(micro_model_path, tmp_path, "algorithm.name=fedavg")])
    assert again.exit_code == 2 and "--resume" in again.output


def test_compare_reports_mean_and_interval_per_method(micro_model_path, tmp_path):
    args = micro_args(micro_model_path, tmp_path, "eval.union_examples=0", "eval.probes=0")
    result = runner.invoke(app, ["compare", *args, "--algorithms", "local,fedavg", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "default" / "comparison.md").is_file()
    text = (tmp_path / "default" / "comparison.md").read_text()
    assert "local" in text and "fedavg" in text and "±" in text
    assert sorted(p.name for p in (tmp_path / "default" / "fedavg").iterdir()) == ["seed-0", "seed-1"]


def test_bad_config_keys_and_values_are_named(tmp_path):
    result = runner.invoke(app, ["run", "federation.clinets=3"])
    assert result.exit_code == 2 and "federation.clinets" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["run", "algorithm.name=fedsgd"])
    assert result.exit_code == 2 and "algorithm.name" in result.output and "flex" in result.output
    result = runner.invoke(app, ["run", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "no such config file" in result.output


def test_flower_app_writes_a_pyproject_naming_our_apps_and_holding_the_config(tmp_path):
    import tomllib

    from fedexperts.federation.flower.runconfig import config_from_run_config

    out = tmp_path / "app"
    result = runner.invoke(app, ["flower", "app", "federation.rounds=4", "algorithm.name=fedmoe", "--out", str(out)])
    assert result.exit_code == 0, result.output
    flwr = tomllib.loads((out / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {
        "serverapp": "fedexperts.federation.flower.serverapp:app",
        "clientapp": "fedexperts.federation.flower.clientapp:app",
    }

    def flat(table, prefix=""):
        for key, value in table.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    config = config_from_run_config(dict(flat(flwr["config"])))
    assert config.federation.rounds == 4 and config.algorithm.name == "fedmoe"


def test_flower_app_with_a_bad_override_names_it(tmp_path):
    result = runner.invoke(app, ["flower", "app", "federation.rounds=zero", "--out", str(tmp_path / "app")])
    assert result.exit_code == 2
    assert "federation.rounds" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "app").exists()


# -- plan ----------------------------------------------------------------------------------------------
def test_cli_plans_a_preset_with_algorithm_settings_from_the_config(tmp_path):
    experiment = tmp_path / "experiment.toml"
    experiment.write_text('[algorithm]\nname = "fedprox"\nscope = "attention"\n')
    result = runner.invoke(
        app,
        ["plan", "olmoe-1b-7b", "--config", str(experiment), "--set", "algorithm.mu=0.1", "--transfer-dtype", "bf16"],
    )
    assert result.exit_code == 0, result.output
    expected = plan(
        "olmoe-1b-7b",
        build_config({"algorithm": {"name": "fedprox", "scope": "attention"}}).algorithm,
        transfer_dtype="bf16",
    )
    assert "with fedprox" in result.output
    assert f"{expected.downlink_bytes:,} B" in result.output
    assert "activations not included" in result.output


def test_cli_plan_all_compares_every_preset_under_the_algorithm_shorthand():
    result = runner.invoke(app, ["plan", "--all", "--algorithm", "dense"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for preset in PRESETS:
        assert preset in result.output
    assert "fedexperts plan: dense" in result.output
    assert "activations are not included" in result.output


def test_cli_plan_model_all_is_the_same_as_the_flag(monkeypatch):
    monkeypatch.setattr(planning, "PRESETS", {name: PRESETS[name] for name in ("olmoe-1b-7b", "gpt-oss-20b")})
    flag = runner.invoke(app, ["plan", "--all", "--algorithm", "local"], env={"COLUMNS": "200"})
    word = runner.invoke(app, ["plan", "all", "--algorithm", "local"], env={"COLUMNS": "200"})
    assert flag.exit_code == word.exit_code == 0, flag.output + word.output
    assert flag.output == word.output
    assert "gpt-oss-20b" in word.output and "mixtral" not in word.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["plan", "no-such-model"], "is not a preset"),
        (["plan"], "give a MODEL"),
        (["plan", "olmoe-1b-7b", "--algorithm", "nope"], "algorithm.name"),
        (["plan", "olmoe-1b-7b", "--set", "algorithm.colour=1"], "unknown key"),
        (["plan", "olmoe-1b-7b", "--dtype", "int4"], "unknown dtype"),
        (["plan", "olmoe-1b-7b", "--config", "missing.toml"], "no such config file"),
    ],
)
def test_cli_plan_bad_inputs_exit_2_with_one_error_and_no_traceback(arguments, message):
    result = runner.invoke(app, arguments, env={"COLUMNS": "2000"})
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("error:") == 1
    assert result.output.strip().count("\n") == 0
    assert "Traceback" not in result.output
