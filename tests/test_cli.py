import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from fedexperts import planning
from fedexperts.cli import app
from fedexperts.config import build_config, load_config
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
    for position in (1, 2, 3):  # not a terminal: a line per client as it finishes
        assert f"round 1/1, client-{position - 1} ({position}/3): done" in result.output
        assert f"final evaluation, client-{position - 1} ({position}/3): done" in result.output
    assert "client-2" in result.output and "mean" in result.output
    wrote = [line for line in result.output.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and wrote[0].endswith("plot_bytes.png")  # long paths are not wrapped
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
    wrong = runner.invoke(app, ["compare", *args, "--algorithms", "local,fedavg", "--reference", "flex"])
    assert wrong.exit_code == 2 and "--reference 'flex' is not one of the compared methods" in wrong.output
    assert not (tmp_path / "default").exists()  # refused before any run
    command = ["compare", *args, "--algorithms", "local,fedavg", "--seeds", "0,1", "--reference", "fedavg"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "paired by seed: fedavg − each method" in result.output
    assert (tmp_path / "default" / "comparison.md").is_file()
    text = (tmp_path / "default" / "comparison.md").read_text()
    assert "local" in text and "fedavg" in text and "±" in text
    assert "## fedavg − local, paired by seed" in text and "cannot give p below 0.5" in text
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


@pytest.mark.parametrize(
    "model_type",
    [
        "glm4_moe",
        "glm4_moe_lite",
        "llama4_text",
        "minimax_m2",
        "minimax",
        "deepseek_v32",
        "ernie4_5_moe",
        "hunyuan_v1_moe",
        "dots1",
    ],
)
def test_cli_plans_a_tiny_config_folder_of_each_family(model_type, tmp_path):
    from fedexperts.models.tiny import tiny_config
    from fedexperts.moe import FAMILIES

    tiny_config(model_type).to_json_file(tmp_path / "config.json")
    result = runner.invoke(app, ["plan", str(tmp_path), "--algorithm", "flex"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{FAMILIES[model_type].display_name} ({model_type})" in result.output


def test_cli_families_prints_the_table_and_writes_it(tmp_path):
    from fedexperts.planning.support import BEGIN, END

    printed = runner.invoke(app, ["families"])
    assert printed.exit_code == 0 and "| `llama4_text` | Llama 4 (text) |" in printed.output
    target = tmp_path / "README.md"
    target.write_text(f"{BEGIN}\n{END}\n")
    assert runner.invoke(app, ["families", "--write", str(target)]).exit_code == 0
    assert printed.output.strip() in target.read_text()


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


# -- the command line itself ---------------------------------------------------------------------------
def test_version_is_the_installed_one():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"fedexperts {version('fedexperts')}\n"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["compare"],
        ["report"],
        ["partition"],
        ["plan"],
        ["config", "show"],
        ["flower", "simulate"],
        ["flower", "app"],
    ],
    ids=lambda command: " ".join(command) or "fedexperts",
)
def test_dash_h_is_help_everywhere_and_brackets_survive_rich_markup(command):
    result = runner.invoke(app, [*command, "-h"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "``" not in result.output
    if command in (["run"], ["compare"], ["config", "show"], ["flower", "simulate"], ["flower", "app"]):
        assert "[CONFIG.toml] [KEY=VALUE]..." in result.output
    if command == ["plan"]:
        assert "whose [algorithm] section" in result.output


def _absolute(config):
    """``config`` with ``output_dir`` absolute (config show writes paths absolute)."""
    return config.model_copy(update={"output_dir": config.output_dir.absolute()})


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["algorithm.name=fedprox", "algorithm.mu=0.1", "algorithm.lora.targets=['q_proj']", "federation.rounds=7"],
        ["algorithm.name=fedmoe", "federation.clients=2", "algorithm.fedmoe.budgets=[1000, 2000]"],
        ["algorithm.name=dense", "algorithm.expert_weighting=tokens", "algorithm.server.rule=fedyogi"],
        ["data.categories=['a', 'b']", "train.max_grad_norm=0.5", "eval.rouge_tokenizer=characters"],
    ],
)
@pytest.mark.parametrize("every_key", [False, True])
def test_config_show_prints_toml_that_reads_back_as_the_same_config(tmp_path, overrides, every_key):
    shown = runner.invoke(app, ["config", "show", *overrides, *(["--defaults"] if every_key else [])])
    assert shown.exit_code == 0, shown.output
    path = tmp_path / "shown.toml"
    path.write_text(shown.output)
    assert _absolute(load_config(path)) == _absolute(load_config(None, overrides))
    again = runner.invoke(app, ["config", "show", str(path), *(["--defaults"] if every_key else [])])
    assert again.output == shown.output
    if every_key:
        assert "# Number of clients (each gets its own partition of the data).\n# an integer >= 1" in shown.output
    else:
        assert "clients = " not in shown.output or "federation.clients=2" in overrides


def test_config_show_of_a_file_writes_its_relative_paths_absolute(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "rows.jsonl").write_text("")
    (tmp_path / "exp" / "exp.toml").write_text('[data]\nsource = "rows.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    shown = runner.invoke(app, ["config", "show", "exp/exp.toml"])
    assert f'source = "{tmp_path / "exp" / "rows.jsonl"}"' in shown.output
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "shown.toml").write_text(shown.output)
    monkeypatch.chdir(other)
    assert load_config("shown.toml").data.source == str(tmp_path / "exp" / "rows.jsonl")


_FAIL_IN_A_ROUND = """
import sys
import torch
import fedexperts.federation.server as server

def checkpoint(self, global_state):
    secret = {"input_ids": torch.arange(987650, 987660), "weights": torch.full((4, 4), 7.125)}
    raise RuntimeError("the checkpoint could not be written")

server.Federation._checkpoint = checkpoint
from fedexperts.cli import app
app(sys.argv[1:], prog_name="fedexperts")
"""


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_error_in_a_run_is_a_short_traceback_without_locals(micro_model_path, tmp_path, debug):
    args = micro_args(micro_model_path, tmp_path, "eval.union_examples=0", "eval.probes=0", "federation.clients=2")
    command = [sys.executable, "-c", _FAIL_IN_A_ROUND, *(["--debug"] if debug else []), "run", *args]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "RuntimeError: the checkpoint could not be written" in output
    assert "tensor(" not in output and "987650" not in output and "7.125" not in output, output
    assert "secret" not in output and "Instruction" not in output  # no locals, no data rows
    assert ("Traceback (most recent call last)" in output) == debug
    if not debug:
        assert "--debug" in output and len(output.splitlines()) < 20, output


@pytest.mark.parametrize(
    "args",
    [
        ["run", "algorithm.name=nosuch"],
        ["run", "data.source=missing.jsonl"],
        ["run", "model.name=./missing"],
        ["compare", "federation.clinets=2"],
        ["flower", "simulate", "train.lr=1"],
        ["config", "show", "algorithm.name=nosuch"],
        ["partition", "missing.csv"],
        ["export", "missing-run", "--global", "--out", "exported"],
        ["generate", "missing-folder", "a prompt"],
    ],
    ids=" ".join,
)
def test_a_config_or_path_error_is_reported_before_torch_or_transformers_load(tmp_path, args):
    code = (
        "import sys, json\n"
        "from fedexperts.cli import app\n"
        "try:\n    app(sys.argv[1:])\n"
        "except SystemExit as exit:\n"
        "    heavy = [name for name in ('torch', 'transformers', 'datasets') if name in sys.modules]\n"
        "    print(json.dumps({'code': exit.code, 'heavy': heavy}))\n"
    )
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, env=offline
    )
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"code": 2, "heavy": []}, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
