"""Hybrid and shared-MLP families: Qwen3-Next, Qwen3.5-MoE, Granite-4, Granite-MoE-shared, Jamba, LFM2-MoE, FlexOlmo.

Each is written against its ``modeling_*.py`` in transformers 5.24; all keep transformers v5's fused
``gate_up_proj`` / ``down_proj`` experts behind a router that returns ``(logits, top-k weights,
top-k indices)``, so the identities of the established families hold unchanged.

Attention LoRA in hybrid models. A layer's token mixer is softmax attention in some layers and, in
the others, Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5: ``linear_attn``), a Mamba mixer
(Jamba, Granite-4 hybrid: ``mamba``) or a short gated convolution (LFM2: ``conv``). fedexperts
treats every token mixer as "attention" (:attr:`~fedexperts.moe.MoEFamily.attention_attrs`): LoRA
goes on the ``nn.Linear`` projections of whichever one a layer has, and the ``attention`` scope
shares them. Adapting only the few softmax-attention layers (one in four in Qwen3-Next, one in
eight in Jamba) would leave most of the sequence mixing untouched, which is not what FLEx's shared
attention adapter is for. The exceptions are linears whose weight a fused kernel reads directly, so
an adapter there would be skipped silently: Granite-4's Mamba-2 ``out_proj`` (``mamba_ssm``'s fused
training kernel gets ``out_proj.weight``) and Jamba's ``dt_proj`` (multiplied by its weight, not
called). Convolution weights are not linears and get no adapter.

Shared experts: Qwen's sit in the block (``shared_expert`` and its sigmoid gate); Granite's
``shared_mlp`` sits in the decoder layer beside the block. LFM2-MoE keeps a per-expert
``expert_bias`` buffer on the block (added to the sigmoid scores for the choice only); it is sliced
with the experts. As with DeepSeek-V3's correction bias, "pruned == masked original" is exact when
that bias cannot lift a dropped expert (scored ``0 + bias`` once its logit is -inf) above a kept
one, as with the zero bias of a fresh model; with a trained bias pruning equals masking the
choice scores instead.

Not described (yet): DBRX keeps each expert as a block of rows of 2-D ``(E * I, H)`` tensors and
its block, not its router, makes the top-k choice; JetMoE has no experts module (the block's own
two parallel-expert linears), a router returning sorted dispatch indices, and a second mixture of
attention heads inside attention. Both need an expert layout beyond the fused one above.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fedexperts.moe.descriptors.established import ESTABLISHED_BY_TYPE
from fedexperts.moe.family import MoEFamily


def jamba_sparse_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    """Jamba: a layer with more than one expert in ``layers_num_experts`` (every ``expert_layer_period``-th)."""
    counts = config.layers_num_experts or [1] * num_layers
    return [i for i in range(num_layers) if counts[i] > 1]


def lfm2_sparse_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    """LFM2-MoE: the first ``num_dense_layers`` layers are dense."""
    return [i for i in range(num_layers) if i >= config.num_dense_layers]


def granite_sparse_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    """Granite-MoE-shared / Granite-4 hybrid: every layer, unless the config has no experts at all."""
    return list(range(num_layers)) if (config.num_local_experts or 0) > 0 else []


_GATED_DELTANET = ("self_attn", "linear_attn")
_MAMBA = ("self_attn", "mamba")

_GRANITE_SHARED = MoEFamily(
    model_type="granitemoeshared",
    display_name="Granite-MoE-shared",
    num_experts_field="num_local_experts",
    top_k_field="num_experts_per_tok",
    block_attr="block_sparse_moe",
    router_attr="router",
    layer_shared_expert_attrs=("shared_mlp",),
    routing="top-k of logits, softmax over the k; a shared MLP beside the block",
    sparse_layers=granite_sparse_layers,
)
"""Granite-MoE's block with a shared MLP beside it; Granite-4 hybrid is the same with Mamba-2 layers."""

HYBRID: tuple[MoEFamily, ...] = (
    # Qwen2-MoE's sparse block (and its mlp_only_layers / decoder_sparse_step rule) beside Gated DeltaNet layers
    replace(
        ESTABLISHED_BY_TYPE["qwen2_moe"],
        model_type="qwen3_next",
        display_name="Qwen3-Next",
        attention_attrs=_GATED_DELTANET,
    ),
    MoEFamily(
        model_type="qwen3_5_moe_text",
        display_name="Qwen3.5-MoE (text model)",
        num_experts_field="num_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="gate",
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
        routing="softmax over all experts, top-k, renormalised; sigmoid-gated shared expert",
        attention_attrs=_GATED_DELTANET,
    ),
    _GRANITE_SHARED,
    replace(
        _GRANITE_SHARED,
        model_type="granitemoehybrid",
        display_name="Granite-4 hybrid (Mamba-2 + attention)",
        attention_attrs=_MAMBA,
        lora_excluded=("mamba.out_proj",),
    ),
    MoEFamily(
        model_type="jamba",
        display_name="Jamba (Mamba + attention)",
        num_experts_field="num_experts",
        top_k_field="num_experts_per_tok",
        block_attr="feed_forward",
        router_attr="router",
        routing="softmax over all experts, top-k, not renormalised",
        sparse_layers=jamba_sparse_layers,
        attention_attrs=_MAMBA,
        lora_excluded=("mamba.dt_proj",),
    ),
    MoEFamily(
        model_type="lfm2_moe",
        display_name="LFM2-MoE (short convolution + attention)",
        num_experts_field="num_experts",
        top_k_field="num_experts_per_tok",
        block_attr="feed_forward",
        router_attr="gate",
        block_expert_tensors=("expert_bias",),
        routing="sigmoid scores, top-k of scores + expert bias, optionally renormalised, scaled",
        sparse_layers=lfm2_sparse_layers,
        attention_attrs=("self_attn", "conv"),
    ),
    replace(ESTABLISHED_BY_TYPE["olmoe"], model_type="flex_olmo", display_name="FlexOlmo"),  # OLMoE's block
)
