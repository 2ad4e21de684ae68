import pytest

from fedexperts.algorithms.registry import algorithm_names
from fedexperts.config import ConfigError, load_config
from fedexperts.federation.flower.runconfig import config_from_run_config, config_to_run_config


def test_every_config_key_round_trips_through_a_flat_flower_run_config():
    config = load_config(
        None,
        [
            "algorithm.name=fedmoe",
            "algorithm.fedmoe.budgets=[100000000, 200000000]",
            "federation.clients=2",
            "federation.min_clients=2",
            "eval.max_examples=7",
            'algorithm.lora.targets=["q_proj", "v_proj"]',
        ],
    )
    flat = config_to_run_config(config)
    assert all(isinstance(value, bool | int | float | str) for value in flat.values())
    assert flat["algorithm.fedmoe.budgets"] == "100000000,200000000"
    assert flat["algorithm.lora.targets"] == "q_proj,v_proj"
    assert flat["model.experts_implementation"] == ""  # None travels as the empty string
    back = config_from_run_config(flat)
    expected = config.model_copy(update={"output_dir": config.output_dir.resolve()})
    assert back == expected


@pytest.mark.parametrize(
    "overrides",
    [
        *([f"algorithm.name={name}"] for name in algorithm_names()),
        ["algorithm.name=fedavg", 'algorithm.scope="non-expert"'],
        ["algorithm.name=dense", "algorithm.expert_weighting=tokens", "algorithm.server.variant=flower"],
        ["algorithm.name=fedavg", "algorithm.server.rule=fedadam", "algorithm.server.lr=0.5"],
        ["algorithm.flex.calibration_tokens=512"],
        ["algorithm.flex.personal_training=lora", "algorithm.flex.personal_lora.rank=4"],
    ],
)
def test_each_algorithm_round_trips_with_every_key_present(overrides):
    """A flat run config carries every key, set or not: no validator may read "was this key given"."""
    config = load_config(None, overrides)
    back = config_from_run_config(config_to_run_config(config))
    assert back == config.model_copy(update={"output_dir": config.output_dir.resolve()})


def test_a_run_config_override_is_validated_like_any_config():
    flat = config_to_run_config(load_config(None, []))
    assert config_from_run_config({**flat, "federation.rounds": 9}).federation.rounds == 9
    with pytest.raises(ConfigError, match=r"federation\.rounds"):
        config_from_run_config({**flat, "federation.rounds": 0})
    with pytest.raises(ConfigError, match=r"algorithm\.fedmoe\.budgets"):
        config_from_run_config({**flat, "algorithm.fedmoe.budgets": "12,lots"})
