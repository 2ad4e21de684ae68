"""What the hybrid descriptors add to the identity suite: where attention LoRA goes in each layer kind,
layer-level shared MLPs, LFM2-MoE's block-level expert bias."""

import pytest
import torch

from fedexperts.algorithms.base import attention_linear_names
from fedexperts.models import tiny_model
from fedexperts.moe import ParamKind, moe_layers, parameter_kinds, select_experts

# Per layer of each tiny config: the linears attention LoRA adapts (the Mamba-2 out_proj of Granite-4
# and Jamba's dt_proj are read by weight in a fused kernel / a matmul, so they get none).
ATTENTION = ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
LORA_PLACEMENT = {
    "qwen3_next": [
        ("linear_attn", ("in_proj_qkvz", "in_proj_ba", "out_proj")),
        ATTENTION,
        ("linear_attn", ("in_proj_qkvz", "in_proj_ba", "out_proj")),
    ],
    "qwen3_5_moe_text": [
        ("linear_attn", ("out_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")),
        ATTENTION,
        ("linear_attn", ("out_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")),
    ],
    "granitemoehybrid": [("mamba", ("in_proj",)), ATTENTION, ("mamba", ("in_proj",))],
    "jamba": [
        ("mamba", ("in_proj", "x_proj", "out_proj")),
        ATTENTION,
        ("mamba", ("in_proj", "x_proj", "out_proj")),
        ("mamba", ("in_proj", "x_proj", "out_proj")),
    ],
    "lfm2_moe": [
        ("conv", ("in_proj", "out_proj")),
        ("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
        ("conv", ("in_proj", "out_proj")),
    ],
}


@pytest.mark.parametrize("model_type", sorted(LORA_PLACEMENT))
def test_attention_lora_goes_on_each_layers_own_token_mixer(model_type):
    model = tiny_model(model_type)
    expected = [
        f"model.layers.{index}.{mixer}.{linear}"
        for index, (mixer, linears) in enumerate(LORA_PLACEMENT[model_type])
        for linear in linears
    ]
    assert sorted(attention_linear_names(model)) == sorted(expected)
    kinds = parameter_kinds(model)
    for index, (mixer, _) in enumerate(LORA_PLACEMENT[model_type]):
        prefix = f"model.layers.{index}.{mixer}."
        owned = [info.kind for name, info in kinds.items() if name.startswith(prefix)]
        assert owned and set(owned) == {ParamKind.ATTENTION}  # the mixer's own weights (conv, A_log, ...) too


@pytest.mark.parametrize("model_type", ["granitemoeshared", "granitemoehybrid"])
def test_granites_shared_mlp_beside_the_block_is_its_shared_expert(model_type):
    model = tiny_model(model_type)
    kinds = parameter_kinds(model)
    for layer in moe_layers(model):
        shared_mlp = model.model.layers[layer.layer_index].shared_mlp
        assert layer.shared_experts == (shared_mlp,)
        assert kinds[f"model.layers.{layer.layer_index}.shared_mlp.input_linear.weight"].kind is ParamKind.SHARED_EXPERT


def test_lfm2_expert_bias_moves_with_its_experts(batch_factory):
    model = tiny_model("lfm2_moe")
    layers = moe_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.block.expert_bias.copy_(torch.linspace(-0.3, 0.4, 8))  # a trained router's bias is not zero
    batch = batch_factory(model)
    with torch.no_grad():
        before = model(**batch).logits
    biases = {layer.name: layer.block.expert_bias.clone() for layer in layers}
    permutation = [5, 2, 7, 0, 1, 6, 3, 4]
    select_experts(model, {layer.name: permutation for layer in layers})
    for layer in moe_layers(model):
        assert torch.equal(layer.block.expert_bias, biases[layer.name][permutation])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-4, atol=1e-5)
    select_experts(model, {layer.name: [0, 2, 4] for layer in moe_layers(model)})
    assert all(layer.block.expert_bias.shape == (3,) for layer in moe_layers(model))
