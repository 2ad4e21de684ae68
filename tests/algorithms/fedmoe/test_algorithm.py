"""FedMoE and randomMoE on the tiny OLMoE: payloads, modular aggregation, stage 1, stage 2, per-client state."""

import dataclasses

import pytest
import torch

from fedexperts.algorithms import build_algorithm
from fedexperts.algorithms.expert_weighting import EXPERT_TOKENS_KEY
from fedexperts.algorithms.fedmoe.activation import estimate_activation
from fedexperts.algorithms.fedmoe.algorithm import ACTIVATION_PREFIX, HELD_KEY, MEASURE_KEY, FedMoEContext
from fedexperts.algorithms.fedmoe.recommend import recommend
from fedexperts.algorithms.fedmoe.records import Source
from fedexperts.algorithms.fedmoe.search import choose_sub_moe
from fedexperts.algorithms.settings import ExpertWeighting, ServerConfig, ServerRule
from fedexperts.config import ConfigError, load_config
from fedexperts.errors import FedExpertsError
from fedexperts.federation.payload import decode, encode
from fedexperts.interface import ClientContext, ClientInfo, ClientUpdate, LocalData, PayloadError
from fedexperts.models import tiny_model
from fedexperts.moe import moe_layers
from tests.algorithms.fedmoe.common import (
    LAYERS,
    activation,
    echo,
    fedmoe,
    filled,
    per_layer,
    prepared,
    random_moe,
    step,
)
from tests.algorithms.helpers import batches_for

# -- payloads --------------------------------------------------------------------------------------------


def test_downlink_carries_only_the_held_experts_rows(sizes):
    full, smallest, one_expert = sizes
    budgets = {"big": full, "mid": smallest + 6 * one_expert, "small": smallest}
    algorithm = fedmoe(budgets)
    model, state = prepared(algorithm)
    rows = algorithm.layout.rows
    dense = set(algorithm.layout.dense)
    assert dense and all(".lora_" in name for name in dense)
    assert {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in rows} == {
        "gate.weight",
        "experts.gate_up_proj",
        "experts.down_proj",
    }

    profile = algorithm.downlink(state, ClientInfo("big", 4))  # a full budget profiles first: dense only
    assert set(profile.tensors) == dense and HELD_KEY not in profile.metadata

    sizes_on_wire = {}
    for client in ("small", "mid"):
        structure = algorithm.structure_of(client)
        payload = algorithm.downlink(state, ClientInfo(client, 4))
        assert set(payload.tensors) == dense | set(rows)
        assert payload.metadata[HELD_KEY] == dict(
            zip([layer.name for layer in moe_layers(model)], structure, strict=True)
        )
        for name, layer in rows.items():
            assert payload.tensors[name].shape == (len(structure[layer]), *state[name].shape[1:])
            torch.testing.assert_close(payload.tensors[name], state[name][structure[layer]], rtol=0, atol=0)
        held = sum(len(layer) for layer in structure)
        sizes_on_wire[client] = (held, len(encode(payload)))
    assert algorithm.structure_of("small") == per_layer(0, 1)  # top-2, lowest indices under the uniform prior
    (held_small, bytes_small), (held_mid, bytes_mid) = sizes_on_wire["small"], sizes_on_wire["mid"]
    assert held_mid == held_small + 6
    row_bytes = sum(state[name][0].numel() * state[name].element_size() for name in rows) // LAYERS
    assert bytes_mid - bytes_small == pytest.approx(6 * row_bytes, abs=64)


# -- per-client state ------------------------------------------------------------------------------------


def test_a_client_step_lives_in_its_context_and_leaves_the_algorithm_unchanged(sizes):
    full, smallest, one_expert = sizes
    algorithm = fedmoe({"a": full, "b": smallest + 3 * one_expert})
    model, state = prepared(algorithm)

    def snapshot():
        """Everything the shared object holds, by value (the role cache by size)."""
        server = algorithm.server_state()
        return (
            {key: repr(value) for key, value in vars(algorithm).items() if key != "_by_role"},
            repr(vars(algorithm.schedule)),
            len(algorithm._by_role),
            server.metadata,
            {key: tensor.clone() for key, tensor in server.tensors.items()},
        )

    before = snapshot()
    contexts = {}
    for client in ("a", "b"):  # both set up before either uplinks: nothing of one step is kept elsewhere
        info = ClientInfo(client, 4)
        batches = batches_for(model, 0)
        data = LocalData(info, lambda batches=batches: iter(batches), categories={"x": 1})
        contexts[client] = algorithm.setup_client(model, algorithm.downlink(state, info), None, data)
    a, b = contexts["a"], contexts["b"]
    assert isinstance(a, FedMoEContext) and isinstance(b, FedMoEContext)
    assert a.model is model and a.structure is None and a.activation is not None and a.category == "x"
    assert b.model is not model and b.structure == algorithm.structure_of("b") and b.activation is None
    replies = {client: algorithm.uplink(context) for client, context in reversed(contexts.items())}
    assert algorithm.personal_state(a) is None and algorithm.proximal_term(b) is None
    after = snapshot()
    assert after[:4] == before[:4]
    assert after[4].keys() == before[4].keys() and all(torch.equal(after[4][k], before[4][k]) for k in before[4])
    assert any(name.startswith(ACTIVATION_PREFIX) for name in replies["a"].tensors)
    assert replies["b"].metadata[HELD_KEY] == algorithm.layout.held(b.structure)
    again = algorithm.uplink(b)  # the context, not the algorithm, says what to send: it can be read twice
    assert again.tensors.keys() == replies["b"].tensors.keys()
    with pytest.raises(FedExpertsError, match="uplink of b without setup_client"):
        algorithm.uplink(ClientContext(ClientInfo("b", 4), model, algorithm.downlink(state, ClientInfo("b", 4))))


def test_without_data_a_profiling_client_measures_nothing(sizes):
    full, _, _ = sizes
    algorithm = fedmoe({"a": full})
    model, state = prepared(algorithm)
    info = ClientInfo("a", 4)
    received = algorithm.downlink(state, info)
    assert received.metadata[MEASURE_KEY] is True
    context = algorithm.setup_client(model, received, None, LocalData(info))  # batches=None: fedexperts plan
    assert context.activation is None and context.category is None
    assert not [name for name in algorithm.uplink(context).tensors if name.startswith(ACTIVATION_PREFIX)]


# -- modular aggregation ---------------------------------------------------------------------------------


def test_modular_aggregation_averages_each_expert_among_its_holders(sizes):
    full, _, _ = sizes
    algorithm = fedmoe(dict.fromkeys(["c0", "c1", "c2"], full - 1), server=ServerConfig(rule=ServerRule.FEDAVGM))
    model, state = prepared(algorithm)
    algorithm.assign("c0", [[0, 1], [0, 1], [5, 6]])
    algorithm.assign("c1", [[1, 2], [0, 1], [6, 7]])
    algorithm.assign("c2", [[2, 3], [2, 3], [2, 3]])  # holds experts but is not sampled
    updates = [
        ClientUpdate(ClientInfo("c0", 1), filled(algorithm, model, state, "c0", 1.0)),
        ClientUpdate(ClientInfo("c1", 3), filled(algorithm, model, state, "c1", 3.0)),
    ]
    for update in updates:
        algorithm.check_update(update.payload, state, update.client)
    new = algorithm.aggregate(state, updates)
    # per layer: global expert -> expected value (None: untouched, bit-identical)
    expected = [
        {0: 1.0, 1: 2.5, 2: 3.0},  # expert 0 held by c0 only, 1 by both (1 * 1 + 3 * 3) / 4, 2 by c1 only
        {0: 2.5, 1: 2.5},
        {5: 1.0, 6: 2.5, 7: 3.0},
    ]
    for name, layer in algorithm.layout.rows.items():
        for expert in range(8):
            value = expected[layer].get(expert)
            if value is None:
                torch.testing.assert_close(new[name][expert], state[name][expert], rtol=0, atol=0)
            else:
                assert torch.all(new[name][expert] == value), (name, expert)
    for name in algorithm.layout.dense:
        assert torch.all(new[name] == 2.5)

    # FedAvgM's momentum must not move rows nobody held in a round: round 2 has c1 alone
    again = algorithm.aggregate(new, [ClientUpdate(ClientInfo("c1", 3), filled(algorithm, model, new, "c1", 3.0))])
    gate = "model.layers.0.mlp.gate.weight"
    torch.testing.assert_close(again[gate][0], new[gate][0], rtol=0, atol=0)  # expert 0: c0 only, not sampled
    assert not torch.equal(again[gate][1], new[gate][1])  # expert 1: c1 moved it (momentum included)


def test_tokens_weigh_each_holder_by_the_tokens_it_routed_to_the_expert(sizes):
    full, _, _ = sizes
    tokens = ExpertWeighting.TOKENS
    algorithm = fedmoe(
        dict.fromkeys(["c0", "c1"], full - 1), server=ServerConfig(rule=ServerRule.FEDAVGM), expert_weighting=tokens
    )
    model, state = prepared(algorithm)
    algorithm.assign("c0", per_layer(0, 1))
    algorithm.assign("c1", per_layer(1, 2))

    def reply(client, value, counts):  # counts per held expert, in held order, in every layer
        payload = filled(algorithm, model, state, client, value)
        routed = {layer: list(counts) for layer in algorithm.layout.layer_names}
        return dataclasses.replace(payload, metadata={**payload.metadata, EXPERT_TOKENS_KEY: routed})

    updates = [
        ClientUpdate(ClientInfo("c0", 1), reply("c0", 1.0, [4, 0])),
        ClientUpdate(ClientInfo("c1", 3), reply("c1", 3.0, [0, 6])),
    ]
    for update in updates:
        algorithm.check_update(update.payload, state, update.client)
    new = algorithm.aggregate(state, updates)
    for name in algorithm.layout.rows:  # experts and router rows alike
        assert torch.all(new[name][0] == 1.0) and torch.all(new[name][2] == 3.0), name
        torch.testing.assert_close(new[name][1], state[name][1], rtol=0, atol=0)  # held by both, routed by neither
    for name in algorithm.layout.dense:
        assert torch.all(new[name] == 2.5)  # by examples, as ever
    wrong = reply("c0", 1.0, [4, 0, 1])
    with pytest.raises(PayloadError, match="must list 2 counts, got 3"):
        algorithm.check_update(wrong, state, ClientInfo("c0", 1))


def test_a_reply_that_is_not_the_slice_it_was_sent_is_refused(sizes):
    full, _, _ = sizes
    algorithm = fedmoe({"c0": full - 1, "c1": full - 1})
    model, state = prepared(algorithm)
    algorithm.assign("c0", per_layer(0, 1))
    algorithm.assign("c1", per_layer(2, 3))
    reply = filled(algorithm, model, state, "c0", 1.0)
    with pytest.raises(Exception, match="reports held experts"):
        algorithm.check_update(reply, state, ClientInfo("c1", 1))
    wrong_phase = dataclasses.replace(reply, metadata={**reply.metadata, "fedmoe_phase": "profile"})
    with pytest.raises(Exception, match="replies to a 'profile' step"):
        algorithm.check_update(wrong_phase, state, ClientInfo("c0", 1))


# -- stage 1: budgets and estimates ----------------------------------------------------------------------


def test_structures_fit_budgets_and_low_budgets_use_their_categorys_measurements(sizes):
    full, smallest, one_expert = sizes
    budgets = {"a": full, "b": smallest + 9 * one_expert, "c": smallest + 4 * one_expert, "d": smallest}
    categories = {"a": {"x": 5, "y": 1}, "b": {"x": 3}, "c": {"y": 2, "z": 2}, "d": {"z": 1}}
    algorithm = fedmoe(budgets)
    model, state = prepared(algorithm)

    assert algorithm.structure_of("a") is None  # profiles first
    assert {client: algorithm.source_of(client) for client in "bcd"} == dict.fromkeys("bcd", Source.PRIOR)
    updates = [step(algorithm, model, state, c, seed=i, categories=categories[c]) for i, c in enumerate("abcd")]
    measured = [updates[0].payload.tensors[ACTIVATION_PREFIX + layer.name] for layer in moe_layers(model)]
    assert all(vector.sum() == pytest.approx(2.0) for vector in measured)  # fractions of tokens, top-2
    state = algorithm.aggregate(state, updates)

    assert algorithm.structure_of("a") == per_layer(*range(8))  # the whole model fits
    assert algorithm.source_of("a") is Source.MEASURED
    # b shares a's majority category x; c's (y, z tie -> y) and d's (z) have no measured client
    assert [algorithm.source_of(c) for c in "bcd"] == [Source.CATEGORY, Source.FEDERATION, Source.FEDERATION]
    estimate = estimate_activation([(measured, 4)])
    layout = algorithm.layout
    for client in "bcd":
        expected = choose_sub_moe(
            estimate,
            budget_bytes=budgets[client],
            dense_bytes=layout.dense_bytes,
            expert_bytes=layout.expert_bytes,
            min_experts=layout.top_k,
        )
        assert algorithm.structure_of(client) == [list(kept) for kept in expected.kept]
    for client, budget in budgets.items():
        assert algorithm.memory(algorithm.structure_of(client)) <= budget
    assert sum(map(len, algorithm.structure_of("b"))) == 2 * LAYERS + 9
    assert algorithm.structure_of("d") == [[int(i) for i in v.topk(2).indices.sort().values] for v in estimate]


def test_a_too_small_budget_is_refused_naming_the_client(sizes):
    full, smallest, _ = sizes
    with pytest.raises(FedExpertsError, match=r"memory budget of c1 \(algorithm.fedmoe.budgets\[1\] = .*too small"):
        fedmoe({"c0": full, "c1": smallest - 1, "c2": full}).prepare(tiny_model("olmoe"))
    with pytest.raises(FedExpertsError, match=r"budget_fraction = 0.1 gives every client \d+ bytes, too small"):
        fedmoe(budget_fraction=0.1).prepare(tiny_model("olmoe"))
    config = load_config(
        None, ["algorithm.name=random-moe", "federation.clients=2", f"algorithm.fedmoe.budgets=[{full}, 5]"]
    )
    algorithm = build_algorithm(config.algorithm, client_ids=["client-0", "client-1"])
    with pytest.raises(FedExpertsError, match=r"memory budget of client-1 \(algorithm.fedmoe.budgets\[1\] = 5 bytes\)"):
        algorithm.prepare(tiny_model("olmoe"))
    with pytest.raises(ConfigError, match=r"algorithm.fedmoe.budgets has 1 entries but federation.clients is 2"):
        load_config(None, ["algorithm.name=fedmoe", "federation.clients=2", "algorithm.fedmoe.budgets=[100]"])


def test_warmup_rounds_train_on_the_full_moe_before_measuring(sizes):
    full, _, _ = sizes
    algorithm = fedmoe({"a": full}, warmup_rounds=1)
    model, state = prepared(algorithm)
    assert algorithm.downlink(state, ClientInfo("a", 4)).metadata[MEASURE_KEY] is False
    warmup = step(algorithm, model, state, "a")
    assert not [name for name in warmup.payload.tensors if name.startswith(ACTIVATION_PREFIX)]
    state = algorithm.aggregate(state, [warmup])
    assert algorithm.structure_of("a") is None
    assert algorithm.downlink(state, ClientInfo("a", 4)).metadata[MEASURE_KEY] is True
    state = algorithm.aggregate(state, [step(algorithm, model, state, "a")])
    assert algorithm.structure_of("a") == per_layer(*range(8)) and algorithm.source_of("a") is Source.MEASURED


# -- stage 2: recommendation -----------------------------------------------------------------------------


def test_stale_clients_are_recommended_a_structure_and_revert_when_it_does_not_help(sizes):
    full, smallest, one_expert = sizes
    budgets = {"a": smallest + 6 * one_expert, "b": full - 1, "c": full - 1}
    algorithm = fedmoe(budgets, patience=2, top_k_neighbours=1)
    _, state = prepared(algorithm)
    algorithm.assign("a", per_layer(0, 1), activation=activation(0, 1, 2))
    algorithm.assign("b", per_layer(0, 1, 2, 3), activation=activation(0, 1, 2, 3))  # a's nearest neighbour
    algorithm.assign("c", per_layer(4, 5, 6, 7), activation=activation(5, 6, 7))
    pool = {c: algorithm.schedule.clients[c].activation for c in "abc"}
    current = {"a": per_layer(0, 1), "b": per_layer(0, 1, 2, 3), "c": per_layer(4, 5, 6, 7)}
    proposal = recommend("a", pool, current, top_k_neighbours=1, min_experts=[2] * LAYERS)
    assert proposal == per_layer(0, 1, 2, 3)

    for score in (0.5, None, 0.5):  # a round without a score does not count
        algorithm.aggregate(state, [echo(algorithm, state, "a", score)])
        assert algorithm.structure_of("a") == per_layer(0, 1)
    resumed = fedmoe(budgets, patience=2, top_k_neighbours=1)
    prepared(resumed)
    resumed.load_server_state(decode(encode(algorithm.server_state())))

    for server in (algorithm, resumed):
        server.aggregate(state, [echo(server, state, "a", 0.5)])  # patience exhausted: try b's experts
        assert server.structure_of("a") == per_layer(0, 1, 2, 3)
        server.aggregate(state, [echo(server, state, "a", 0.4)])  # worse than 0.5: back for good
        assert server.structure_of("a") == per_layer(0, 1)
        for score in (0.4, 0.4, 0.4):
            server.aggregate(state, [echo(server, state, "a", score)])
        assert server.structure_of("a") == per_layer(0, 1)
    assert algorithm.server_state().metadata == resumed.server_state().metadata


def test_recommendations_are_shrunk_to_the_budget(sizes):
    _, smallest, one_expert = sizes
    budgets = {"a": smallest + 4 * one_expert, "b": smallest + 6 * one_expert, "c": smallest + 6 * one_expert}
    algorithm = fedmoe(budgets, patience=1, top_k_neighbours=2)
    _, state = prepared(algorithm)
    algorithm.assign("a", per_layer(0, 1), activation=activation(0, 1, 2, 3))
    algorithm.assign("b", per_layer(0, 1, 2, 3), activation=activation(0, 1, 2, 3))
    algorithm.assign("c", per_layer(0, 1, 2, 3), activation=activation(0, 1, 2, 3))
    algorithm.aggregate(state, [echo(algorithm, state, "a", 0.5)])
    algorithm.aggregate(state, [echo(algorithm, state, "a", 0.5)])
    structure = algorithm.structure_of("a")
    assert structure != per_layer(0, 1) and algorithm.memory(structure) <= budgets["a"]
    assert sum(map(len, structure)) == 2 * LAYERS + 4  # as many as fit, all drawn from the neighbours' 2 and 3


# -- randomMoE -------------------------------------------------------------------------------------------


def test_random_moe_draws_the_sizes_fedmoe_chooses(sizes):
    full, smallest, one_expert = sizes
    budgets = {"a": full, "b": smallest + 5 * one_expert, "c": smallest + 8 * one_expert}
    categories = {"a": {"x": 1}, "b": {"x": 1}, "c": {"x": 1}}

    def structures(algorithm):
        model, state = prepared(algorithm)
        updates = [step(algorithm, model, state, c, seed=i, categories=categories[c]) for i, c in enumerate("abc")]
        algorithm.aggregate(state, updates)
        for _ in range(3):  # stale scores: randomMoE never recommends
            algorithm.aggregate(state, [echo(algorithm, state, c, 0.5) for c in "bc"])
        return {c: algorithm.structure_of(c) for c in "abc"}

    fedmoe_structures = structures(fedmoe(budgets, patience=1))
    random = structures(random_moe(budgets, seed=1))
    assert random == structures(random_moe(budgets, seed=1))
    assert random != structures(random_moe(budgets, seed=2))
    assert random["a"] == fedmoe_structures["a"] == per_layer(*range(8))
    for client in "bc":
        assert [len(layer) for layer in random[client]] == [len(layer) for layer in fedmoe_structures[client]]
    assert random["b"] != fedmoe_structures["b"] or random["c"] != fedmoe_structures["c"]


def test_the_registry_builds_both_from_their_configs():
    config = load_config(None, ["algorithm.name=random-moe", "algorithm.fedmoe.seed=4", "federation.clients=3"])
    algorithm = build_algorithm(config.algorithm, client_ids=["c0", "c1", "c2"])
    assert algorithm.name == "random-moe" and algorithm.seed == (0, 4) and not algorithm.recommends
    assert algorithm.schedule.full_budget_clients == {"c0", "c2"}  # full_budget_every = 2
    plain = build_algorithm(load_config(None, ["algorithm.name=fedmoe"]).algorithm)  # fedexperts plan: no ids
    assert plain.recommends and plain.schedule.budgets is None and not plain.schedule.full_budget_clients
    everything = load_config(None, ["algorithm.name=fedmoe", "algorithm.scope=everything"]).algorithm
    with pytest.raises(FedExpertsError, match="scope 'everything'"):
        build_algorithm(everything)


def test_random_moe_draws_from_the_federation_seed():
    def structures(federation_seed):
        settings = ["algorithm.fedmoe.full_budget_every=3", "algorithm.fedmoe.wait_for_stage_1=false"]
        config = load_config(None, ["algorithm.name=random-moe", "federation.clients=3", *settings])
        algorithm = build_algorithm(config.algorithm, client_ids=["c0", "c1", "c2"], seed=federation_seed)
        algorithm.prepare(tiny_model("olmoe"))
        algorithm.assign("c0", per_layer(*range(8)), activation=activation(0, 1), category="x")
        return [algorithm.structure_of(client) for client in ("c1", "c2")]

    assert structures(0) == structures(0)
    assert structures(0) != structures(1)  # every federation seed its own random sub-MoEs


def test_budgets_can_count_the_training_state_of_what_trains():
    weights, training = fedmoe(budget_fraction=1.0), fedmoe(budget_fraction=1.0, budget_counts="training")
    model = tiny_model("olmoe")
    weights.prepare(model)
    training.prepare(tiny_model("olmoe"))
    a, b = weights.layout, training.layout
    assert a.expert_elements == b.expert_elements and all(size > 0 for size in a.expert_elements)
    assert a.expert_bytes == [4 * n for n in a.expert_elements]  # float32 masters of the held rows
    assert b.expert_bytes == [16 * n for n in a.expert_elements]  # + gradient + two AdamW moments
    trained_dense = sum(model.get_parameter(name).numel() for name in a.dense)
    assert b.dense_bytes - a.dense_bytes == 12 * trained_dense
    assert a.float32_bytes(a.full) == 4 * sum(t.numel() for t in [*model.parameters(), *model.buffers()])
