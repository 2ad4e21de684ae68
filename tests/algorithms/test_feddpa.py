"""FedDPA: a global adapter averaged, a local one kept, both mixed per example by similarity to the client's data."""

import math

import pytest
import torch

from fedexperts.algorithms import FedDPA
from fedexperts.algorithms.feddpa.config import FedDPAConfig, FedDPAOptions
from fedexperts.algorithms.feddpa.mixing import adapter_mix
from fedexperts.algorithms.feddpa.weighting import dynamic_weighting, local_weights, pooled, prompts
from fedexperts.algorithms.lora import lora_tensors
from fedexperts.config import TrainConfig
from fedexperts.data import IGNORE_INDEX
from fedexperts.errors import FedExpertsError
from fedexperts.federation.inprocess import run_experiment
from fedexperts.interface import ClientInfo, ClientUpdate, LocalData, Payload
from fedexperts.models import tiny_model
from fedexperts.moe import Role
from fedexperts.training import train_local
from tests.algorithms.helpers import assert_states_and_checkpoint_split, batches_for, client_round, train_phases


def prepared(**options):
    model = tiny_model("olmoe")
    algorithm = FedDPA(FedDPAConfig(feddpa=FedDPAOptions(**options)))
    algorithm.prepare(model)
    return algorithm, model


def adapter_names(model, adapter):
    return {name for name, tensor in lora_tensors(model).items() if tensor.adapter == adapter}


def snapshot(model, names):
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach().clone() for name in names}


def changed(before, model):
    parameters = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(value, parameters[name])}


def test_the_local_weight_is_max_weight_times_the_mean_cosine_similarity():
    states = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    references = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # row 0: cos = 1 and 1/sqrt(2); row 1: cos = 0 and 1/sqrt(2)
    expected = torch.tensor([0.5 * (1 + 1 / math.sqrt(2)) / 2, 0.5 * (1 / math.sqrt(2)) / 2])
    torch.testing.assert_close(local_weights(states, references, max_weight=0.5), expected)


def test_an_input_is_its_last_attended_state_or_the_mean_over_its_tokens():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)  # row 0: 0..3, row 1: 4..7
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert pooled(hidden, right, "last").flatten().tolist() == [2.0, 7.0]
    assert pooled(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pooled(hidden, right, "mean").flatten().tolist() == [1.0, 5.5]


def test_the_reference_rows_are_the_prompts_before_the_first_supervised_label():
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX], [IGNORE_INDEX, 10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    input_ids, attention_mask = prompts([batch, batch], count=3)
    assert input_ids.tolist() == [[5, 6], [9, 0], [5, 6]]
    assert attention_mask.tolist() == [[1, 1], [1, 0], [1, 1]]


def test_the_mix_scales_each_adapter_per_example():
    _, model = prepared()
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.requires_grad:  # both adapters: nonzero B, so each contributes
                parameter.normal_()
    x = torch.randn(3, 2, layer.in_features)
    mix = adapter_mix(model)
    with torch.no_grad():
        base = layer.base_layer(x)
        with mix.fixed({"default": 1.0, "local": 0.0}):
            only_global = layer(x) - base
        with mix.fixed({"default": 0.0, "local": 1.0}):
            only_local = layer(x) - base
        weight = torch.tensor([0.0, 0.25, 1.0])
        with mix.fixed({"default": 1 - weight, "local": weight}):
            mixed = layer(x)
    expected = base + (1 - weight).view(3, 1, 1) * only_global + weight.view(3, 1, 1) * only_local
    torch.testing.assert_close(mixed, expected)
    assert not torch.allclose(only_global, only_local)


def test_an_evaluation_input_gets_its_weight_from_the_clients_training_prompts_and_keeps_it_while_generating():
    algorithm, model = prepared(instances=1)
    info = ClientInfo("x", 4)
    batches = batches_for(model, 0)
    start = algorithm.initial_global_state(model)
    context = algorithm.setup_client(
        model, algorithm.downlink(start, info), None, LocalData(info, lambda: iter(batches))
    )
    model.eval()
    prompt = batches[0]["input_ids"][:1, :4]  # the first training row's prompt: cosine 1 with the only reference
    other = batches[1]["input_ids"][:1, :7]
    mix = adapter_mix(context.model)
    with torch.no_grad():
        model(input_ids=torch.cat([prompt, prompt]), attention_mask=torch.ones(2, 4, dtype=torch.long))
        torch.testing.assert_close(mix.weights["local"], torch.tensor([0.5, 0.5]))  # max_weight * 1
        torch.testing.assert_close(mix.weights["default"], torch.tensor([0.5, 0.5]))
        generated = model.generate(input_ids=other, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    similarity = torch.nn.functional.cosine_similarity(
        dynamic_weighting(model).states(model, other, torch.ones_like(other)), dynamic_weighting(model).references
    )
    torch.testing.assert_close(mix.weights["local"], 0.5 * similarity)  # the prompt's, not a later step's
    assert generated.shape == (1, 10) and float(similarity) < 0.999


def test_only_the_global_adapter_travels_and_the_server_averages_it():
    algorithm, model = prepared()
    shared, local = adapter_names(model, "default"), adapter_names(model, "local")
    assert {n for n, r in algorithm.roles.items() if r is Role.SHARED} == shared
    assert {n for n, r in algorithm.roles.items() if r is Role.PERSONAL} == local
    start = algorithm.initial_global_state(model)
    assert set(start) == shared
    x, kept = client_round(algorithm, model, start, "x", seed=1, round_number=2)
    assert set(x.payload.tensors) == shared and kept is not None and set(kept.tensors) == local
    first = {name: torch.full_like(t, 2.0) for name, t in start.items()}
    second = {name: torch.full_like(t, -2.0) for name, t in start.items()}
    new = algorithm.aggregate(
        start,
        [
            ClientUpdate(ClientInfo("x", 30), Payload(first, {"examples": 30})),
            ClientUpdate(ClientInfo("y", 10), Payload(second, {"examples": 10})),
        ],
    )
    assert set(new) == shared and all(torch.equal(t, torch.full_like(t, 1.0)) for t in new.values())


def test_round_one_trains_the_global_adapter_alone_and_keeps_no_trained_local_adapter():
    algorithm, model = prepared()
    shared, local = adapter_names(model, "default"), adapter_names(model, "local")
    info = ClientInfo("x", 4)
    batches = batches_for(model, 1)
    received = algorithm.downlink(algorithm.initial_global_state(model), info)
    context = algorithm.setup_client(model, received, None, LocalData(info, lambda: iter(batches), round=1))
    assert len(algorithm.training_phases(context)) == 1
    before = snapshot(model, shared | local)
    train_phases(algorithm, context, batches)
    assert changed(before, model) == shared
    assert set(algorithm.uplink(context).tensors) == shared
    kept = algorithm.personal_state(context)
    assert set(kept.tensors) == local and kept.metadata == {"local_trained": False}
    new = algorithm.aggregate(received.tensors, [ClientUpdate(info, algorithm.uplink(context))])
    algorithm.setup_client(model, algorithm.downlink(new, info), kept, LocalData(info, round=2))
    parameters = dict(model.named_parameters())  # an untrained local adapter restarts from the new global one
    assert all(torch.equal(parameters[name], new[algorithm.twins[name]]) for name in local)


def test_from_round_two_the_local_adapter_trains_first_then_the_global_one_each_in_its_own_phase():
    algorithm, model = prepared()
    shared, local = adapter_names(model, "default"), adapter_names(model, "local")
    info = ClientInfo("x", 4)
    batches = batches_for(model, 1)
    received = algorithm.downlink(algorithm.initial_global_state(model), info)
    context = algorithm.setup_client(model, received, None, LocalData(info, lambda: iter(batches), round=2))
    twins = algorithm.twins
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[n], parameters[twins[n]]) for n in local)  # local starts as the global one
    local_phase, global_phase = algorithm.training_phases(context)
    before = snapshot(model, shared | local)
    with local_phase:
        assert {n for n, p in model.named_parameters() if p.requires_grad} == local
        assert adapter_mix(model).weights == {"default": 0.5, "local": 0.5}
        train_local(context.model, batches, TrainConfig(steps_per_round=2, learning_rate=5e-2))
    assert changed(before, model) == local
    before = snapshot(model, shared | local)
    with global_phase:
        assert {n for n, p in model.named_parameters() if p.requires_grad} == shared
        assert adapter_mix(model).weights == {"default": 1.0, "local": 0.0}
        train_local(context.model, batches, TrainConfig(steps_per_round=2, learning_rate=5e-2))
    assert changed(before, model) == shared
    assert {n for n, p in model.named_parameters() if p.requires_grad} == shared | local  # the roles are back


def test_a_client_resumes_its_own_local_adapter():
    algorithm, model = prepared()
    start = algorithm.initial_global_state(model)
    _, kept = client_round(algorithm, model, start, "x", seed=1, round_number=2)
    assert kept.metadata == {"local_trained": True}
    client_round(algorithm, model, start, "y", seed=2, round_number=2)
    info = ClientInfo("x", 4)
    algorithm.setup_client(model, algorithm.downlink(start, info), kept, LocalData(info, round=3))
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[name], tensor) for name, tensor in kept.tensors.items())


def test_encoder_decoder_models_are_refused():
    with pytest.raises(FedExpertsError, match="decoder-only"):
        FedDPA().prepare(tiny_model("switch_transformers"))


def test_feddpa_end_to_end_keeps_the_local_adapter_on_disk(micro_config):
    result = run_experiment(micro_config("algorithm.name=feddpa"))
    assert_states_and_checkpoint_split(result, ".local.", ".default.")
    for scores in result.records[-1]["clients"].values():
        assert 0.0 <= scores["own"]["rouge_l"] <= 1.0
