"""``algorithm.expert_weighting = "tokens"``: experts averaged by the tokens clients routed to them."""

import pytest
import torch
from pydantic import ValidationError

from fedexperts.algorithms import MoEAsDense, RandomExpert
from fedexperts.algorithms.expert_weighting import EXPERT_TOKENS_KEY, keep_rows, token_weighted_average
from fedexperts.algorithms.fedavg.config import DenseConfig, FedAvgConfig
from fedexperts.algorithms.random_expert.config import RandomExpertConfig
from fedexperts.algorithms.registry import owners, parse_algorithm
from fedexperts.algorithms.settings import ExpertWeighting, ServerConfig, ServerRule
from fedexperts.config import TrainConfig
from fedexperts.interface import ClientInfo, ClientUpdate, LocalData, Payload, PayloadError
from fedexperts.models import tiny_model
from fedexperts.moe import ExpertSlot, RoutingRecorder, expert_slots, moe_layers
from fedexperts.training import train_local
from tests.algorithms.helpers import batches_for

TOKENS = ExpertWeighting.TOKENS
EXPERTS = "layer.experts.down_proj"
ROUTER = "layer.gate.weight"
SLOTS = {EXPERTS: ExpertSlot("layer"), ROUTER: ExpertSlot("layer")}


def _rows(*values):
    """A ``[3, 2]`` tensor whose row ``e`` is ``values[e]`` everywhere: three experts, or three router rows."""
    return torch.tensor([[float(v)] * 2 for v in values])


def test_tokens_weigh_each_expert_by_the_tokens_routed_to_it_hand_worked():
    # Client a (1 example) routed 6, 2, 0 tokens to experts 0, 1, 2; client b (3 examples) 2, 0, 0.
    # Tokens: expert 0 = (6 * 1 + 2 * 5) / 8 = 2, expert 1 = a's own 2, expert 2 = nobody's: global 0.
    # Examples: (1 * a + 3 * b) / 4 = 4, 5, 6 per expert; the non-expert tensor is (4 + 3 * 8) / 4 = 7 either way.
    global_state = {EXPERTS: _rows(0, 0, 0), ROUTER: _rows(0, 0, 0), "attention": torch.tensor([0.0])}
    a = {EXPERTS: _rows(1, 2, 3), ROUTER: _rows(1, 2, 3), "attention": torch.tensor([4.0])}
    b = {EXPERTS: _rows(5, 6, 7), ROUTER: _rows(5, 6, 7), "attention": torch.tensor([8.0])}
    tokens = ({"layer": [6, 2, 0]}, {"layer": [2, 0, 0]})
    averaged, unrouted = token_weighted_average(global_state, [(a, 1.0, tokens[0]), (b, 3.0, tokens[1])], SLOTS)
    for key in SLOTS:
        torch.testing.assert_close(averaged[key], _rows(2, 2, 0))
        assert unrouted[key].tolist() == [False, False, True]
    torch.testing.assert_close(averaged["attention"], torch.tensor([7.0]))
    by_examples, _ = token_weighted_average(global_state, [(a, 1.0, tokens[0]), (b, 3.0, tokens[1])], {})
    torch.testing.assert_close(by_examples[EXPERTS], _rows(4, 5, 6))


def test_a_tensor_that_is_one_whole_expert_weighs_that_experts_tokens():
    slots = {
        "layer.experts.expert_1.wi.weight": ExpertSlot("layer", 1),
        "layer.experts.expert_2.wi.weight": ExpertSlot("layer", 2),
    }
    global_state = {name: torch.zeros(2) for name in slots}
    a = {name: torch.full((2,), 1.0) for name in slots}
    b = {name: torch.full((2,), 4.0) for name in slots}
    averaged, unrouted = token_weighted_average(
        global_state, [(a, 5.0, {"layer": [9, 1, 0]}), (b, 1.0, {"layer": [0, 2, 0]})], slots
    )
    torch.testing.assert_close(averaged["layer.experts.expert_1.wi.weight"], torch.full((2,), 3.0))  # (1 + 2 * 4) / 3
    torch.testing.assert_close(averaged["layer.experts.expert_2.wi.weight"], torch.zeros(2))
    assert unrouted["layer.experts.expert_2.wi.weight"].dim() == 0 and bool(
        unrouted["layer.experts.expert_2.wi.weight"]
    )
    stepped = keep_rows(global_state, {name: torch.full((2,), 9.0) for name in slots}, unrouted)
    assert stepped["layer.experts.expert_2.wi.weight"].tolist() == [0.0, 0.0]
    assert stepped["layer.experts.expert_1.wi.weight"].tolist() == [9.0, 9.0]


def test_expert_slots_name_router_rows_fused_experts_and_expert_modules():
    olmoe = tiny_model("olmoe")
    layer = moe_layers(olmoe)[0]
    slots = expert_slots(olmoe)
    assert slots[f"{layer.router_name}.weight"] == ExpertSlot(layer.name)
    assert slots[f"{layer.experts_name}.gate_up_proj"] == ExpertSlot(layer.name)
    assert not any("self_attn" in name for name in slots)
    switch = tiny_model("switch_transformers")
    first = moe_layers(switch)[0]
    assert expert_slots(switch)[f"{first.experts_name}.expert_3.wi.weight"] == ExpertSlot(first.name, 3)


# -- through an algorithm -----------------------------------------------------------------------------


def _dense(rule=ServerRule.FEDAVG):
    algorithm = MoEAsDense(DenseConfig(expert_weighting=TOKENS, server=ServerConfig(rule=rule, lr=1.0)))
    model = tiny_model("olmoe")
    algorithm.prepare(model)
    return algorithm, model, algorithm.initial_global_state(model)


def _reply(state, shift, tokens, examples=2):
    return Payload(
        {name: value + shift for name, value in state.items()}, {"examples": examples, EXPERT_TOKENS_KEY: tokens}
    )


def _tokens(model, *counts):
    """The same per-expert counts (8 experts) for every MoE layer."""
    return {layer.name: list(counts) for layer in moe_layers(model)}


def test_dense_averages_each_expert_and_its_router_row_by_routed_tokens():
    algorithm, model, state = _dense()
    layer = moe_layers(model)[0]
    a = _reply(state, 1.0, _tokens(model, 3, 0, 1, 0, 0, 0, 0, 0), examples=1)
    b = _reply(state, 5.0, _tokens(model, 1, 2, 0, 0, 0, 0, 0, 0), examples=9)
    updates = []
    for name, payload in (("a", a), ("b", b)):
        info = ClientInfo(name, payload.metadata["examples"])
        algorithm.check_update(payload, state, info)
        updates.append(ClientUpdate(info, payload))
    new = algorithm.aggregate(state, updates)
    shift = torch.tensor([(3 * 1 + 1 * 5) / 4, 5.0, 1.0, 0, 0, 0, 0, 0])  # per expert; nobody routed to 3..7
    for name in (
        f"{layer.router_name}.weight",
        f"{layer.experts_name}.gate_up_proj",
        f"{layer.experts_name}.down_proj",
    ):
        moved = (new[name] - state[name]).flatten(1)
        torch.testing.assert_close(moved, shift.unsqueeze(1).expand_as(moved), atol=1e-5, rtol=0)
    attention = next(name for name in state if "self_attn" in name)
    torch.testing.assert_close(new[attention], state[attention] + (1 * 1 + 9 * 5) / 10, atol=1e-5, rtol=0)


def test_an_expert_nobody_routed_to_keeps_its_value_under_momentum():
    algorithm, model, state = _dense(ServerRule.FEDAVGM)
    name = f"{moe_layers(model)[0].experts_name}.down_proj"
    everyone = _tokens(model, *[1] * 8)
    first = algorithm.aggregate(state, [ClientUpdate(ClientInfo("a", 2), _reply(state, 1.0, everyone))])
    assert not torch.equal(first[name][5], state[name][5])
    second = algorithm.aggregate(
        first, [ClientUpdate(ClientInfo("a", 2), _reply(first, 1.0, _tokens(model, 1, *[0] * 7)))]
    )
    assert torch.equal(second[name][5], first[name][5])  # momentum alone would have moved it
    assert not torch.equal(second[name][0], first[name][0])


@pytest.mark.parametrize(
    ("reported", "refusal"),
    [
        (None, "reports no 'expert_tokens'"),
        ("drop-layer", "must name exactly the MoE layers"),
        ([1] * 7, "must list 8 counts, got 7"),
        ([-1] + [0] * 7, "non-negative integers"),
        ([0.5] + [0] * 7, "non-negative integers"),
        ([True] + [0] * 7, "non-negative integers"),
    ],
    ids=["absent", "missing-layer", "wrong-length", "negative", "fraction", "boolean"],
)
def test_reported_token_counts_are_checked(reported, refusal):
    algorithm, model, state = _dense()
    tokens = _tokens(model, *[1] * 8)
    metadata = {"examples": 2}
    if reported == "drop-layer":
        metadata[EXPERT_TOKENS_KEY] = dict(list(tokens.items())[1:])
    elif reported is not None:
        metadata[EXPERT_TOKENS_KEY] = {**tokens, moe_layers(model)[0].name: reported}
    with pytest.raises(PayloadError, match=refusal):
        algorithm.check_update(Payload(dict(state), metadata), state, ClientInfo("c", 2))
    algorithm.check_update(Payload(dict(state), {"examples": 2, EXPERT_TOKENS_KEY: tokens}), state, ClientInfo("c", 2))


def test_random_experts_chosen_row_weighs_the_tokens_routed_to_that_expert():
    algorithm = RandomExpert(RandomExpertConfig(expert_weighting=TOKENS))
    model = tiny_model("olmoe")
    algorithm.prepare(model)
    state = algorithm.initial_global_state(model)
    rows = [name for name in state if "@expert=" in name]
    chosen = {layer.name: algorithm.chosen[f"{layer.experts_name}.down_proj"] for layer in moe_layers(model)}

    def tokens(count):
        return {layer: [count if e == expert else 7 for e in range(8)] for layer, expert in chosen.items()}

    a, b = _reply(state, 1.0, tokens(4), examples=1), _reply(state, 3.0, tokens(0), examples=5)
    updates = [ClientUpdate(ClientInfo(n, p.metadata["examples"]), p) for n, p in (("a", a), ("b", b))]
    for update in updates:
        algorithm.check_update(update.payload, state, update.client)
    new = algorithm.aggregate(state, updates)
    for name in rows:  # b routed nothing to the chosen expert: a's row alone
        torch.testing.assert_close(new[name], state[name] + 1.0)


def test_the_option_belongs_to_algorithms_that_share_experts():
    assert set(owners("expert_weighting")) == {"fedavg", "fedprox", "dense", "random-expert", "fedmoe", "random-moe"}
    assert parse_algorithm({"name": "fedavg", "scope": "everything", "expert_weighting": "tokens"})
    assert parse_algorithm({"name": "fedavg", "scope": "non-expert", "expert_weighting": "tokens"})  # router rows
    with pytest.raises(ValidationError, match="scope 'attention-lora' shares none"):
        FedAvgConfig(expert_weighting=TOKENS)
    with pytest.raises(ValidationError, match="personal = true"):
        RandomExpertConfig(expert_weighting=TOKENS, personal=True)


# -- the client's counting ----------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_training_counts_each_real_token_once_per_routed_expert(checkpointing):
    algorithm = MoEAsDense(DenseConfig(expert_weighting=TOKENS))
    model = tiny_model("olmoe")
    algorithm.prepare(model)
    batches = batches_for(model, seed=0, count=2)
    batches[1]["attention_mask"][:, -3:] = 0  # padding is not routed
    real = sum(int(batch["attention_mask"].sum()) for batch in batches)
    context = algorithm.setup_client(
        model, Payload(algorithm.initial_global_state(model)), None, LocalData(ClientInfo("c", 8))
    )
    assert algorithm.counts_routing
    recorder = RoutingRecorder(model)
    settings = TrainConfig(steps_per_round=2, learning_rate=1e-3, gradient_checkpointing=checkpointing)
    train_local(context.model, batches, settings, routing=recorder)
    for layer in moe_layers(model):
        counts = recorder.counts()[layer.name]
        assert int(counts.sum()) == real * layer.top_k and counts.dtype == torch.long
    context.routed_tokens = {name: counts.tolist() for name, counts in recorder.counts().items()}
    sent = algorithm.uplink(context)
    assert sent.metadata[EXPERT_TOKENS_KEY] == context.routed_tokens
    algorithm.check_update(sent, algorithm.initial_global_state(model), ClientInfo("c", 8))
