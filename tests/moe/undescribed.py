"""Tiny random models of MoE types fedexperts has no descriptor for, and of wrapper (multimodal) configs.

Kept beside the tests (not in ``models/tiny.py``, whose configs are the described families'):
the undescribed types are the structural fallback's test subjects, the wrappers hold a described
text model inside a vision-language config with a one-layer vision tower.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from torch import nn

from fedexperts.models import tiny_config
from fedexperts.models.load import model_class_for
from fedexperts.models.tiny import COMMON_FIELDS

EXPERTS = 8
HIDDEN = COMMON_FIELDS["hidden_size"]

_TEXT: dict[str, Any] = {**COMMON_FIELDS, "head_dim": 8}

UNDESCRIBED: dict[str, dict[str, Any]] = {
    "granitemoe_swa": {"num_local_experts": EXPERTS},
    "cohere2_moe": {"num_experts": EXPERTS},
    "afmoe": {"num_experts": EXPERTS, "moe_intermediate_size": 16, "num_dense_layers": 1},
}
"""Types with fused experts and no descriptor (planned or present), with their expert count's field."""


def require(model_type: str) -> None:
    """Skip on a transformers without ``model_type`` (the GPU machines run 5.17)."""
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")


@torch.no_grad()
def randomise_routers(model: nn.Module, hidden: int = HIDDEN, experts: int = EXPERTS) -> None:
    """Give every (experts, hidden) parameter random rows: several families start their routers at zero."""
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if tuple(parameter.shape) == (experts, hidden):
                parameter.normal_(0.0, 0.5)


def undescribed_config(model_type: str, **overrides: Any) -> transformers.PretrainedConfig:
    require(model_type)
    return transformers.AutoConfig.for_model(model_type, **{**_TEXT, **UNDESCRIBED[model_type], **overrides})


def undescribed_model(model_type: str, *, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    config = undescribed_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = model_class_for(config).from_config(config)
    randomise_routers(model)
    return model.eval()


def _qwen3_vl_moe() -> transformers.PretrainedConfig:
    text = {key: value for key, value in tiny_config("qwen3_moe").to_dict().items() if not key.startswith("_")}
    text.update(model_type="qwen3_vl_moe_text", rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]})
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": HIDDEN,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [],
    }
    return transformers.AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision)


def _kimi_k25() -> transformers.PretrainedConfig:
    text = {key: value for key, value in tiny_config("deepseek_v3").to_dict().items() if not key.startswith("_")}
    vision = {
        "num_hidden_layers": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "pos_emb_height": 4,
        "pos_emb_width": 4,
    }
    return transformers.AutoConfig.for_model(
        "kimi_k25", text_config=text, vision_config=vision, projection_hidden_size=16, tie_word_embeddings=False
    )


WRAPPERS = {"qwen3_vl_moe": _qwen3_vl_moe, "kimi_k25": _kimi_k25}
"""Wrapper configs whose text model is described: Qwen3-VL-MoE (qwen3_vl_moe_text) and Kimi K2.5 (deepseek_v3)."""


def wrapper_config(model_type: str) -> transformers.PretrainedConfig:
    require(model_type)
    return WRAPPERS[model_type]()


def wrapper_model(model_type: str, *, seed: int = 0) -> transformers.PreTrainedModel:
    config = wrapper_config(model_type)
    torch.manual_seed(seed)
    model = model_class_for(config).from_config(config)
    randomise_routers(model)
    return model.eval()
