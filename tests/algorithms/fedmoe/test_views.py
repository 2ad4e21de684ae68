"""FedMoE's model side: the sub-MoE view, byte sizes of a real model, activation measurement."""

import pytest
import torch

from fedexperts.algorithms.fedmoe.search import choose_sub_moe
from fedexperts.algorithms.fedmoe.views import expert_and_dense_bytes, measure_activation, sub_moe_view
from fedexperts.config import TrainConfig
from fedexperts.errors import FedExpertsError
from fedexperts.federation.payload import decode, encode
from fedexperts.interface import ClientInfo, LocalData
from fedexperts.models import tiny_model
from fedexperts.moe import moe_layers, select_experts
from fedexperts.training import train_local
from tests.algorithms.fedmoe.common import fedmoe, prepared
from tests.algorithms.helpers import batches_for

# -- the client model ------------------------------------------------------------------------------------


def test_the_sub_moe_view_shares_non_expert_tensors_and_leaves_the_base_unchanged(sizes):
    full, _, _ = sizes
    algorithm = fedmoe({"c0": full - 1})
    model, state = prepared(algorithm)
    algorithm.assign("c0", [[1, 4], [0, 2, 5], [3, 4, 6, 7]])  # different counts: the model-level aux loss goes off
    before = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    config_before = model.config.to_dict()
    info = ClientInfo("c0", 4)
    received = decode(encode(algorithm.downlink(state, info)))
    batches = batches_for(model, 0)
    context = algorithm.setup_client(model, received, None, LocalData(info, lambda: iter(batches)))
    view = context.model
    assert view is not model

    rows = set(algorithm.layout.rows)
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
    for name in algorithm.layout.rows:
        torch.testing.assert_close(view.get_parameter(name), received.tensors[name], rtol=0, atol=0)
        assert view.get_parameter(name).requires_grad and not model.get_parameter(name).requires_grad

    torch.manual_seed(0)
    train_local(view, batches, TrainConfig(steps_per_round=3, learning_rate=5e-2))
    reply = algorithm.uplink(context)
    for name in rows:
        assert not torch.equal(reply.tensors[name], received.tensors[name])  # the view's experts trained
    for name, tensor in before.items():
        current = dict([*model.named_parameters(), *model.named_buffers()])[name]
        if name in algorithm.layout.dense:
            assert not torch.equal(current, tensor)  # LoRA is the base model's own tensor, trained in place
        else:
            torch.testing.assert_close(current, tensor, rtol=0, atol=0)  # experts and frozen weights: bit-identical
    assert model.config.to_dict() == config_before
    assert [layer.num_experts for layer in moe_layers(model)] == [8, 8, 8] and model.num_experts == 8


def test_view_memory_is_what_the_budget_accounting_says(sizes):
    full, _, _ = sizes
    algorithm = fedmoe({"c0": full - 1})
    model, _ = prepared(algorithm)
    structure = [[0, 1], [2, 3, 4], [0, 5, 6, 7]]
    view = sub_moe_view(model, dict(zip([layer.name for layer in moe_layers(model)], structure, strict=True)))
    actual = sum(t.numel() * t.element_size() for t in [*view.parameters(), *view.buffers()])
    assert algorithm.memory(structure) == actual
    assert algorithm.full_bytes == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_measured_activation_is_token_fractions_over_at_most_the_asked_rows():
    model = tiny_model("olmoe").train()
    batches = batches_for(model, 0, count=3)  # 4 rows each
    first = measure_activation(model, batches, 4)
    assert [vector.dtype for vector in first] == [torch.float64] * 3
    assert all(float(vector.sum()) == pytest.approx(2.0) for vector in first)  # fractions of tokens, top-2
    assert all(torch.equal(a, b) for a, b in zip(first, measure_activation(model, batches[:1], 100), strict=True))
    assert model.training  # measured in eval mode, then restored
    with pytest.raises(FedExpertsError, match="no training rows"):
        measure_activation(model, [], 4)


# -- byte sizes of a real model --------------------------------------------------------------------


def test_expert_and_dense_bytes_olmoe_by_hand():
    dense, experts = expert_and_dense_bytes(tiny_model("olmoe"))
    # one expert: gate_up (32 x 32) + down (32 x 16) + router row (32) floats
    assert experts == [(32 * 32 + 32 * 16 + 32) * 4] * 3
    attention = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 32 + 16  # q, k, v, o, q_norm, k_norm
    per_layer = attention + 2 * 32  # + input / post-attention norms
    model_wide = 128 * 32 * 2 + 32 + 4 + 4  # embeddings, lm_head, final norm, rotary inv_freq buffers
    assert dense == (3 * per_layer + model_wide) * 4


def test_expert_and_dense_bytes_deepseek_v3_by_hand():
    dense, experts = expert_and_dense_bytes(tiny_model("deepseek_v3"))
    # one expert: gate_up + down + router row + its e_score_correction_bias entry
    assert experts == [(32 * 32 + 32 * 16 + 32 + 1) * 4] * 2
    attention = 16 * 32 + 16 + 64 * 16 + 24 * 32 + 16 + 64 * 16 + 32 * 32  # MLA projections and norms
    per_layer = attention + 2 * 32
    dense_mlp = 3 * 48 * 32  # layer 0 is dense
    shared_experts = 2 * (3 * 16 * 32)  # layers 1 and 2: shared experts are dense
    model_wide = 128 * 32 * 2 + 32 + 4 + 4
    assert dense == (3 * per_layer + dense_mlp + shared_experts + model_wide) * 4


def test_chosen_memory_is_the_pruned_models_size():
    model = tiny_model("olmoe")
    dense, experts = expert_and_dense_bytes(model)
    layers = moe_layers(model)
    generator = torch.Generator().manual_seed(3)
    activation = [torch.rand(layer.num_experts, generator=generator) for layer in layers]
    budget = dense + 5 * sum(experts)
    choice = choose_sub_moe(
        activation,
        budget_bytes=budget,
        dense_bytes=dense,
        expert_bytes=experts,
        min_experts=[layer.top_k for layer in layers],
    )
    select_experts(model, choice.keep([layer.name for layer in layers]))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    assert size == choice.memory_bytes <= budget
    assert expert_and_dense_bytes(model) == (dense, experts)
