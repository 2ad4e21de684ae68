"""FedMoE on experts stored one module each (Switch Transformers): stacked expert rows, global indices, capacity."""

import copy

import torch

from fedexperts.config import TrainConfig
from fedexperts.data import InstructionCollator
from fedexperts.federation.payload import decode, encode
from fedexperts.interface import ClientInfo, LocalData
from fedexperts.models import tiny_model
from fedexperts.moe import moe_layers, select_experts
from fedexperts.moe.rows import expert_row_tensors, read_rows, write_rows
from fedexperts.training import train_local
from tests.algorithms.fedmoe.common import fedmoe


def switch_batches(count=2):
    generator = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(3, 128, (int(torch.randint(4, 10, (1,), generator=generator)),)).tolist(),
            "labels": torch.randint(3, 128, (int(torch.randint(2, 6, (1,), generator=generator)),)).tolist(),
        }
        for _ in range(4 * count)
    ]
    collate = InstructionCollator(pad_token_id=0)
    return [collate(rows[start : start + 4]) for start in range(0, len(rows), 4)]


def test_expert_modules_are_read_and_written_as_stacked_rows():
    model = tiny_model("switch_transformers")
    layer = moe_layers(model)[0]
    rows = expert_row_tensors(model)
    stacked = f"{layer.experts_name}.wi.weight"
    assert rows[stacked] == layer.name and rows[f"{layer.router_name}.classifier.weight"] == layer.name
    assert not any(".expert_" in name for name in rows)  # the modules' own names are behind the stacked ones
    tensor = read_rows(model, stacked)
    assert tensor.shape == (8, *layer.experts["expert_0"].wi.weight.shape)
    torch.testing.assert_close(tensor[3], layer.experts["expert_3"].wi.weight, rtol=0, atol=0)
    write_rows(model, stacked, torch.zeros_like(tensor))
    assert all(not expert.wi.weight.any() for expert in layer.experts.values())


def test_pruning_scales_the_expert_capacity_to_the_kept_experts():
    model = tiny_model("switch_transformers")
    first, second = moe_layers(model)[:2]
    select_experts(model, {first.name: [1, 5], second.name: [0, 2, 3, 6, 7]})
    assert first.router.expert_capacity == 64 * 8 // 2
    assert second.router.expert_capacity == -(-64 * 8 // 5)  # rounded up
    select_experts(model, {first.name: [0]})  # pruned again: still from the full model's capacity
    assert first.router.expert_capacity == 64 * 8
    assert model.config.expert_capacity == 64


def test_a_switch_sub_moe_trains_its_own_expert_modules_and_replies_in_global_order():
    model = tiny_model("switch_transformers")
    algorithm = fedmoe({"c0": 10**9})
    algorithm.prepare(model)
    state = algorithm.initial_global_state(model)
    layers = moe_layers(model)
    assert set(algorithm.layout.rows) == set(expert_row_tensors(model))
    assert not any(".expert_" in name for name in state)  # the global state holds stacked rows only
    held = [[1, 4, 6], [0, 7]]
    algorithm.assign("c0", held)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    info = ClientInfo("c0", 4)
    received = decode(encode(algorithm.downlink(state, info)))
    for name, layer in algorithm.layout.rows.items():  # the downlink carries the held experts' rows
        torch.testing.assert_close(received.tensors[name], state[name][held[layer]], rtol=0, atol=0)
    batches = switch_batches()
    context = algorithm.setup_client(model, received, None, LocalData(info, lambda: iter(batches)))
    view = context.model
    assert [layer.num_experts for layer in moe_layers(view)] == [3, 2]
    assert [layer.router.expert_capacity for layer in moe_layers(view)] == [-(-64 * 8 // 3), 64 * 4]

    reference = copy.deepcopy(model)  # the same sub-MoE made by plain surgery computes the same
    select_experts(reference, {layer.name: kept for layer, kept in zip(layers, held, strict=True)})
    with torch.no_grad():
        batch = {key: value for key, value in batches[0].items() if key != "labels"}
        decoder = {"decoder_input_ids": model._shift_right(batches[0]["labels"])}
        torch.testing.assert_close(view(**batch, **decoder).logits, reference(**batch, **decoder).logits)

    torch.manual_seed(0)
    train_local(view, batches, TrainConfig(steps_per_round=2, learning_rate=5e-2))
    reply = algorithm.uplink(context)
    for name in algorithm.layout.rows:
        assert reply.tensors[name].shape[0] == received.tensors[name].shape[0]
    moved = [name for name in algorithm.layout.rows if not torch.equal(reply.tensors[name], received.tensors[name])]
    assert any(".experts." in name for name in moved)  # the held expert modules trained
    for name, tensor in before.items():  # the base's experts and frozen weights are untouched
        if name not in algorithm.layout.dense:
            torch.testing.assert_close(model.get_parameter(name), tensor, rtol=0, atol=0)
    stacked = f"{layers[0].experts_name}.wo.weight"
    local = view.get_submodule(layers[0].experts_name)
    torch.testing.assert_close(reply.tensors[stacked][2], local["expert_2"].wo.weight.detach(), rtol=0, atol=0)
