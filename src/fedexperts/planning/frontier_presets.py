"""Presets of the 2025 frontier checkpoints: GLM-4.5-Air, Llama-4-Scout (its text model), MiniMax-M2, ERNIE-4.5-21B-A3B.

The architecture fields of each checkpoint's ``config.json`` on the hub, written from memory of
those files without network access: every field that sets a tensor's shape is listed (and the
totals are checked against the published parameter counts in ``tests/planning``); fields whose
value was not certain and that do not change a shape are left at transformers' defaults, and
each preset says which. Multi-token-prediction layers (GLM's ``num_nextn_predict_layers``,
MiniMax's MTP modules) are not part of transformers' models, so they are not sized.
"""

from __future__ import annotations

from typing import Any

FRONTIER_PRESETS: dict[str, dict[str, Any]] = {
    # zai-org/GLM-4.5-Air. Not certain: eos_token_id's list (left out).
    "glm-4.5-air": {
        "model_type": "glm4_moe",
        "hidden_size": 4096,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 46,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "use_qk_norm": False,
        "n_routed_experts": 128,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "vocab_size": 151552,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "pad_token_id": 151329,
    },
    # meta-llama/Llama-4-Scout-17B-16E, its config.json's text_config (the vision tower is not sized). Not
    # certain: the rope_scaling block and no_rope_layers (left at transformers' defaults: llama3 scaling does
    # not change a shape; NoPE every 4th layer is the default), eos_token_id's list (left out).
    "llama-4-scout-17b-16e": {
        "model_type": "llama4_text",
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_local_experts": 16,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": True,
        "attention_chunk_size": 8192,
        "attention_bias": False,
        "vocab_size": 202048,
        "max_position_embeddings": 10485760,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "bos_token_id": 200000,
        "pad_token_id": 200018,
    },
    # MiniMaxAI/MiniMax-M2. Not certain: rotary_dim (64; partial rotary does not change a shape), the
    # bos/eos ids (left out).
    "minimax-m2": {
        "model_type": "minimax_m2",
        "hidden_size": 3072,
        "intermediate_size": 1536,
        "num_hidden_layers": 62,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rotary_dim": 64,
        "num_local_experts": 256,
        "num_experts_per_tok": 8,
        "vocab_size": 200064,
        "max_position_embeddings": 196608,
        "rope_theta": 5000000,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
    },
    # baidu/ERNIE-4.5-21B-A3B-PT (the transformers-format checkpoint). Not certain: head_dim (128, what
    # hidden_size / num_attention_heads gives anyway).
    "ernie-4.5-21b-a3b": {
        "model_type": "ernie4_5_moe",
        "hidden_size": 2560,
        "intermediate_size": 12288,
        "num_hidden_layers": 28,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "moe_num_experts": 64,
        "moe_num_shared_experts": 2,
        "moe_k": 6,
        "moe_intermediate_size": 1536,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 27,
        "moe_layer_interval": 1,
        "use_bias": False,
        "vocab_size": 103424,
        "max_position_embeddings": 131072,
        "rope_theta": 500000,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}
"""Architecture fields of the frontier checkpoints' ``config.json`` (transformers config kwargs), by short name."""

FRONTIER_SOURCES: dict[str, str] = {
    "glm-4.5-air": "zai-org/GLM-4.5-Air",
    "llama-4-scout-17b-16e": "meta-llama/Llama-4-Scout-17B-16E",
    "minimax-m2": "MiniMaxAI/MiniMax-M2",
    "ernie-4.5-21b-a3b": "baidu/ERNIE-4.5-21B-A3B-PT",
}
