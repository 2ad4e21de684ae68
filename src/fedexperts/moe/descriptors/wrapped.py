"""Text models that exist only inside a wrapper (multimodal) config, where they match a described family.

Qwen3-VL-MoE's text model (``qwen3_vl_moe_text``, inside ``qwen3_vl_moe``) is Qwen3-MoE's
structure under other class names: the same ``mlp`` block with a ``gate`` router (softmax top-k,
renormalised) and fused ``experts``, the same ``mlp_only_layers`` / ``decoder_sparse_step`` rule.
Its descriptor is Qwen3-MoE's with the type renamed, tested through the identity suite on the
wrapper model. (Its hub checkpoints store the fused experts transposed, which a sub-MoE load does
not restate: see :mod:`fedexperts.moe.checkpoints`.)
"""

from __future__ import annotations

import dataclasses

from fedexperts.moe.descriptors.established import ESTABLISHED
from fedexperts.moe.family import MoEFamily

_QWEN3_MOE = next(family for family in ESTABLISHED if family.model_type == "qwen3_moe")

WRAPPED: tuple[MoEFamily, ...] = (
    dataclasses.replace(_QWEN3_MOE, model_type="qwen3_vl_moe_text", display_name="Qwen3-VL-MoE (text model)"),
)
