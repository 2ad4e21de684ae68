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
