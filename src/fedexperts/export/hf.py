"""A stock Hugging Face folder: ``config.json`` + safetensors + tokenizer, loadable without fedexperts.

The client model (LoRA already merged or taken out, see :mod:`fedexperts.export.lora`) is copied
into a fresh instance of the family's transformers class built from a stock config
(:func:`fedexperts.moe.surgery.stock_config`: a sub-MoE with one expert count everywhere becomes
that count, its router rows already sliced). The copy is strict: every tensor of the stock class
and nothing else, so what loads back with ``AutoModelForCausalLM.from_pretrained`` is exactly the
model. transformers writes it in the hub layout (per-expert tensors) as for any checkpoint. A
taken-out LoRA is saved by peft itself as an adapter in ``adapter/``, for
``PeftModel.from_pretrained(base, folder / "adapter")``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from transformers import PreTrainedModel

from fedexperts.export.lora import ADAPTER, LoraAdapter
from fedexperts.models.partial import compute_non_persistent_buffers

ADAPTER_FOLDER = "adapter"


def stock_copy(model: PreTrainedModel, config: Any, dtype: torch.dtype) -> PreTrainedModel:
    """``model``'s tensors (in ``dtype``) in a new instance of its transformers class built from ``config``."""
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else transformers.AutoModelForCausalLM
    )
    with torch.device("meta"):
        clean: PreTrainedModel = auto.from_config(config, dtype=dtype)
    compute_non_persistent_buffers(clean, torch.device("cpu"))  # rotary frequencies: from the config, not saved
    state = {name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()}
    clean.load_state_dict(state, strict=True, assign=True)
    clean.tie_weights()
    clean.generation_config = copy.deepcopy(model.generation_config)
    return clean.eval()


def write_stock(
    model: PreTrainedModel, config: Any, folder: Path, *, dtype: torch.dtype, adapter: LoraAdapter | None = None
) -> None:
    """Save ``model`` as a stock checkpoint in ``folder`` and, given an ``adapter``, that adapter beside it."""
    config = copy.deepcopy(config)
    config.dtype = dtype
    clean = stock_copy(model, config, dtype)
    clean.save_pretrained(folder)
    if adapter is not None:
        save_adapter(clean, adapter, folder / ADAPTER_FOLDER)


@torch.no_grad()
def save_adapter(base: PreTrainedModel, adapter: LoraAdapter, folder: Path) -> None:
    """The adapter as peft writes one (``adapter_config.json``, ``adapter_model.safetensors``) for ``base``."""
    settings = peft.LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.targets,
        task_type=peft.TaskType.CAUSAL_LM,
    )
    base.name_or_path = ""  # else peft names the run's base: this adapter's base is the exported folder
    wrapped = peft.get_peft_model(base, settings)
    params = dict(wrapped.named_parameters())
    for target, (a, b) in adapter.weights.items():
        params[f"base_model.model.{target}.lora_A.{ADAPTER}.weight"].copy_(a)
        params[f"base_model.model.{target}.lora_B.{ADAPTER}.weight"].copy_(b)
    wrapped.save_pretrained(str(folder))
