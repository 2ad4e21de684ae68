"""``algorithm.server.variant = "flower"`` computes what Flower's own strategies compute on the same replies.

Each round drives the real strategy the way a ServerApp does: ``configure_train`` (which records the
arrays it sends) and then ``aggregate_train`` on reply Messages. Flower's Messages need the run, node and
task ids that its runtime sets in ``TaskIdentity``, and ``configure_train`` samples nodes from a Grid; the
test sets the ids (restored afterwards) and hands it a one-method stand-in for the Grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from flwr.supercore.task_identity import TaskIdentity

from fedexperts.algorithms import ServerConfig, ServerOptimizer, ServerRule, weighted_average
from fedexperts.algorithms.settings import DEFAULT_SERVER_LR, ServerVariant

EXAMPLES = (3, 5, 11)
ROUNDS = 3


class _Nodes:
    """What ``configure_train`` asks of a Grid: the connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _strategy(rule: ServerRule, config: ServerConfig) -> Any:
    sampling = {"min_train_nodes": len(EXAMPLES), "min_available_nodes": len(EXAMPLES)}
    if rule is ServerRule.FEDAVG:
        return flower.FedAvg(**sampling)
    if rule is ServerRule.FEDAVGM:
        return flower.FedAvgM(server_learning_rate=config.learning_rate, server_momentum=config.momentum, **sampling)
    adaptive = {"eta": config.learning_rate, "tau": config.tau, **sampling}
    if rule is ServerRule.FEDADAGRAD:
        return flower.FedAdagrad(**adaptive)
    kind = flower.FedAdam if rule is ServerRule.FEDADAM else flower.FedYogi
    return kind(beta_1=config.beta1, beta_2=config.beta2, **adaptive)


def _replies(state: dict[str, torch.Tensor], round_number: int, scale: float) -> list[dict[str, torch.Tensor]]:
    """Each client's trained tensors: the global state plus a seeded change (the same whatever the state's dtype)."""
    generator = torch.Generator().manual_seed(round_number)
    scale = scale * 0.5 ** (round_number - 1)
    return [
        {
            key: value + (scale * torch.randn(value.shape, generator=generator, dtype=torch.float64)).to(value.dtype)
            for key, value in state.items()
        }
        for _ in EXAMPLES
    ]


def _flower_rounds(
    rule: ServerRule, config: ServerConfig, start: dict[str, torch.Tensor], scale: float = 0.5
) -> list[dict[str, Any]]:
    strategy = _strategy(rule, config)
    arrays = ArrayRecord({key: Array(value.numpy()) for key, value in start.items()})
    rounds = []
    for round_number in range(1, ROUNDS + 1):
        sent = list(strategy.configure_train(round_number, arrays, ConfigRecord(), _Nodes()))
        state = {key: torch.from_numpy(array.numpy()) for key, array in arrays.items()}
        trained = dict(zip(range(1, len(EXAMPLES) + 1), _replies(state, round_number, scale), strict=True))
        weights = dict(zip(range(1, len(EXAMPLES) + 1), EXAMPLES, strict=True))
        replies = []
        for message in sent:
            node = message.metadata.dst_node_id
            content = RecordDict(
                {
                    "arrays": ArrayRecord({key: Array(value.numpy()) for key, value in trained[node].items()}),
                    "metrics": MetricRecord({"num-examples": weights[node]}),
                }
            )
            replies.append(Message(content, reply_to=message))
        arrays, _ = strategy.aggregate_train(round_number, replies)
        rounds.append({key: array.numpy() for key, array in arrays.items()})
    return rounds


def _fedexperts_rounds(
    config: ServerConfig, start: dict[str, torch.Tensor], scale: float = 0.5
) -> list[dict[str, Any]]:
    optimizer = ServerOptimizer(config)
    state = dict(start)
    rounds = []
    for round_number in range(1, ROUNDS + 1):
        trained = _replies(state, round_number, scale)
        averaged = weighted_average([(tensors, float(n)) for tensors, n in zip(trained, EXAMPLES, strict=True)])
        state = optimizer.step(state, averaged)
        rounds.append({key: value.numpy() for key, value in state.items()})
    return rounds


@pytest.fixture
def flower_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for attribute, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attribute, value)


def _start(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "attn.lora_A": torch.randn(4, 6, generator=generator, dtype=dtype),
        "experts.gate_up_proj": torch.randn(3, 2, 5, generator=generator, dtype=dtype),
    }


@pytest.mark.usefixtures("flower_run")
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-9), (torch.float32, 1e-6)], ids=["float64", "float32"]
)
@pytest.mark.parametrize("rule", list(ServerRule), ids=str)
def test_flower_variant_matches_flowers_strategies(rule: ServerRule, dtype: torch.dtype, tolerance: float) -> None:
    """Three rounds on the same replies agree within rounding (float32: relative too, Flower sums the replies
    in the random order it sampled them, and its FedAdam returns float64 for float32 arrays)."""
    config = ServerConfig(rule=rule, variant=ServerVariant.FLOWER, momentum=0.9)
    start = _start(dtype)
    ours, theirs = _fedexperts_rounds(config, start), _flower_rounds(rule, config, start)
    relative = 0.0 if dtype is torch.float64 else tolerance
    for round_number, (mine, flowers) in enumerate(zip(ours, theirs, strict=True), start=1):
        for key, value in flowers.items():
            np.testing.assert_allclose(
                mine[key], value, rtol=relative, atol=tolerance, err_msg=f"round {round_number}: {key}"
            )
    moved = max(float(np.abs(theirs[-1][key] - start[key].numpy()).max()) for key in start)
    assert moved > 1e-3  # the rule did something worth comparing


@pytest.mark.usefixtures("flower_run")
@pytest.mark.parametrize("rule", [ServerRule.FEDADAGRAD, ServerRule.FEDADAM, ServerRule.FEDYOGI], ids=str)
def test_paper_variant_is_not_flowers(rule: ServerRule) -> None:
    """The readings differ on client changes of the order of ``tau`` (LoRA's, in a real run), where the second
    moment's start matters; else the variant would be a no-op."""
    start = _start(torch.float64)
    paper = _fedexperts_rounds(ServerConfig(rule=rule), start, scale=1e-3)[-1]
    flowers = _flower_rounds(rule, ServerConfig(rule=rule), start, scale=1e-3)[-1]
    assert max(float(np.abs(paper[key] - flowers[key]).max()) for key in start) > 1e-3


@pytest.mark.parametrize("rule", list(ServerRule), ids=str)
def test_default_hyperparameters_are_flowers(rule: ServerRule) -> None:
    """Unset ``lr`` and the betas and tau are what Flower's strategies default to (FedAvgM's momentum is not:
    Flower's 0 would make it FedAvg)."""
    strategy = _strategy(rule, ServerConfig(rule=rule))
    defaults = type(strategy)()
    config = ServerConfig(rule=rule)
    assert config.lr is None and config.learning_rate == DEFAULT_SERVER_LR[rule]
    if rule is ServerRule.FEDAVGM:
        assert defaults.server_learning_rate == config.learning_rate and defaults.server_momentum == 0.0
    elif rule is not ServerRule.FEDAVG:
        assert (defaults.eta, defaults.tau) == (config.learning_rate, config.tau)
        if rule is not ServerRule.FEDADAGRAD:
            assert (defaults.beta_1, defaults.beta_2) == (config.beta1, config.beta2)
