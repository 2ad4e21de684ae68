import pytest
import torch

from fedexperts.models import TINY_FAMILIES, tiny_model
from fedexperts.moe import copy_experts, each_expert_output, moe_layers, one_expert_output, run_experts


def hidden_for(model, tokens=9):
    layer = moe_layers(model)[0]
    return torch.randn(
        tokens, layer.family.router_weight(layer.router).shape[1], generator=torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_each_expert_output_matches_one_forward_per_expert(model_type):
    model = tiny_model(model_type)
    hidden = hidden_for(model)
    with torch.no_grad():
        for layer in moe_layers(model):
            together = each_expert_output(layer, hidden)
            assert together.shape == (layer.num_experts, *hidden.shape)
            for expert in range(layer.num_experts):
                torch.testing.assert_close(together[expert], one_expert_output(layer, expert, hidden))


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_copied_experts_compute_a_weighted_sum_of_the_originals(model_type):
    model = tiny_model(model_type)
    hidden = hidden_for(model)
    layer = moe_layers(model)[-1]
    copies = copy_experts(layer, [4, 1])
    weights = torch.rand(hidden.shape[0], 2)
    with torch.no_grad():
        expected = weights[:, :1] * one_expert_output(layer, 4, hidden) + weights[:, 1:] * one_expert_output(
            layer, 1, hidden
        )
        torch.testing.assert_close(run_experts(layer, copies, hidden, weights), expected, rtol=1e-5, atol=1e-6)
    assert all(parameter.device.type == "cpu" for parameter in copies.parameters())
