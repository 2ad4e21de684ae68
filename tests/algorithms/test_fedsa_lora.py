"""FedSA-LoRA: both factors train, A is sent and averaged, B stays with its client."""

import pytest
import torch

from fedexperts.algorithms import FedSALoRA
from fedexperts.algorithms.lora import LoraFactor, lora_tensors
from fedexperts.federation.inprocess import run_experiment
from fedexperts.interface import ClientInfo, ClientUpdate, LocalData, Payload, PayloadError
from fedexperts.models import tiny_model
from fedexperts.moe import Role
from tests.algorithms.helpers import assert_states_and_checkpoint_split, client_round


def prepared():
    model = tiny_model("olmoe")
    algorithm = FedSALoRA()
    algorithm.prepare(model)
    factors = {name: tensor.factor for name, tensor in lora_tensors(model).items()}
    a = {name for name, factor in factors.items() if factor is LoraFactor.A}
    b = {name for name, factor in factors.items() if factor is LoraFactor.B}
    return algorithm, model, a, b


def test_a_is_shared_b_is_personal_and_only_a_travels():
    algorithm, model, a, b = prepared()
    assert {n for n, r in algorithm.roles.items() if r is Role.SHARED} == a
    assert {n for n, r in algorithm.roles.items() if r is Role.PERSONAL} == b
    assert {n for n, p in model.named_parameters() if p.requires_grad} == a | b
    start = algorithm.initial_global_state(model)
    assert set(start) == a
    update, personal = client_round(algorithm, model, start, "a", seed=1)
    assert set(update.payload.tensors) == a
    assert personal is not None and set(personal.tensors) == b
    assert all(bool(personal.tensors[name].abs().sum() > 0) for name in b)  # B trained away from zero
    assert any(not torch.equal(update.payload.tensors[name], start[name]) for name in a)


def test_a_new_client_starts_with_zero_b_whatever_the_previous_client_trained():
    algorithm, model, _a, b = prepared()
    start = algorithm.initial_global_state(model)
    client_round(algorithm, model, start, "a", seed=1)
    info = ClientInfo("b", 4)
    algorithm.setup_client(model, algorithm.downlink(start, info), None, LocalData(info))
    parameters = dict(model.named_parameters())
    assert all(torch.count_nonzero(parameters[name]) == 0 for name in b)


def test_the_server_averages_a_by_examples_and_each_client_keeps_its_own_b():
    algorithm, model, a, b = prepared()
    start = algorithm.initial_global_state(model)
    first = {name: torch.full_like(t, 1.0) for name, t in start.items()}
    second = {name: torch.full_like(t, 5.0) for name, t in start.items()}
    updates = [
        ClientUpdate(ClientInfo("x", 10), Payload(first, {"examples": 10})),
        ClientUpdate(ClientInfo("y", 30), Payload(second, {"examples": 30})),
    ]
    new = algorithm.aggregate(start, updates)
    assert set(new) == a
    assert all(torch.equal(new[name], torch.full_like(start[name], 4.0)) for name in a)  # (10 * 1 + 30 * 5) / 40

    _, kept_x = client_round(algorithm, model, start, "x", seed=1)
    _, kept_y = client_round(algorithm, model, start, "y", seed=2)
    assert any(not torch.equal(kept_x.tensors[name], kept_y.tensors[name]) for name in b)
    info = ClientInfo("x", 10)
    algorithm.setup_client(model, algorithm.downlink(new, info), kept_x, LocalData(info, round=2))
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[name], new[name]) for name in a)  # the averaged A
    assert all(torch.equal(parameters[name], kept_x.tensors[name]) for name in b)  # x's own B, untouched


def test_the_server_refuses_an_update_that_carries_b():
    algorithm, model, _a, b = prepared()
    start = algorithm.initial_global_state(model)
    leaked = dict(start)
    name = sorted(b)[0]
    leaked[name] = dict(model.named_parameters())[name].detach().clone()
    with pytest.raises(PayloadError, match="unexpected tensors"):
        algorithm.check_update(Payload(leaked, {"examples": 1}), start, ClientInfo("x", 1))


def test_fedsa_lora_end_to_end_keeps_b_on_disk_and_a_in_the_checkpoint(micro_config):
    result = run_experiment(micro_config("algorithm.name=fedsa-lora"))
    assert_states_and_checkpoint_split(result, ".lora_B.", ".lora_A.")
