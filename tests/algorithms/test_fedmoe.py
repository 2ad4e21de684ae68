import json

import pytest
import torch
from safetensors import safe_open

from fedexperts.algorithms import (
    ClientInfo,
    ClientUpdate,
    FedMoE,
    LocalData,
    RandomMoE,
    ServerOptimizer,
    ServerRule,
    build_algorithm,
)
from fedexperts.algorithms.fedmoe import ACTIVATION_PREFIX, HELD_KEY, MEASURE_KEY, SCORE_KEY, Source, sub_moe_view
from fedexperts.algorithms.fedmoe_core import choose_sub_moe, estimate_activation, recommend
from fedexperts.config import ConfigError, load_config
from fedexperts.errors import FedExpertsError
from fedexperts.federation import client as client_module
from fedexperts.federation import inprocess
from fedexperts.federation.inprocess import run_experiment
from fedexperts.federation.payload import Payload, decode, encode
from fedexperts.models import tiny_model
from fedexperts.moe import moe_layers
from fedexperts.training import TrainSettings, train_local
from tests.algorithms.helpers import batches_for

LAYERS = 3  # the tiny OLMoE: 3 MoE layers of 8 experts, top-2


@pytest.fixture(scope="module")
def sizes():
    """Full and smallest sub-MoE bytes of the tiny OLMoE with attention LoRA, and one expert's bytes."""
    probe = FedMoE(budget_fraction=1.0)
    probe.prepare(tiny_model("olmoe"))
    return probe.full_bytes, probe.min_bytes, probe._layout.expert_bytes[0]


def prepared(algorithm):
    model = tiny_model("olmoe")
    algorithm.prepare(model)
    return model, algorithm.initial_global_state(model)


def step(algorithm, model, state, client, *, seed=0, categories=None):
    """One untrained client step through the wire format: downlink, setup (profiling measures), uplink, check."""
    info = ClientInfo(client, 4)
    received = decode(encode(algorithm.downlink(state, info)))
    batches = batches_for(model, seed)
    data = LocalData(info, lambda: iter(batches), categories=categories or {})
    client_model = algorithm.setup_client(model, received, None, data)
    reply = decode(encode(algorithm.uplink(client_model, info)))
    algorithm.check_update(reply, state, info)
    return ClientUpdate(info, reply)


def per_layer(*experts):
    return [list(experts) for _ in range(LAYERS)]


# -- payloads --------------------------------------------------------------------------------------------


def test_downlink_carries_only_the_held_experts_rows(sizes):
    full, smallest, one_expert = sizes
    budgets = {"big": full, "mid": smallest + 6 * one_expert, "small": smallest}
    algorithm = FedMoE(budgets=budgets)
    model, state = prepared(algorithm)
    rows = algorithm._layout.rows
    dense = set(algorithm._layout.dense)
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


# -- modular aggregation ---------------------------------------------------------------------------------


def filled(algorithm, model, state, client, value):
    """A reply whose every trained tensor (dense and held rows) is ``value``."""
    info = ClientInfo(client, 1)
    view = algorithm.setup_client(model, decode(encode(algorithm.downlink(state, info))), None)
    with torch.no_grad():
        for name in [*algorithm._layout.dense, *algorithm._layout.rows]:
            view.get_parameter(name).fill_(value)
    return decode(encode(algorithm.uplink(view, info)))


def test_modular_aggregation_averages_each_expert_among_its_holders(sizes):
    full, _, _ = sizes
    algorithm = FedMoE(budgets=dict.fromkeys(["c0", "c1", "c2"], full - 1), server=ServerOptimizer(ServerRule.FEDAVGM))
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
    for name, layer in algorithm._layout.rows.items():
        for expert in range(8):
            value = expected[layer].get(expert)
            if value is None:
                torch.testing.assert_close(new[name][expert], state[name][expert], rtol=0, atol=0)
            else:
                assert torch.all(new[name][expert] == value), (name, expert)
    for name in algorithm._layout.dense:
        assert torch.all(new[name] == 2.5)

    # FedAvgM's momentum must not move rows nobody held in a round: round 2 has c1 alone
    again = algorithm.aggregate(new, [ClientUpdate(ClientInfo("c1", 3), filled(algorithm, model, new, "c1", 3.0))])
    gate = "model.layers.0.mlp.gate.weight"
    torch.testing.assert_close(again[gate][0], new[gate][0], rtol=0, atol=0)  # expert 0: c0 only, not sampled
    assert not torch.equal(again[gate][1], new[gate][1])  # expert 1: c1 moved it (momentum included)


# -- the client model ------------------------------------------------------------------------------------


def test_the_sub_moe_view_shares_non_expert_tensors_and_leaves_the_base_unchanged(sizes):
    full, _, _ = sizes
    algorithm = FedMoE(budgets={"c0": full - 1})
    model, state = prepared(algorithm)
    algorithm.assign("c0", [[1, 4], [0, 2, 5], [3, 4, 6, 7]])  # different counts: the model-level aux loss goes off
    before = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    config_before = model.config.to_dict()
    info = ClientInfo("c0", 4)
    received = decode(encode(algorithm.downlink(state, info)))
    batches = batches_for(model, 0)
    view = algorithm.setup_client(model, received, None, LocalData(info, lambda: iter(batches)))
    assert view is not model

    rows = set(algorithm._layout.rows)
    base_tensors = dict([*model.named_parameters(), *model.named_buffers()])
    view_tensors = dict([*view.named_parameters(), *view.named_buffers()])
    assert set(base_tensors) == set(view_tensors)
    for name, tensor in base_tensors.items():
        if name in rows:
            assert view_tensors[name].data_ptr() != tensor.data_ptr()
        else:
            assert view_tensors[name] is tensor and view_tensors[name].data_ptr() == tensor.data_ptr(), name
    assert [layer.num_experts for layer in moe_layers(view)] == [2, 3, 4]
    assert view.config.output_router_logits is False
    for name in algorithm._layout.rows:
        torch.testing.assert_close(view.get_parameter(name), received.tensors[name], rtol=0, atol=0)
        assert view.get_parameter(name).requires_grad and not model.get_parameter(name).requires_grad

    torch.manual_seed(0)
    train_local(view, batches, TrainSettings(steps_per_round=3, learning_rate=5e-2))
    reply = algorithm.uplink(view, info)
    for name in rows:
        assert not torch.equal(reply.tensors[name], received.tensors[name])  # the view's experts trained
    for name, tensor in before.items():
        current = dict([*model.named_parameters(), *model.named_buffers()])[name]
        if name in algorithm._layout.dense:
            assert not torch.equal(current, tensor)  # LoRA is the base model's own tensor, trained in place
        else:
            torch.testing.assert_close(current, tensor, rtol=0, atol=0)  # experts and frozen weights: bit-identical
    assert model.config.to_dict() == config_before
    assert [layer.num_experts for layer in moe_layers(model)] == [8, 8, 8] and model.num_experts == 8


def test_view_memory_is_what_the_budget_accounting_says(sizes):
    full, _, _ = sizes
    algorithm = FedMoE(budgets={"c0": full - 1})
    model, _ = prepared(algorithm)
    structure = [[0, 1], [2, 3, 4], [0, 5, 6, 7]]
    view = sub_moe_view(model, dict(zip([layer.name for layer in moe_layers(model)], structure, strict=True)))
    actual = sum(t.numel() * t.element_size() for t in [*view.parameters(), *view.buffers()])
    assert algorithm.memory(structure) == actual
    assert algorithm.full_bytes == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# -- stage 1: budgets and estimates ----------------------------------------------------------------------


def test_structures_fit_budgets_and_low_budgets_use_their_categorys_measurements(sizes):
    full, smallest, one_expert = sizes
    budgets = {"a": full, "b": smallest + 9 * one_expert, "c": smallest + 4 * one_expert, "d": smallest}
    categories = {"a": {"x": 5, "y": 1}, "b": {"x": 3}, "c": {"y": 2, "z": 2}, "d": {"z": 1}}
    algorithm = FedMoE(budgets=budgets)
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
    layout = algorithm._layout
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
        FedMoE(budgets={"c0": full, "c1": smallest - 1, "c2": full}).prepare(tiny_model("olmoe"))
    with pytest.raises(FedExpertsError, match=r"budget_fraction = 0.1 gives every client \d+ bytes, too small"):
        FedMoE(budget_fraction=0.1).prepare(tiny_model("olmoe"))
    config = load_config(
        None, ["algorithm.name=random-moe", "federation.clients=2", f"algorithm.fedmoe.budgets=[{full}, 5]"]
    )
    algorithm = build_algorithm(config.algorithm, client_ids=["client-0", "client-1"])
    with pytest.raises(FedExpertsError, match=r"memory budget of client-1 \(algorithm.fedmoe.budgets\[1\] = 5 bytes\)"):
        algorithm.prepare(tiny_model("olmoe"))
    with pytest.raises(ConfigError, match=r"algorithm.fedmoe.budgets has 1 entries but federation.clients is 2"):
        load_config(None, ["federation.clients=2", "algorithm.fedmoe.budgets=[100]"])


def test_warmup_rounds_train_on_the_full_moe_before_measuring(sizes):
    full, _, _ = sizes
    algorithm = FedMoE(budgets={"a": full}, warmup_rounds=1)
    model, state = prepared(algorithm)
    assert algorithm.downlink(state, ClientInfo("a", 4)).metadata[MEASURE_KEY] is False
    warmup = step(algorithm, model, state, "a")
    assert not [name for name in warmup.payload.tensors if name.startswith(ACTIVATION_PREFIX)]
    state = algorithm.aggregate(state, [warmup])
    assert algorithm.structure_of("a") is None
    assert algorithm.downlink(state, ClientInfo("a", 4)).metadata[MEASURE_KEY] is True
    state = algorithm.aggregate(state, [step(algorithm, model, state, "a")])
    assert algorithm.structure_of("a") == per_layer(*range(8)) and algorithm.source_of("a") is Source.MEASURED


def test_a_too_small_budget_stops_the_run_naming_the_client(micro_config):
    with pytest.raises(FedExpertsError, match=r"memory budget of client-0 \(algorithm.fedmoe.budgets\[0\] = 1 bytes"):
        run_experiment(micro_config("algorithm.name=fedmoe", "algorithm.fedmoe.budgets=[1, 1, 1]"))


# -- stage 2: recommendation -----------------------------------------------------------------------------


def echo(algorithm, state, client, score=None):
    """The client's downlink sent straight back (a reply of the right shapes), with a score."""
    info = ClientInfo(client, 4)
    payload = algorithm.downlink(state, info)
    metadata = {"examples": 4, "fedmoe_phase": payload.metadata["fedmoe_phase"], HELD_KEY: payload.metadata[HELD_KEY]}
    if score is not None:
        metadata[SCORE_KEY] = score
    reply = Payload(dict(payload.tensors), metadata)
    algorithm.check_update(reply, state, info)
    return ClientUpdate(info, reply)


def activation(*hot):
    vector = torch.full((8,), 0.01, dtype=torch.float64)
    vector[list(hot)] = 1.0
    return [vector.clone() for _ in range(LAYERS)]


def test_stale_clients_are_recommended_a_structure_and_revert_when_it_does_not_help(sizes):
    full, smallest, one_expert = sizes
    budgets = {"a": smallest + 6 * one_expert, "b": full - 1, "c": full - 1}
    algorithm = FedMoE(budgets=budgets, patience=2, top_k_neighbours=1)
    _, state = prepared(algorithm)
    algorithm.assign("a", per_layer(0, 1), activation=activation(0, 1, 2))
    algorithm.assign("b", per_layer(0, 1, 2, 3), activation=activation(0, 1, 2, 3))  # a's nearest neighbour
    algorithm.assign("c", per_layer(4, 5, 6, 7), activation=activation(5, 6, 7))
    pool = {c: algorithm._clients[c].activation for c in "abc"}
    current = {"a": per_layer(0, 1), "b": per_layer(0, 1, 2, 3), "c": per_layer(4, 5, 6, 7)}
    proposal = recommend("a", pool, current, top_k_neighbours=1, min_experts=[2] * LAYERS)
    assert proposal == per_layer(0, 1, 2, 3)

    for score in (0.5, None, 0.5):  # a round without a score does not count
        algorithm.aggregate(state, [echo(algorithm, state, "a", score)])
        assert algorithm.structure_of("a") == per_layer(0, 1)
    resumed = FedMoE(budgets=budgets, patience=2, top_k_neighbours=1)
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
    algorithm = FedMoE(budgets=budgets, patience=1, top_k_neighbours=2)
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

    fedmoe = structures(FedMoE(budgets=budgets, patience=1))
    random = structures(RandomMoE(budgets=budgets, seed=1))
    assert random == structures(RandomMoE(budgets=budgets, seed=1))
    assert random != structures(RandomMoE(budgets=budgets, seed=2))
    assert random["a"] == fedmoe["a"] == per_layer(*range(8))
    for client in "bc":
        assert [len(layer) for layer in random[client]] == [len(layer) for layer in fedmoe[client]]
    assert random["b"] != fedmoe["b"] or random["c"] != fedmoe["c"]


# -- end to end ------------------------------------------------------------------------------------------


@pytest.fixture
def micro_budgets(micro_model_path):
    """Budgets for the micro run's three clients: one profiles, two hold sub-MoEs."""
    from fedexperts.models.load import load_model

    probe = FedMoE(budget_fraction=1.0)
    probe.prepare(load_model(micro_model_path).model)
    middle = (probe.full_bytes + probe.min_bytes) // 2
    return f"algorithm.fedmoe.budgets=[{probe.full_bytes}, {middle}, {probe.min_bytes}]"


def checkpoint(run_dir):
    path = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))[-1]
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in sorted(handle.keys())}, handle.metadata()


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in {"seconds", "peak_memory_bytes", "bytes_up"}}
    if isinstance(value, list):
        return [stable(item) for item in value]
    return value


CHEAP_FINAL = ("eval.union_examples=0", "eval.probes=0")


class Interrupt(BaseException):
    pass


def test_fedmoe_end_to_end_and_resumed_mid_round(micro_config, micro_budgets, monkeypatch):
    overrides = ("algorithm.name=fedmoe", micro_budgets, "algorithm.fedmoe.patience=1", *CHEAP_FINAL)
    reference = run_experiment(micro_config(*overrides, "name=reference"))
    _, first, second, final = reference.records
    assert all(entry["status"] == "ok" for record in (first, second) for entry in record["clients"].values())
    profile, mid, small = (first["clients"][f"client-{i}"]["bytes_down"] for i in range(3))
    assert profile < small < mid  # round 1: the full-budget client gets the dense part only
    assert second["clients"]["client-0"]["bytes_down"] > mid  # then its whole model
    assert all(scores["own"] is not None for scores in final["clients"].values())
    tensors, metadata = checkpoint(reference.run_dir)
    clients = json.loads(metadata["fedexperts"])["server"]["clients"]
    assert clients["client-0"]["source"] == "measured" and "server/activation/client-0/0" in tensors
    assert all(torch.isfinite(t).all() for t in tensors.values())

    config = micro_config(*overrides, "name=interrupted")
    real, calls = client_module.run_client, []

    def dies_in_round_two(setting, store, task, received):
        if task.round == 2 and len([c for c in calls if c.round == 2]) == 2:
            raise Interrupt
        calls.append(task)
        return real(setting, store, task, received)

    monkeypatch.setattr(inprocess, "run_client", dies_in_round_two)
    with pytest.raises(Interrupt):
        run_experiment(config)
    monkeypatch.setattr(inprocess, "run_client", real)
    resumed = run_experiment(config, resume=True)
    assert stable(resumed.records[1:]) == stable(reference.records[1:])
    (a, meta_a), (b, meta_b) = checkpoint(reference.run_dir), checkpoint(resumed.run_dir)
    assert a.keys() == b.keys() and meta_a == meta_b
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_random_moe_end_to_end(micro_config, micro_budgets):
    result = run_experiment(micro_config("algorithm.name=random-moe", micro_budgets, "eval.every=0", *CHEAP_FINAL))
    kinds = [line["kind"] for line in result.records]
    assert kinds == ["run", "round", "round", "final"]
    for record in result.records[1:3]:
        assert all(entry["status"] == "ok" for entry in record["clients"].values())
