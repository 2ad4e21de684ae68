"""The 2025 open-weight frontier: GLM-4.5/4.7, Llama 4, MiniMax, DeepSeek-V3.2, ERNIE 4.5, Hunyuan-A13B, dots.llm1.

Each is written from its ``modeling_*.py`` in transformers 5.24 (module and attribute names, what
the router returns, which config field makes a layer sparse). Most descend from DeepSeek-V3's
router: sigmoid scores plus a per-expert correction bias choose the experts (group-limited, a group
scored by the sum of its top 2), the weights are the uncorrected scores. The correction bias is a
per-expert tensor like the router rows: it is pruned, sliced and loaded with them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fedexperts.moe.descriptors.established import ESTABLISHED_BY_TYPE, deepseek_sparse_layers
from fedexperts.moe.family import ExpertLayout, MoEFamily, RouterOutput


def mlp_layer_types_sparse_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    """GLM-4.7-Flash, DeepSeek-V3.2: the layers whose ``mlp_layer_types`` entry is ``"sparse"``."""
    return [i for i, kind in enumerate(config.mlp_layer_types[:num_layers]) if kind == "sparse"]


def llama4_sparse_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    """Llama 4: ``moe_layers`` (filled from ``interleave_moe_layer_step`` when not given)."""
    return sorted(i for i in config.moe_layers if i < num_layers)


def ernie_sparse_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    """ERNIE 4.5: every ``moe_layer_interval``-th layer from ``moe_layer_start_index`` to ``moe_layer_end_index``."""
    return [
        i
        for i in range(num_layers)
        if (i + 1) % config.moe_layer_interval == 0 and config.moe_layer_start_index <= i <= config.moe_layer_end_index
    ]


def _deepseek_v3_like(model_type: str, display_name: str, sparse_layers: Any, **extra: Any) -> MoEFamily:
    """A family whose block is DeepSeek-V3's: ``gate`` (a ``*TopkRouter``), fused experts, ``shared_experts``."""
    return replace(
        ESTABLISHED_BY_TYPE["deepseek_v3"],
        model_type=model_type,
        display_name=display_name,
        sparse_layers=sparse_layers,
        **extra,
    )


FRONTIER: tuple[MoEFamily, ...] = (
    _deepseek_v3_like("glm4_moe", "GLM-4.5 / 4.6 / 4.7 (MoE)", deepseek_sparse_layers),
    # GLM-4.7-Flash: DeepSeek-V3's multi-head latent attention and router, dense layers listed per layer.
    _deepseek_v3_like("glm4_moe_lite", "GLM-4.7-Flash (MoE, MLA)", mlp_layer_types_sparse_layers),
    # DeepSeek-V3.2: V3 plus the DSA indexer in attention, which picks the attended tokens under no_grad.
    _deepseek_v3_like("deepseek_v32", "DeepSeek-V3.2", mlp_layer_types_sparse_layers, attention_skip=("indexer",)),
    _deepseek_v3_like("dots1", "dots.llm1", deepseek_sparse_layers),
    MoEFamily(
        model_type="llama4_text",
        display_name="Llama 4 (text)",
        num_experts_field="num_local_experts",
        top_k_field="num_experts_per_tok",
        block_attr="feed_forward",
        router_attr="router",  # an nn.Linear subclass: its rows are the plain ``weight``
        shared_expert_attrs=("shared_expert",),
        layout=ExpertLayout.FUSED_TRANSPOSED,
        router_output=RouterOutput.SCORES_LOGITS,
        experts_interface=False,
        routing="top-k of logits, sigmoid of the k scales each expert's input; shared expert",
        sparse_layers=llama4_sparse_layers,
    ),
    MoEFamily(
        model_type="minimax_m2",
        display_name="MiniMax-M2",
        num_experts_field="num_local_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="gate",
        block_expert_tensors=("e_score_correction_bias",),  # a buffer of the block, handed to the router
        routing="sigmoid scores + correction bias, top-k, renormalised",
    ),
    # MiniMax-Text-01: lightning (linear) attention in most layers, softmax attention in the rest; both are
    # the layer's ``self_attn`` (attention LoRA goes on the linears of either kind: qkv_proj/out_proj/output_gate
    # or q/k/v/o_proj).
    MoEFamily(
        model_type="minimax",
        display_name="MiniMax-Text-01",
        num_experts_field="num_local_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="gate",
        routing="softmax over all experts, top-k, renormalised; lightning + softmax attention",
    ),
    MoEFamily(
        model_type="ernie4_5_moe",
        display_name="ERNIE 4.5 (MoE)",
        num_experts_field="moe_num_experts",
        top_k_field="moe_k",
        block_attr="mlp",
        router_attr="gate",
        shared_expert_attrs=("shared_experts",),
        expert_columns=("moe_statics.e_score_correction_bias",),  # shape (1, E), a frozen nn.Parameter
        routing="softmax; top-k of softmax + correction bias, renormalised; shared experts",
        sparse_layers=ernie_sparse_layers,
    ),
    MoEFamily(
        model_type="hunyuan_v1_moe",
        display_name="Hunyuan-A13B",
        num_experts_field="num_experts",
        top_k_field="moe_topk",
        block_attr="mlp",
        router_attr="gate",
        shared_expert_attrs=("shared_mlp",),
        router_expert_tensors=("wg.weight",),  # the gate holds its rows in an nn.Linear ``wg``
        routing="softmax over all experts, top-k, renormalised; shared MLP",
    ),
)
