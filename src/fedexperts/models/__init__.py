"""Model loading (whole or a sub-MoE), the built-in tiny MoE, and tiny random configs of every supported family."""

from typing import Any

from fedexperts.models.load import LoadedModel, load_model
from fedexperts.models.partial import load_meta, load_sub_moe
from fedexperts.models.tiny import TINY_FAMILIES, UNAVAILABLE_TINY_FAMILIES, tiny_config, tiny_model

_BUILTIN = ("RECIPES", "Recipe", "default_model_path", "pretrain")

__all__ = [
    "RECIPES",
    "TINY_FAMILIES",
    "UNAVAILABLE_TINY_FAMILIES",
    "LoadedModel",
    "Recipe",
    "default_model_path",
    "load_meta",
    "load_model",
    "load_sub_moe",
    "pretrain",
    "tiny_config",
    "tiny_model",
]


def __getattr__(name: str) -> Any:
    """The built-in model's names, imported on first use: they pull in datasets, flwr-datasets, tokenizers."""
    if name in _BUILTIN:
        from fedexperts.models import builtin

        return getattr(builtin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
