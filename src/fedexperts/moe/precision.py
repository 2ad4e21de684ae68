"""Mixed precision: float32 master copies of what trains, a half-precision frozen base, autocast between.

Why: with a bfloat16 checkpoint, AdamW updating bfloat16 tensors at a fine-tuning learning rate
(4e-5) rounds most updates away: bf16 keeps 8 significant bits, so any weight with ``|w| >= 1/64``
does not move. So every trainable tensor (LoRA, personal experts and gates, shared experts,
routers, a dense model's everything) is held in float32 (:func:`float32_masters`), the frozen base
keeps the checkpoint's dtype, and forwards run under :func:`autocast_for`, where float32 weights
and bf16 activations meet in bf16 matmuls (the same split as PEFT's ``get_peft_model``, which keeps
adapters in float32, and as ``torch.autocast`` over an fp32 model, which ``train.bf16`` means).

The half dtype to compute in is the one the base was loaded in; :func:`float32_masters` records it
on the model, so a model whose every tensor trains (``dense``) still computes in it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from fedexperts.moe.families import unwrap_model

HALF_DTYPES = (torch.bfloat16, torch.float16)
_COMPUTE_DTYPE = "_fedexperts_compute_dtype"


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a trainable tensor of ``dtype`` is kept in: float32 for a half dtype, else its own."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def to_master(parameter: nn.Parameter) -> torch.dtype | None:
    """Give ``parameter`` (in place, same object) a float32 master copy; its former half dtype, if any.

    The object stays the same (``.data`` is replaced), so names, tied weights, hooks and attributes
    set on it survive; it works on the ``meta`` device (planning) too.
    """
    dtype = parameter.dtype
    if dtype not in HALF_DTYPES:
        return None
    parameter.data = parameter.data.to(torch.float32)
    return dtype


def master_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``tensor`` in its :func:`master_dtype` (what a global state holds)."""
    return tensor.detach().to(master_dtype(tensor.dtype), copy=True)


def float32_masters(model: nn.Module) -> None:
    """Every trainable (``requires_grad``) parameter of ``model`` becomes float32; frozen ones keep their dtype.

    The half dtype they came from is recorded as the model's compute dtype (see :func:`compute_dtype`).
    """
    base = unwrap_model(model)
    for parameter in base.parameters():
        if parameter.requires_grad:
            former = to_master(parameter)
            if former is not None and getattr(base, _COMPUTE_DTYPE, None) is None:
                setattr(base, _COMPUTE_DTYPE, former)


def compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The half dtype ``model``'s forwards should run in, or ``None`` for a full-precision model.

    The dtype recorded by :func:`float32_masters`, else the half dtype of any floating parameter.
    """
    base = unwrap_model(model)
    recorded = getattr(base, _COMPUTE_DTYPE, None)
    if isinstance(recorded, torch.dtype):
        return recorded
    for parameter in base.parameters():
        if parameter.dtype in HALF_DTYPES:
            return parameter.dtype
    return None


def autocast_for(model: nn.Module, *, bf16: bool = False) -> AbstractContextManager[object]:
    """``torch.autocast`` to ``model``'s compute dtype; with ``bf16``, bf16 autocast over a full-precision model.

    A nullcontext when there is nothing to autocast (a float32 model without ``bf16``).
    """
    dtype = compute_dtype(model) or (torch.bfloat16 if bf16 else None)
    if dtype is None:
        return nullcontext()
    device = next(unwrap_model(model).parameters()).device
    return torch.autocast(device.type, dtype=dtype)
