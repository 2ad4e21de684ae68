"""What to plan: checkpoint presets, reading a model's ``config.json``, and dtype names.

Presets are the architecture fields of each checkpoint's ``config.json`` on the Hugging Face hub.
A model to plan is a preset's name, a ``config.json`` or a folder holding one; either way it
becomes a transformers config of transformers' own implementation of the ``model_type``:
``auto_map`` (remote code) is never run, and ``quantization_config`` is dropped, so e.g. gpt-oss
is sized dequantized in the chosen dtype. Anything else is a :class:`PlanError`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import transformers

from fedexperts.errors import FedExpertsError
from fedexperts.moe.families import supported_model_types
from fedexperts.planning.frontier_presets import FRONTIER_PRESETS, FRONTIER_SOURCES
from fedexperts.planning.hybrid_presets import HYBRID_PRESET_SOURCES, HYBRID_PRESETS
from fedexperts.planning.switch_presets import SWITCH_PRESETS, SWITCH_SOURCES


class PlanError(FedExpertsError):
    """A model to plan that is neither a preset nor a readable config of a supported MoE."""


_GPT_OSS_LAYER_TYPES = ["sliding_attention", "full_attention"] * 12

PRESETS: dict[str, dict[str, Any]] = {
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": {
        "model_type": "olmoe",
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "vocab_size": 50304,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05,
        "clip_qkv": None,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "pad_token_id": 1,
        "eos_token_id": 50279,
        "router_aux_loss_coef": 0.01,
    },
    # Qwen/Qwen1.5-MoE-A2.7B
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "norm_topk_prob": False,
        "vocab_size": 151936,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "router_aux_loss_coef": 0.001,
    },
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "max_window_layers": 48,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "router_aux_loss_coef": 0.001,
    },
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-05,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "router_aux_loss_coef": 0.02,
    },
    # deepseek-ai/DeepSeek-V2-Lite (its config.json also has an auto_map to remote code, not needed here)
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2",
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "vocab_size": 102400,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
    # openai/gpt-oss-20b (experts stored as MXFP4 on the hub; sized here dequantized, in the chosen dtype)
    "gpt-oss-20b": {
        "model_type": "gpt_oss",
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "vocab_size": 201088,
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "sliding_window": 128,
        "layer_types": _GPT_OSS_LAYER_TYPES,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        "attention_bias": True,
        "swiglu_limit": 7.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "router_aux_loss_coef": 0.9,
    },
    **HYBRID_PRESETS,
    **FRONTIER_PRESETS,
    **SWITCH_PRESETS,
}
"""Architecture fields of real checkpoints' ``config.json`` (transformers config kwargs), by short name.

Taken from the hub checkpoints ``allenai/OLMoE-1B-7B-0924``, ``Qwen/Qwen1.5-MoE-A2.7B``,
``Qwen/Qwen3-30B-A3B``, ``mistralai/Mixtral-8x7B-v0.1``, ``deepseek-ai/DeepSeek-V2-Lite`` and
``openai/gpt-oss-20b`` (see :data:`PRESET_SOURCES`); fields that do not change a tensor's shape
(dropout, init range, cache) are left at transformers' defaults. The 2025 frontier checkpoints
(GLM-4.5-Air, Llama-4-Scout, MiniMax-M2, ERNIE-4.5-21B-A3B) are in :mod:`.frontier_presets`, the
Switch-Base checkpoints of FedMoE's paper in :mod:`.switch_presets`.
"""

PRESET_SOURCES: dict[str, str] = {
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
    "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    **HYBRID_PRESET_SOURCES,
    **FRONTIER_SOURCES,
    **SWITCH_SOURCES,
}
"""The hub checkpoint each preset's config was taken from."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def presets_hint() -> str:
    """The presets an error message offers: ``presets: olmoe-1b-7b, ...``."""
    return "presets: " + ", ".join(PRESETS)


def resolve_dtype(dtype: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """A torch dtype from a name such as ``bfloat16`` (or ``bf16``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PlanError(f"unknown {what} {dtype!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_plan_config(source: str | Path) -> tuple[str, transformers.PretrainedConfig]:
    """``(display name, config)`` for a preset name, a ``config.json``, or a folder holding one."""
    text = str(source)
    if isinstance(source, str) and source in PRESETS:
        return source, _config_from_dict(dict(PRESETS[source]), source)
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"{text!r} is not a preset, nor a config.json or a folder holding one; {presets_hint()}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_hook=_special_float)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PlanError(f"{path}: not a readable JSON config ({error}); {presets_hint()}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise PlanError(f"{path}: a model config.json needs a model_type; {presets_hint()}")
    return text, _config_from_dict(data, text)


_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _special_float(value: dict[str, Any]) -> Any:
    """``save_pretrained`` writes inf and nan as ``{"__float__": "Infinity"}`` (Granite-4's ``time_step_limit``)."""
    if value.keys() == {"__float__"} and value["__float__"] in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[value["__float__"]]
    return value


def _config_from_dict(data: dict[str, Any], source: str) -> transformers.PretrainedConfig:
    fields = {key: value for key, value in data.items() if key not in ("auto_map", "quantization_config")}
    model_type = fields.pop("model_type")
    if model_type not in transformers.CONFIG_MAPPING:  # a known type without a descriptor is tried on its model
        raise PlanError(
            f"{source}: model_type {model_type!r} is not a supported MoE family, nor a transformers model type "
            f"(supported: {', '.join(supported_model_types())}); {presets_hint()}"
        )
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as error:
        raise PlanError(f"{source}: invalid {model_type} config: {error}") from None
