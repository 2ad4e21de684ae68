import subprocess
import sys

import pytest

from fedexperts.algorithms import ServerRule, SharedScope
from fedexperts.config import ConfigError, ExperimentConfig, load_config, parse_override


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
        (["algorithm.name=fedsgd"], r"algorithm\.name: .*'local', 'fedavg', .*'flex', .*'fedmoe' or 'random-moe'"),
        (["algorithm.server.rule=sgd"], r"allowed: 'fedavg', 'fedavgm'"),
        (["train.lr=1"], r"override 'train\.lr': unknown key; keys are: .*train\.learning_rate"),
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
