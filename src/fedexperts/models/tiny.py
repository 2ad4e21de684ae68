"""Tiny random-weight configs of every supported MoE family, for tests, demos and benchmarks.

Each is a stock transformers config (hidden 32, a few layers, 8 experts, top-2) with the family's
own quirks switched on: a dense first layer for DeepSeek, a dense layer in Qwen's
``mlp_only_layers``, a shared expert where the family has one, group-limited routing for DeepSeek,
alternating sparse blocks in Switch Transformers; in hybrid models both kinds of token mixer
(linear attention, Mamba or convolution layers beside softmax attention) and dense layers beside
sparse ones. A family the installed transformers does not define is left out of
:data:`TINY_FAMILIES` and listed, with the reason, in :data:`UNAVAILABLE_TINY_FAMILIES`.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from fedexperts.errors import UnsupportedModelError

COMMON_FIELDS: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
    "num_experts_per_tok": 2,
    "intermediate_size": 16,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""The fields every decoder-only tiny config shares (hidden 32, 3 layers, 4 heads, vocabulary 128, top-2)."""

_GATED_DELTANET: dict[str, Any] = {
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
}

_FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        "num_experts": 8,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "mlp_only_layers": [1],
        "intermediate_size": 48,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "num_experts": 8,
        "moe_intermediate_size": 16,
        "mlp_only_layers": [0],
        "intermediate_size": 48,
    },
    "olmoe": {"num_experts": 8},
    "mixtral": {"num_local_experts": 8},
    "deepseek_v2": {
        "n_routed_experts": 8,
        "moe_intermediate_size": 16,
        "intermediate_size": 48,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
    },
    "deepseek_v3": {
        "n_routed_experts": 8,
        "moe_intermediate_size": 16,
        "intermediate_size": 48,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "n_group": 2,
        "topk_group": 1,
    },
    "gpt_oss": {"num_local_experts": 8, "head_dim": 8, "layer_types": None},
    "granitemoe": {"num_local_experts": 8},
    "phimoe": {"num_local_experts": 8},
    "qwen3_next": {
        "num_experts": 8,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "intermediate_size": 48,
        "head_dim": 8,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
        "mlp_only_layers": [2],
        **_GATED_DELTANET,
    },
    "qwen3_5_moe_text": {
        "num_experts": 8,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "head_dim": 8,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
        **_GATED_DELTANET,
    },
    "granitemoeshared": {
        "num_local_experts": 8,
        "shared_intermediate_size": 24,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.25,
        "logits_scaling": 2.0,
    },
    "granitemoehybrid": {
        "num_local_experts": 8,
        "shared_intermediate_size": 24,
        "layer_types": ["mamba", "attention", "mamba"],  # the hub's names (5.24 reads them as legacy)
        "mamba_n_heads": 4,
        "mamba_d_state": 8,
        "mamba_chunk_size": 4,
        "residual_multiplier": 0.5,
    },
    "jamba": {
        "num_experts": 8,
        "intermediate_size": 32,  # experts and dense MLPs alike
        "num_hidden_layers": 4,
        "attn_layer_period": 4,
        "attn_layer_offset": 1,  # attention in layer 1, Mamba in 0, 2, 3
        "expert_layer_period": 2,
        "expert_layer_offset": 1,  # sparse in layers 1 (attention) and 3 (Mamba)
        "mamba_d_state": 8,
        "mamba_dt_rank": 4,
    },
    "lfm2_moe": {
        "num_experts": 8,
        "moe_intermediate_size": 16,
        "intermediate_size": 48,
        "num_dense_layers": 1,
        "layer_types": ["conv", "full_attention", "conv"],
        "use_expert_bias": True,
        "routed_scaling_factor": 2.0,
        "conv_L_cache": 3,
    },
    "flex_olmo": {"num_experts": 8},
    "glm4_moe": {
        "n_routed_experts": 8,
        "moe_intermediate_size": 16,
        "intermediate_size": 48,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "head_dim": 8,
        "partial_rotary_factor": 0.5,
    },
    "glm4_moe_lite": {
        "n_routed_experts": 8,
        "moe_intermediate_size": 16,
        "intermediate_size": 48,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "n_shared_experts": 1,
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "n_group": 2,
        "topk_group": 1,
    },
    "deepseek_v32": {
        "n_routed_experts": 8,
        "moe_intermediate_size": 16,
        "intermediate_size": 48,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "head_dim": 8,
        "n_group": 2,
        "topk_group": 1,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_topk": 64,  # above the tests' sequence lengths: the indexer keeps every token
    },
    "dots1": {
        "n_routed_experts": 8,
        "moe_intermediate_size": 16,
        "intermediate_size": 48,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "head_dim": 8,
    },
    "llama4_text": {
        "num_local_experts": 8,
        "intermediate_size": 16,
        "intermediate_size_mlp": 48,
        "moe_layers": [0, 2],  # Llama-4-Maverick interleaves dense and sparse layers
        "head_dim": 8,
        "attention_chunk_size": 4,
    },
    "minimax_m2": {"num_local_experts": 8, "head_dim": 8, "rotary_dim": 4},
    "minimax": {
        "num_local_experts": 8,
        "head_dim": 8,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
        "block_size": 4,
    },
    "ernie4_5_moe": {
        "moe_num_experts": 8,
        "moe_k": 2,
        "moe_intermediate_size": 16,
        "intermediate_size": 48,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 2,
        "moe_layer_interval": 1,
    },
    "hunyuan_v1_moe": {"num_experts": 8, "moe_topk": 2, "head_dim": 8, "use_qk_norm": True},
    "switch_transformers": {
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 32,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "num_experts": 8,
        "expert_capacity": 64,
        "encoder_sparse_step": 2,
        "decoder_sparse_step": 2,
        "vocab_size": 128,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "router_bias": False,
        "tie_word_embeddings": False,
    },
}

UNAVAILABLE_TINY_FAMILIES: dict[str, str] = {
    model_type: f"transformers {transformers.__version__} has no model type {model_type!r}"
    for model_type in _FAMILY_OVERRIDES
    if model_type not in CONFIG_MAPPING
}
"""Families with a tiny config that the installed transformers does not define (it is older), and why."""

TINY_FAMILIES: tuple[str, ...] = tuple(t for t in _FAMILY_OVERRIDES if t not in UNAVAILABLE_TINY_FAMILIES)


def tiny_config(model_type: str, **overrides: Any) -> transformers.PretrainedConfig:
    """A tiny config of ``model_type``; keyword arguments override any field."""
    if model_type in UNAVAILABLE_TINY_FAMILIES:
        raise UnsupportedModelError(UNAVAILABLE_TINY_FAMILIES[model_type])
    if model_type not in _FAMILY_OVERRIDES:
        raise UnsupportedModelError(f"no tiny config for {model_type!r}; have: {', '.join(TINY_FAMILIES)}")
    fields = dict(_FAMILY_OVERRIDES[model_type])
    if model_type != "switch_transformers":
        fields = {**COMMON_FIELDS, **fields}
    fields.update(overrides)
    fields = {key: value for key, value in fields.items() if value is not None or key == "q_lora_rank"}
    return transformers.AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny model of ``model_type`` in eval mode (deterministic per seed)."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    model: PreTrainedModel = auto.from_config(config)
    _randomise_zero_initialised(model)
    return model.eval()


@torch.no_grad()
def _randomise_zero_initialised(model: PreTrainedModel) -> None:
    """Give routers random rows: several families initialise them to zero, which ties every expert."""
    from fedexperts.moe.families import moe_layers

    for layer in moe_layers(model):
        weight = layer.family.router_weight(layer.router)
        weight.normal_(0.0, 0.5)
