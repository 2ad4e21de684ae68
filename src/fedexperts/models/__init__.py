"""Model loading, the built-in tiny MoE, and tiny random configs of every supported family."""

from fedexperts.models.tiny import TINY_FAMILIES, tiny_config, tiny_model

__all__ = ["TINY_FAMILIES", "tiny_config", "tiny_model"]
