import math

import pytest
import torch

from fedexperts.algorithms import ServerConfig, ServerOptimizer, ServerRule, weighted_average
from fedexperts.algorithms.settings import ServerVariant
from fedexperts.errors import FedExpertsError


def test_average_of_identical_clients_is_a_no_op():
    state = {"w": torch.randn(3, 2), "b": torch.randn(2).to(torch.bfloat16)}
    averaged = weighted_average([(state, 5.0), (state, 17.0), (state, 1.0)])
    assert torch.equal(averaged["w"], state["w"]) and torch.equal(averaged["b"], state["b"])
    assert averaged["b"].dtype == torch.bfloat16


def test_average_is_weighted_by_example_counts():
    averaged = weighted_average([({"w": torch.tensor([0.0, 4.0])}, 1.0), ({"w": torch.tensor([4.0, 0.0])}, 3.0)])
    torch.testing.assert_close(averaged["w"], torch.tensor([3.0, 1.0]))


def test_bad_averages_are_refused():
    with pytest.raises(FedExpertsError, match="zero updates"):
        weighted_average([])
    with pytest.raises(FedExpertsError, match="positive"):
        weighted_average([({"w": torch.zeros(1)}, 0.0)])
    with pytest.raises(FedExpertsError, match="disagree on keys"):
        weighted_average([({"w": torch.zeros(1)}, 1.0), ({"v": torch.zeros(1)}, 1.0)])


def test_fedavg_with_unit_lr_returns_the_average():
    optimizer = ServerOptimizer(ServerConfig(rule=ServerRule.FEDAVG))
    new = optimizer.step({"w": torch.tensor([1.0]), "frozen": torch.tensor([7.0])}, {"w": torch.tensor([3.0])})
    assert new == {"w": torch.tensor([3.0]), "frozen": torch.tensor([7.0])}


def test_fedavgm_hand_worked():
    # x0 = 1, deltas 2 then 1, momentum 0.5, lr 1: v1 = 2, x1 = 3; v2 = 0.5 * 2 + 1 = 2, x2 = 5
    optimizer = ServerOptimizer(ServerConfig(rule=ServerRule.FEDAVGM, lr=1.0, momentum=0.5))
    x1 = optimizer.step({"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])})
    assert x1["w"].item() == pytest.approx(3.0)
    x2 = optimizer.step(x1, {"w": torch.tensor([4.0])})
    assert x2["w"].item() == pytest.approx(5.0)


def test_fedadam_hand_worked():
    # x0 = 0, delta = 1, beta1 0.9, beta2 0.99, tau 0.1, lr 0.5, v_{-1} = tau^2 = 0.01
    # m = 0.1; v = 0.99 * 0.01 + 0.01 * 1 = 0.0199; x = 0.5 * 0.1 / (sqrt(0.0199) + 0.1)
    optimizer = ServerOptimizer(ServerConfig(rule=ServerRule.FEDADAM, lr=0.5, beta1=0.9, beta2=0.99, tau=0.1))
    x = optimizer.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])})
    assert x["w"].item() == pytest.approx(0.5 * 0.1 / (math.sqrt(0.0199) + 0.1), rel=1e-6)


def test_fedyogi_hand_worked():
    # v = 0.01 - 0.01 * 1 * sign(0.01 - 1) = 0.02; x = 0.5 * 0.1 / (sqrt(0.02) + 0.1)
    optimizer = ServerOptimizer(ServerConfig(rule=ServerRule.FEDYOGI, lr=0.5, beta1=0.9, beta2=0.99, tau=0.1))
    x = optimizer.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])})
    assert x["w"].item() == pytest.approx(0.5 * 0.1 / (math.sqrt(0.02) + 0.1), rel=1e-6)


def test_fedadagrad_hand_worked():
    # v = 0.01 + 1 = 1.01; x = 0.5 * 0.1 / (sqrt(1.01) + 0.1)
    optimizer = ServerOptimizer(ServerConfig(rule=ServerRule.FEDADAGRAD, lr=0.5, beta1=0.9, tau=0.1))
    x = optimizer.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])})
    assert x["w"].item() == pytest.approx(0.5 * 0.1 / (math.sqrt(1.01) + 0.1), rel=1e-6)


def test_flower_fedadam_bias_corrects_its_step_hand_worked():
    # m = 0.1, v = 0 * 0.99 + 0.01 * 1 = 0.01; Flower's t + 1 = 2: lr * sqrt(1 - 0.99^2) / (1 - 0.9^2)
    config = ServerConfig(rule=ServerRule.FEDADAM, variant=ServerVariant.FLOWER, lr=0.5, tau=0.1)
    x = ServerOptimizer(config).step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])})
    corrected = 0.5 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    assert x["w"].item() == pytest.approx(corrected * 0.1 / (math.sqrt(0.01) + 0.1), rel=1e-6)


def test_flower_fedadagrad_has_no_first_moment_hand_worked():
    # m = delta = 1, v = 0 + 1; x = 0.5 * 1 / (1 + 0.1), whatever beta1 says
    config = ServerConfig(rule=ServerRule.FEDADAGRAD, variant=ServerVariant.FLOWER, lr=0.5, beta1=0.9, tau=0.1)
    x = ServerOptimizer(config).step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])})
    assert x["w"].item() == pytest.approx(0.5 / 1.1, rel=1e-6)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (ServerRule.FEDAVG, 1.0),
        (ServerRule.FEDAVGM, 1.0),
        (ServerRule.FEDADAGRAD, 0.1),
        (ServerRule.FEDADAM, 0.1),
        (ServerRule.FEDYOGI, 0.01),
    ],
)
def test_an_unset_lr_is_the_rules_default_and_a_set_one_wins(rule, expected):
    assert ServerConfig(rule=rule).lr is None
    assert ServerConfig(rule=rule).learning_rate == expected
    assert ServerConfig(rule=rule, lr=1.0).learning_rate == 1.0


def test_adaptive_rules_first_step_is_about_lr_per_coordinate():
    """Why the adaptive defaults are below 1: a mean change well above tau (here 0.5) moves a weight by about lr."""
    for rule in (ServerRule.FEDADAM, ServerRule.FEDYOGI):
        default = ServerOptimizer(ServerConfig(rule=rule)).step({"w": torch.zeros(1)}, {"w": torch.full((1,), 0.5)})
        explicit = ServerOptimizer(ServerConfig(rule=rule, lr=1.0)).step(
            {"w": torch.zeros(1)}, {"w": torch.full((1,), 0.5)}
        )
        lr = ServerConfig(rule=rule).learning_rate
        assert 0.5 * lr < default["w"].item() < lr
        assert explicit["w"].item() == pytest.approx(default["w"].item() / lr, rel=1e-6)


@pytest.mark.parametrize("variant", list(ServerVariant))
@pytest.mark.parametrize("rule", list(ServerRule))
def test_state_round_trip_continues_identically(rule, variant):
    start = {"w": torch.tensor([0.5, -1.0])}
    targets = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([3.0, 1.0])}]
    config = ServerConfig(rule=rule, variant=variant, lr=0.3)
    uninterrupted = ServerOptimizer(config)
    x = start
    for target in targets:
        x = uninterrupted.step(x, target)
    first = ServerOptimizer(config)
    y = first.step(start, targets[0])
    resumed = ServerOptimizer(config)
    resumed.load_state(first.state())
    for target in targets[1:]:
        y = resumed.step(y, target)
    torch.testing.assert_close(y["w"], x["w"])


def test_unknown_state_tensor_is_refused():
    with pytest.raises(FedExpertsError, match="not a server-optimizer tensor"):
        ServerOptimizer().load_state({"velocity/w": torch.zeros(1)})
