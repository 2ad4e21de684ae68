import subprocess
import sys
from pathlib import Path

import pytest

from fedexperts.algorithms import ServerRule, SharedScope
from fedexperts.config import ConfigError, ExperimentConfig, check_local_paths, load_config, parse_override


def test_default_config_is_valid():
    config = load_config()
    assert config == ExperimentConfig()
    assert config.algorithm.scope is SharedScope.ATTENTION_LORA


def test_toml_file_and_dotted_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('name = "x"\n[federation]\nrounds = 7\n[algorithm.server]\nrule = "fedadam"\n')
    config = load_config(path, ["train.learning_rate=3e-4", "federation.rounds=2", "data.source=alpaca.json"])
    assert config.name == "x" and config.federation.rounds == 2
    assert config.algorithm.server.rule is ServerRule.FEDADAM
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.data.source == "alpaca.json"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.rounds=0"], r"federation\.rounds: Input should be greater than or equal to 1"),
        (
            ["algorithm.name=fedsgd"],
            r"algorithm\.name: .*'local', 'fedavg', .*'flex', .*'fedmoe', 'random-moe', .*'ffa-lora' or 'feddpa'",
        ),
        (["algorithm.server.rule=sgd"], r"rule: Input should be 'fedavg', 'fedavgm'"),
        (["train.lr=1"], r"override 'train\.lr': unknown key \(did you mean train\.learning_rate\?\)"),
        (["rounds"], "expected dotted.key=value"),
        (["federation.min_clients=9"], r"min_clients \(9\) exceeds federation\.clients \(5\)"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm.name=fedavg", "algorithm.flex.top_n=2"],
            r"algorithm\.flex: not a setting of algorithm 'fedavg' \(it belongs to flex\)",
        ),
        (
            ["algorithm.name=fedavg", "algorithm.mu=0.1"],
            r"algorithm\.mu: not a setting of algorithm 'fedavg' \(it belongs to fedprox\)",
        ),
        (
            ["algorithm.name=fedmoe", "algorithm.fedmoe.seed=1"],
            r"algorithm\.fedmoe\.seed: .* 'fedmoe' \(it belongs to random-moe\)",
        ),
        (
            ["algorithm.name=dense", "algorithm.scope=attention"],
            r"algorithm\.scope: not a setting of algorithm 'dense'",
        ),
        (
            ["algorithm.name=fedavg", "algorithm.scope=attention", "algorithm.lora.rank=4"],
            r"algorithm\.lora applies to scope attention-lora only",
        ),
        (["algorithm.scope=everything"], r"algorithm\.scope: .*FLEx keeps them frozen"),
        (
            ["algorithm.name=fedmoe", "algorithm.fedmoe.budgets=[1, 2]"],
            r"budgets has 2 entries but federation\.clients is 5",
        ),
    ],
)
def test_a_key_of_another_algorithm_is_an_error_naming_its_owner(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_each_algorithm_gets_its_own_config_and_file_sections_default_to_flex(tmp_path):
    assert type(load_config(None, ["algorithm.name=fedprox", "algorithm.mu=0.5"]).algorithm).__name__ == "FedProxConfig"
    path = tmp_path / "exp.toml"
    path.write_text("[algorithm.flex]\ntop_n = 2\n")
    assert load_config(path).algorithm.flex.top_n == 2


def test_validating_a_config_does_not_import_torch():
    code = (
        "import sys; from fedexperts.config import ConfigError, load_config\n"
        "try: load_config(None, ['algorithm.name=fedavg', 'algorithm.flex.top_n=2'])\n"
        "except ConfigError: pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_key_in_file_and_bad_files(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[train]\nlearning_rat = 1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rat: unknown key"):
        load_config(path)
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_override_values_are_read_as_toml():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=hello world") == (["a"], "hello world")


def test_the_validation_split_defaults_by_whether_the_algorithm_decides_on_it():
    assert load_config(None, []).validation_fraction == 0.0  # flex decides nothing on validation scores
    assert load_config(None, ["algorithm.name=fedmoe"]).validation_fraction == 0.1
    assert load_config(None, ["algorithm.name=random-moe"]).validation_fraction == 0.1  # the same rows as FedMoE
    assert load_config(None, ["algorithm.name=fedmoe", "data.validation_fraction=0.2"]).validation_fraction == 0.2
    with pytest.raises(ConfigError, match=r"data\.validation_fraction is 0 but algorithm 'fedmoe' decides"):
        load_config(None, ["algorithm.name=fedmoe", "data.validation_fraction=0"])


def test_relative_paths_in_a_file_are_relative_to_its_folder_and_overrides_to_the_working_directory(
    tmp_path, monkeypatch
):
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "rows.jsonl").write_text("")
    (folder / "model").mkdir()
    path = folder / "exp.toml"
    path.write_text(
        'output_dir = "out"\n[model]\nname = "model"\n[data]\nsource = "rows.jsonl"\n[eval]\nmmlu = "../mmlu"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.output_dir == folder / "out"
    assert config.model.name == str(folder / "model")
    assert config.data.source == str(folder / "rows.jsonl")
    assert config.eval.mmlu == tmp_path / "mmlu"
    overridden = load_config(path, ["data.source=other.jsonl", "output_dir=runs"])
    assert overridden.data.source == "other.jsonl" and overridden.output_dir == Path("runs")


def test_keywords_and_hub_names_in_a_file_stay_as_they_are(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[model]\nname = "Qwen/Qwen1.5-MoE-A2.7B"\n[data]\nsource = "databricks/databricks-dolly-15k"\n')
    config = load_config(path)
    assert config.model.name == "Qwen/Qwen1.5-MoE-A2.7B" and config.data.source == "databricks/databricks-dolly-15k"
    path.write_text('[model]\nname = "builtin"\n[data]\nsource = "expertbench"\n')
    assert load_config(path) == load_config(None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.source=missing.jsonl"], r"data\.source: no such file or folder: missing\.jsonl"),
        (["data.source=./missing"], r"data\.source: no such file or folder"),
        (["data.source=notes.txt"], r"data\.source: notes\.txt is not one of \.json"),
        (["model.name=./nowhere"], r"model\.name: no such folder: \./nowhere"),
        (["model.name=./notes.txt"], r"model\.name: is a file, not \./notes\.txt"),
        (["model.name=./empty"], r"model\.name: \./empty holds no config\.json"),
        (["eval.mmlu=missing"], r"eval\.mmlu: no such file or folder: missing"),
        (["output_dir=notes.txt"], r"output_dir: notes\.txt is a file"),
    ],
)
def test_local_paths_that_cannot_work_are_named(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    config = load_config(None, overrides)  # valid as a config: the paths may exist where a deployment runs
    with pytest.raises(ConfigError, match=message):
        check_local_paths(config)


def test_paths_that_can_work_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text("instruction,response\nq,a\n")
    check_local_paths(load_config(None, ["data.source=rows.csv"]))
    check_local_paths(load_config(None, ["data.source=databricks/databricks-dolly-15k"]))  # a hub name
    check_local_paths(load_config(None))


def test_an_unknown_key_suggests_the_near_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean federation\.clients"):
        load_config(None, ["federation.clinets=3"])
    path = tmp_path / "exp.toml"
    path.write_text("[data]\nmaxlength = 3\n")
    with pytest.raises(ConfigError, match=r"data\.maxlength: unknown key \(did you mean data\.max_length\?\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"[train\n", "not valid TOML"), (b'name = "caf\xe9"\n', "not UTF-8 text")],
)
def test_unreadable_config_files_are_named(tmp_path, content, message):
    path = tmp_path / "exp.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"{path}: {message}"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a folder"):
        load_config(tmp_path)


def test_a_fraction_written_as_a_decimal_of_a_count_samples_that_count():
    from fedexperts.config import round_size

    assert 7 / 25 * 25 > 7  # the float product is 7.000000000000001
    assert round_size(25, 7 / 25, 1) == 7 and round_size(30, 5 / 30, 1) == 5
    assert round_size(30, 0.1, 1) == 3 and round_size(30, 0.17, 1) == 6


def test_builtin_models_may_be_named_with_a_dash(tmp_path, monkeypatch):
    assert load_config(None, ["model.name=builtin-switch-8"]).model.name == "builtin:switch-8"
    assert load_config(None, ["model.name=builtin:switch-32"]).model.name == "builtin:switch-32"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "builtin-mine").mkdir()  # a folder of that name is the folder
    assert load_config(None, ["model.name=builtin-mine"]).model.name == "builtin-mine"
