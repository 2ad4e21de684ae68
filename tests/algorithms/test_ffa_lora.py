"""FFA-LoRA: A frozen at a seeded draw shared by every process, B trained and averaged, half the bytes."""

import math

import torch
from safetensors.torch import load_file

from fedexperts.algorithms import FedAvg, FFALoRA
from fedexperts.algorithms.fedavg.config import FedAvgConfig
from fedexperts.algorithms.ffa_lora.config import FFALoRAConfig
from fedexperts.algorithms.lora import LoraFactor, lora_tensors
from fedexperts.algorithms.settings import LoraConfig
from fedexperts.federation import encode
from fedexperts.federation.inprocess import run_experiment
from fedexperts.interface import ClientInfo, LocalData
from fedexperts.models import tiny_model
from fedexperts.moe import Role
from tests.algorithms.helpers import client_round


def prepared(seed=0, global_seed=0, model_type="olmoe", **lora):
    torch.manual_seed(global_seed)  # whatever the process's random state, A must not depend on it
    model = tiny_model(model_type)
    algorithm = FFALoRA(FFALoRAConfig(lora=LoraConfig(**lora)), seed=seed)
    algorithm.prepare(model)
    return algorithm, model


def factor_names(model, factor):
    return {name for name, tensor in lora_tensors(model).items() if tensor.factor is factor}


def lora_a(model):
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach().clone() for name in factor_names(model, LoraFactor.A)}


def test_a_is_frozen_b_is_the_shared_state_and_starts_at_zero():
    algorithm, model = prepared()
    a, b = factor_names(model, LoraFactor.A), factor_names(model, LoraFactor.B)
    assert {n for n, r in algorithm.roles.items() if r is Role.FROZEN} >= a
    assert {n for n, r in algorithm.roles.items() if r is Role.SHARED} == b
    assert {n for n, p in model.named_parameters() if p.requires_grad} == b
    start = algorithm.initial_global_state(model)
    assert set(start) == b and all(torch.count_nonzero(t) == 0 for t in start.values())


def test_a_is_the_same_draw_in_every_process_whatever_its_random_state_and_peft_init_shaped():
    _, first = prepared(seed=7, global_seed=1)
    _, second = prepared(seed=7, global_seed=2)
    _, other = prepared(seed=8, global_seed=1)
    one, two, three = lora_a(first), lora_a(second), lora_a(other)
    assert all(torch.equal(one[name], two[name]) for name in one)
    assert all(not torch.equal(one[name], three[name]) for name in one)
    for tensor in one.values():  # peft's Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(tensor.shape[1])
        assert tensor.abs().max() <= bound and tensor.abs().max() > 0.5 * bound


def test_a_stays_bit_identical_across_clients_and_rounds_and_only_b_is_sent():
    algorithm, model = prepared()
    before = lora_a(model)
    b = factor_names(model, LoraFactor.B)
    state = algorithm.initial_global_state(model)
    for round_number in (1, 2):
        updates = [
            client_round(algorithm, model, state, name, seed=seed, round_number=round_number)[0]
            for name, seed in (("x", 1), ("y", 2))
        ]
        assert all(set(u.payload.tensors) == b for u in updates)
        assert all(torch.equal(t, before[n]) for n, t in lora_a(model).items())
        state = algorithm.aggregate(state, updates)
    assert all(torch.count_nonzero(t) > 0 for t in state.values())


def test_averaging_b_averages_the_clients_updates_exactly():
    """With A shared and fixed, mean_i(B_i) A == mean_i(B_i A): no cross-term from averaging the factors."""
    algorithm, model = prepared()
    start = algorithm.initial_global_state(model)
    x, _ = client_round(algorithm, model, start, "x", seed=1, examples=10)
    y, _ = client_round(algorithm, model, start, "y", seed=2, examples=30)
    new = algorithm.aggregate(start, [x, y])
    tensors = lora_tensors(model)
    a_of = {t.layer: name for name, t in tensors.items() if t.factor is LoraFactor.A}
    a = lora_a(model)
    for name in new:
        frozen = a[a_of[tensors[name].layer]].double()
        mean_update = (
            0.25 * x.payload.tensors[name].double() @ frozen + 0.75 * y.payload.tensors[name].double() @ frozen
        )
        torch.testing.assert_close(new[name].double() @ frozen, mean_update)


def test_one_round_sends_half_of_fedavgs_lora_when_the_projections_are_square():
    """q and o are square (in == out), so their A and B have the same size: FFA-LoRA sends half of FedAvg's bytes."""
    square = {"targets": ["q_proj", "o_proj"]}
    ffa, model = prepared(**square)
    fedavg = FedAvg(FedAvgConfig(lora=LoraConfig(**square)))
    twin = tiny_model("olmoe")
    fedavg.prepare(twin)
    info = ClientInfo("x", 4)
    sent = {}
    for label, algorithm, on in (("ffa", ffa, model), ("fedavg", fedavg, twin)):
        received = algorithm.downlink(algorithm.initial_global_state(on), info)
        context = algorithm.setup_client(on, received, None, LocalData(info))
        sent[label] = (received, algorithm.uplink(context))
    for direction in (0, 1):
        ffa_payload, fedavg_payload = sent["ffa"][direction], sent["fedavg"][direction]
        assert 2 * ffa_payload.tensor_bytes == fedavg_payload.tensor_bytes
        assert 2 * len(ffa_payload.tensors) == len(fedavg_payload.tensors)
        assert len(encode(ffa_payload)) < 0.51 * len(encode(fedavg_payload))  # the wire's header halves too


def test_ffa_lora_end_to_end_sends_b_only_and_checkpoints_no_a(micro_config):
    result = run_experiment(micro_config("algorithm.name=ffa-lora"))
    assert [line["kind"] for line in result.records] == ["run", "round", "round", "final"]
    for record in result.records[1:3]:
        assert all(entry["status"] == "ok" for entry in record["clients"].values())
    checkpoint = sorted((result.run_dir / "checkpoints").glob("round-*.safetensors"))[-1]
    shared = [key for key in load_file(checkpoint) if key.startswith("global/")]
    assert shared and all(".lora_B." in key for key in shared)
    assert not list((result.run_dir / "clients").glob("*.safetensors"))
