import pytest
import torch
import transformers

from fedexperts.errors import UnsupportedModelError
from fedexperts.models import TINY_FAMILIES, UNAVAILABLE_TINY_FAMILIES, tiny_config, tiny_model
from fedexperts.models import tiny as tiny_module
from fedexperts.moe import ExpertLayout, family_for, moe_layer_by_name, moe_layers, supported_model_types

EXPECTED_SPARSE = {
    "qwen2_moe": ["model.layers.0.mlp", "model.layers.2.mlp"],  # mlp_only_layers=[1]
    "qwen3_moe": ["model.layers.1.mlp", "model.layers.2.mlp"],  # mlp_only_layers=[0]
    "olmoe": [f"model.layers.{i}.mlp" for i in range(3)],
    "mixtral": [f"model.layers.{i}.mlp" for i in range(3)],
    "deepseek_v2": ["model.layers.1.mlp", "model.layers.2.mlp"],  # first_k_dense_replace=1
    "deepseek_v3": ["model.layers.1.mlp", "model.layers.2.mlp"],
    "gpt_oss": [f"model.layers.{i}.mlp" for i in range(3)],
    "granitemoe": [f"model.layers.{i}.block_sparse_moe" for i in range(3)],
    "phimoe": [f"model.layers.{i}.mlp" for i in range(3)],
    "switch_transformers": ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"],  # sparse_step=2
    "qwen3_next": ["model.layers.0.mlp", "model.layers.1.mlp"],  # mlp_only_layers=[2]
    "qwen3_5_moe_text": [f"model.layers.{i}.mlp" for i in range(3)],
    "granitemoeshared": [f"model.layers.{i}.block_sparse_moe" for i in range(3)],
    "granitemoehybrid": [f"model.layers.{i}.block_sparse_moe" for i in range(3)],
    "jamba": ["model.layers.1.feed_forward", "model.layers.3.feed_forward"],  # expert_layer_period=2, offset 1
    "lfm2_moe": ["model.layers.1.feed_forward", "model.layers.2.feed_forward"],  # num_dense_layers=1
    "flex_olmo": [f"model.layers.{i}.mlp" for i in range(3)],
    "glm4_moe": ["model.layers.1.mlp", "model.layers.2.mlp"],  # first_k_dense_replace=1
    "glm4_moe_lite": ["model.layers.1.mlp", "model.layers.2.mlp"],  # mlp_layer_types
    "deepseek_v32": ["model.layers.1.mlp", "model.layers.2.mlp"],
    "dots1": ["model.layers.1.mlp", "model.layers.2.mlp"],
    "llama4_text": ["model.layers.0.feed_forward", "model.layers.2.feed_forward"],  # moe_layers=[0, 2]
    "minimax_m2": [f"model.layers.{i}.mlp" for i in range(3)],
    "minimax": [f"model.layers.{i}.mlp" for i in range(3)],
    "ernie4_5_moe": ["model.layers.1.mlp", "model.layers.2.mlp"],  # moe_layer_start_index=1
    "hunyuan_v1_moe": [f"model.layers.{i}.mlp" for i in range(3)],
}


def test_every_required_family_is_supported_and_has_a_tiny_config():
    required = {
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "mixtral",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "granitemoe",
        "phimoe",
        "switch_transformers",
    }
    assert required <= set(supported_model_types())
    assert required <= set(TINY_FAMILIES)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_sparse_blocks_found_at_config_layers(model_type):
    model = tiny_model(model_type)
    layers = moe_layers(model)
    assert [layer.name for layer in layers] == EXPECTED_SPARSE[model_type]
    family = family_for(model)
    for layer in layers:
        assert model.get_submodule(layer.name) is layer.block
        assert layer.num_experts == family.config_num_experts(model.config) == 8
        assert layer.top_k == family.config_top_k(model.config)
        assert model.get_submodule(layer.router_name) is layer.router
        assert model.get_submodule(layer.experts_name) is layer.experts


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_expert_tensors_have_one_row_per_expert(model_type):
    model = tiny_model(model_type)
    for layer in moe_layers(model):
        family = layer.family
        if family.layout is ExpertLayout.MODULE_PER_EXPERT:
            assert sorted(layer.experts.keys()) == sorted(f"expert_{i}" for i in range(8))
        for name in family.expert_tensors:
            assert layer.experts.get_parameter(name).shape[0] == 8
        assert family.router_weight(layer.router).shape == (
            8,
            model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model,
        )


def test_gpt_oss_layout_is_transposed_and_interleaved():
    model = tiny_model("gpt_oss")
    layer = moe_layers(model)[0]
    assert layer.family.layout is ExpertLayout.FUSED_TRANSPOSED_INTERLEAVED
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    assert layer.experts.gate_up_proj.shape == (8, hidden, 2 * intermediate)
    assert layer.experts.down_proj.shape == (8, intermediate, hidden)
    assert layer.experts.is_transposed and not layer.experts.is_concatenated


@pytest.mark.parametrize(
    ("model_type", "attrs"),
    [
        ("qwen2_moe", ("shared_expert", "shared_expert_gate")),
        ("qwen3_next", ("shared_expert", "shared_expert_gate")),
        ("qwen3_5_moe_text", ("shared_expert", "shared_expert_gate")),
        ("deepseek_v2", ("shared_experts",)),
        ("deepseek_v3", ("shared_experts",)),
        ("olmoe", ()),
        ("glm4_moe", ("shared_experts",)),
        ("llama4_text", ("shared_expert",)),
        ("ernie4_5_moe", ("shared_experts",)),
        ("hunyuan_v1_moe", ("shared_mlp",)),
    ],
)
def test_shared_experts_are_found(model_type, attrs):
    model = tiny_model(model_type)
    for layer in moe_layers(model):
        assert layer.shared_experts == tuple(getattr(layer.block, attr) for attr in attrs)


def test_a_disabled_shared_expert_is_not_reported():
    model = tiny_model("ernie4_5_moe", moe_num_shared_experts=0)
    assert all(layer.block.shared_experts is None and layer.shared_experts == () for layer in moe_layers(model))


def test_every_descriptor_has_a_tiny_config():
    """Text models that exist only inside a wrapper (no causal-LM class of their own) are tested through
    their wrapper (tests/moe/test_wrappers.py)."""
    from fedexperts.moe.descriptors.wrapped import WRAPPED
    from tests.moe.test_wrappers import TEXT_TYPES

    wrapped = {family.model_type for family in WRAPPED}
    assert wrapped <= set(TEXT_TYPES.values())
    assert set(supported_model_types()) - wrapped <= set(TINY_FAMILIES)


def test_decoder_sparse_step_is_respected():
    model = tiny_model("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2)
    assert [layer.layer_index for layer in moe_layers(model)] == [1, 3]


def test_unknown_model_type_names_type_and_supported_list():
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32, vocab_size=64
    )
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match=r"'llama' is not a supported MoE family.*olmoe"):
        moe_layers(model)


def test_model_without_moe_layer_is_refused():
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2_moe", mlp_only_layers=[0, 1, 2]))
    with pytest.raises(UnsupportedModelError, match="has no MoE layer"):
        moe_layers(model)


def test_config_and_structure_disagreement_is_detected():
    model = tiny_model("deepseek_v2")
    model.config.first_k_dense_replace = 0  # the config now claims layer 0 is sparse; the module is dense
    with pytest.raises(UnsupportedModelError, match="config declares sparse layers"):
        moe_layers(model)


def test_unknown_layer_name_is_reported():
    model = tiny_model("olmoe")
    with pytest.raises(UnsupportedModelError, match="not MoE layers"):
        moe_layer_by_name(model, ["model.layers.9.mlp"])


@pytest.mark.parametrize("model_type", sorted(UNAVAILABLE_TINY_FAMILIES))
def test_a_family_the_installed_transformers_lacks_is_skipped(model_type):
    pytest.skip(UNAVAILABLE_TINY_FAMILIES[model_type])


def test_a_tiny_config_of_a_family_transformers_lacks_says_why(monkeypatch):
    monkeypatch.setitem(tiny_module.UNAVAILABLE_TINY_FAMILIES, "jamba", "transformers 5.17 has no model type 'jamba'")
    with pytest.raises(UnsupportedModelError, match=r"transformers 5\.17 has no model type 'jamba'"):
        tiny_config("jamba")


def test_tiny_config_of_unknown_family():
    with pytest.raises(UnsupportedModelError, match="no tiny config"):
        tiny_config("bert")


def test_tiny_models_run(batch_factory):
    for model_type in ("olmoe", "switch_transformers"):
        model = tiny_model(model_type)
        with torch.no_grad():
            assert torch.isfinite(model(**batch_factory(model)).logits).all()
