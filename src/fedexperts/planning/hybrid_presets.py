"""Presets of hybrid MoE checkpoints: Qwen3-Next-80B-A3B, Qwen3.5-35B-A3B's text model, Granite-4.0-H-Small.

The fields were written from the checkpoints' published ``config.json`` and model cards without
network access here; a field we are not sure of is marked in a comment (none of them changes a
tensor's shape unless the comment says so). Fields that do not change a tensor's shape (dropout,
init range, cache, Granite's scaling multipliers, token ids we are unsure of) are left at
transformers' defaults. The totals are checked against the published parameter counts in
``tests/planning/test_presets.py``.
"""

from __future__ import annotations

from typing import Any

_GRANITE_4_H_SMALL_LAYERS = ["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)]
"""4 attention and 36 Mamba-2 layers (the model card's count). Which four are attention is our recollection
of ``layer_types`` (uncertain); the count, which is what the sizes depend on, is the card's."""

HYBRID_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-Next-80B-A3B-Instruct (the checkpoint's MTP layers are not part of transformers' model)
    "qwen3-next-80b-a3b": {
        "model_type": "qwen3_next",
        "hidden_size": 2048,
        "intermediate_size": 5120,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "num_hidden_layers": 48,
        "full_attention_interval": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "partial_rotary_factor": 0.25,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "vocab_size": 151936,
        "max_position_embeddings": 262144,
        "rope_theta": 10000000,
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "router_aux_loss_coef": 0.001,
    },
    # Qwen/Qwen3.5-35B-A3B, its text_config (the checkpoint is the composite vision-language model; the
    # vision tower and MTP layers are not planned). These are transformers' Qwen3_5MoeTextConfig defaults,
    # which its docstring gives as this checkpoint's; not compared field by field with the hub file here.
    "qwen3.5-35b-a3b": {
        "model_type": "qwen3_5_moe_text",
        "hidden_size": 2048,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "num_hidden_layers": 40,
        "full_attention_interval": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "partial_rotary_factor": 0.25,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "num_experts": 256,
        "num_experts_per_tok": 8,
        "vocab_size": 248320,
        "max_position_embeddings": 262144,  # uncertain (the config class defaults to 32768; no shape depends on it)
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "router_aux_loss_coef": 0.001,
    },
    # ibm-granite/granite-4.0-h-small
    "granite-4.0-h-small": {
        "model_type": "granitemoehybrid",
        "hidden_size": 4096,
        "intermediate_size": 768,  # one routed expert's hidden size
        "shared_intermediate_size": 1536,
        "num_hidden_layers": 40,
        "layer_types": _GRANITE_4_H_SMALL_LAYERS,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 72,
        "num_experts_per_tok": 10,
        "mamba_n_heads": 128,
        "mamba_d_head": 64,
        "mamba_d_state": 128,
        "mamba_n_groups": 1,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": 256,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "position_embedding_type": "nope",
        "vocab_size": 100352,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "attention_bias": False,
        "tie_word_embeddings": True,  # uncertain: moves the total by one embedding matrix (0.41B, 1.3%)
    },
}
"""Architecture fields of the hybrid checkpoints' ``config.json``, by short name (merged into ``PRESETS``)."""

HYBRID_PRESET_SOURCES: dict[str, str] = {
    "qwen3-next-80b-a3b": "Qwen/Qwen3-Next-80B-A3B-Instruct",
    "qwen3.5-35b-a3b": "Qwen/Qwen3.5-35B-A3B",
    "granite-4.0-h-small": "ibm-granite/granite-4.0-h-small",
}
