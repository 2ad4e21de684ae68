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
