"""A model built from its config alone on PyTorch's ``meta`` device: shapes and dtypes, no storage.

Planning runs the algorithm on this model exactly as on a real one, which works because every
step of a round only creates, slices, clones or copies tensors, and meta tensors support that;
peft creates the LoRA layers in the default dtype and then moves them to the base layer's device
and dtype (``_move_adapter_to_device_of_base_layer``), so the adapters land on ``meta`` in the
base dtype, exactly as they land on the CPU or GPU for a loaded model (``prepare`` then makes what
trains float32, on meta as on a real model: :mod:`fedexperts.moe.precision`). Meta tensors cannot be
serialised, so their wire size comes from :func:`fedexperts.federation.payload.payload_size`.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn


def meta_model(config: transformers.PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` on the ``meta`` device: every parameter's shape and dtype, no storage."""
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else transformers.AutoModelForCausalLM
    )
    with torch.device("meta"):
        model: nn.Module = auto.from_config(config, dtype=dtype)
    return model
