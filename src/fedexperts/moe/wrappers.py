"""Composite (multimodal) configs whose text model is an MoE: fine-tuned through that text model.

A vision-language MoE such as Qwen3-VL-MoE or Kimi K2.5 is a wrapper config (``qwen3_vl_moe``,
``kimi_k25``) holding a ``text_config`` of an MoE type (``qwen3_vl_moe_text``, ``deepseek_v3``)
and a vision tower beside it. fedexperts fine-tunes the text model only: its sparse blocks are
found inside the wrapper (the module that runs the text config, structurally), every module
outside it (vision tower, projector, audio parts) gets the ``non_text`` kind, which no algorithm
trains, and the LM head and embeddings keep their own kinds. Where transformers' causal-LM class
of a wrapper builds the text model alone (``llama4``, ``qwen3_5_moe``), the vision tower is never
loaded. Nothing here knows a wrapper by name.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn

_TEXT_ONLY = "_fedexperts_wrapper_type"
"""Set on a text model transformers built from a wrapper config: the wrapper's model_type (:func:`wrapper_note`)."""


def text_config_of(config: Any) -> Any:
    """The config of the text model: ``config.text_config`` for a composite config, else ``config``."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def is_composite(config: Any) -> bool:
    """Whether ``config`` wraps a separate text config (a multimodal model)."""
    return text_config_of(config) is not config


def builds_whole_wrapper(config: Any) -> bool:
    """Whether a composite config's model is the whole wrapper (no transformers causal LM of its text model alone)."""
    mapping = getattr(transformers.AutoModelForCausalLM, "_model_mapping", None)
    return is_composite(config) and not (mapping is not None and type(config) in mapping)


def _parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def text_model_path(model: nn.Module) -> str | None:
    """Module path of the text decoder inside a composite model, or ``None`` when the model is not one.

    The text decoder is the outermost module that runs the text config's ``model_type`` and holds
    the decoder ``layers``.
    """
    config = getattr(model, "config", None)
    if config is None or not is_composite(config):
        return None
    text_type = text_config_of(config).model_type
    for name, module in model.named_modules():
        module_config = getattr(module, "config", None)
        if (
            name
            and getattr(module_config, "model_type", None) == text_type
            and isinstance(getattr(module, "layers", None), nn.ModuleList)
        ):
            return name
    return None


def non_text_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of a composite model outside its text decoder, LM head and embeddings (vision, audio, projectors)."""
    path = text_model_path(model)
    if path is None:
        return []
    keep = {id(module) for module in (_embeddings(model), _head(model)) if module is not None}
    parts = path.split(".")
    found: list[tuple[str, nn.Module]] = []
    for depth, on_path in enumerate(parts):
        prefix = ".".join(parts[:depth])
        owner = model.get_submodule(prefix) if prefix else model
        for child_name, child in owner.named_children():
            if child_name == on_path or id(child) in keep or _parameter_count(child) == 0:
                continue
            found.append((f"{prefix}.{child_name}".lstrip("."), child))
    return found


def _embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    return module if isinstance(module, nn.Module) else None


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    return module if isinstance(module, nn.Module) else None


def mark_text_only(model: nn.Module, wrapper_type: str) -> None:
    """Record that transformers built only the text model of a ``wrapper_type`` config (for :func:`training_note`)."""
    setattr(model, _TEXT_ONLY, wrapper_type)


def wrapper_note(model: nn.Module) -> str | None:
    """One line on what of a wrapped model is fine-tuned and what is not; ``None`` for a plain text model."""
    config = getattr(model, "config", None)
    text_only = getattr(model, _TEXT_ONLY, None)
    if isinstance(text_only, str) and config is not None:
        return (
            f"{text_only} wraps a {config.model_type} text model; transformers built the text model alone "
            f"({type(model).__name__}): the vision tower is not loaded and not trained"
        )
    path = text_model_path(model)
    if path is None or config is None:
        return None
    frozen = non_text_modules(model)
    names = ", ".join(name for name, _ in frozen) or "nothing"
    count = sum(_parameter_count(module) for _, module in frozen)
    return (
        f"{config.model_type} wraps a {text_config_of(config).model_type} text model: fine-tuning goes through "
        f"{path} only; frozen and never trained: {names} ({count:,} parameters)"
    )
