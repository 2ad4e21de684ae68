"""Presets of the Switch Transformers checkpoints FedMoE's paper runs on: switch-base-8 and switch-base-32.

The fields are those of the checkpoints' ``config.json`` on the hub (``google/switch-base-8``,
``google/switch-base-32``), written from memory of those files without network access; the two
differ only in ``num_experts``. Each field's source is named below. Every field that sets a tensor's
shape is listed, because ``SwitchTransformersConfig``'s own defaults are *not* these checkpoints
(its docstring says they resemble switch-base-8, but they give ``d_ff`` 2048 and 3 sparse blocks per
stack, where the checkpoints have 3072 and 6). The totals are checked against the hub's parameter
counts in ``tests/planning/test_presets.py``. Shape-free fields (dropout, router loss coefficients,
jitter, ``router_dtype``) are left at transformers' defaults, which are the checkpoints' values as
remembered.
"""

from __future__ import annotations

from typing import Any

_SWITCH_BASE: dict[str, Any] = {
    "model_type": "switch_transformers",
    # the T5-Base shape (T5 v1.0: ReLU MLP, not gated; tied input and output embeddings): config.json
    "vocab_size": 32128,
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 3072,
    "num_heads": 12,
    "num_layers": 12,
    "num_decoder_layers": 12,
    "dense_act_fn": "relu",
    "is_gated_act": False,
    "tie_word_embeddings": True,  # not in config.json: transformers' default, which the hub's 0.62B total needs
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-06,
    # every other block of each stack is sparse (blocks 1, 3, ..., 11): config.json's 6 sparse layers of 12,
    # which transformers turns into encoder_sparse_step = decoder_sparse_step = 2
    "num_sparse_encoder_layers": 6,
    "num_sparse_decoder_layers": 6,
    # top-1 routing with 64 token slots per expert and sequence, no router bias: config.json
    "expert_capacity": 64,
    "router_bias": False,
    "router_ignore_padding_tokens": False,
    # token ids: config.json (T5's: pad 0 also starts the decoder, eos 1)
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

SWITCH_PRESETS: dict[str, dict[str, Any]] = {
    "switch-base-8": {**_SWITCH_BASE, "num_experts": 8},
    "switch-base-32": {**_SWITCH_BASE, "num_experts": 32},
}
"""Architecture fields of the Switch-Base checkpoints' ``config.json`` (transformers config kwargs), by short name."""

SWITCH_SOURCES: dict[str, str] = {
    "switch-base-8": "google/switch-base-8",
    "switch-base-32": "google/switch-base-32",
}
