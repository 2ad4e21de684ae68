"""The ten families of fedexperts v0.1: Qwen2/3-MoE, OLMoE, Mixtral, DeepSeek-V2/V3, GPT-OSS, Granite, Phi, Switch."""

from __future__ import annotations

from typing import Any

from fedexperts.moe.family import ExpertLayout, MoEFamily, SwitchFamily


def qwen_sparse_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    """Qwen2/3-MoE: ``mlp_only_layers`` are dense; otherwise every ``decoder_sparse_step``-th layer."""
    mlp_only = set(config.mlp_only_layers or [])
    step = config.decoder_sparse_step
    if config.num_experts <= 0:
        return []
    return [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]


def deepseek_sparse_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    """DeepSeek-V2/V3: the first ``first_k_dense_replace`` layers are dense."""
    return [i for i in range(num_layers) if i >= config.first_k_dense_replace]


def switch_sparse_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    """Switch Transformers: every ``{encoder,decoder}_sparse_step``-th block (index % step == 1)."""
    step = config.decoder_sparse_step if stack == "decoder" else config.encoder_sparse_step
    if step <= 0:
        return []
    return [i for i in range(num_layers) if step == 1 or i % step == 1]


ESTABLISHED: tuple[MoEFamily, ...] = (
    MoEFamily(
        model_type="qwen2_moe",
        display_name="Qwen2-MoE / Qwen1.5-MoE",
        num_experts_field="num_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="gate",
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
        routing="softmax over all experts, top-k (optionally renormalised); sigmoid-gated shared expert",
        sparse_layers=qwen_sparse_layers,
    ),
    MoEFamily(
        model_type="qwen3_moe",
        display_name="Qwen3-MoE",
        num_experts_field="num_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="gate",
        routing="softmax over all experts, top-k (optionally renormalised)",
        sparse_layers=qwen_sparse_layers,
    ),
    MoEFamily(
        model_type="olmoe",
        display_name="OLMoE",
        num_experts_field="num_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="gate",
        routing="softmax over all experts, top-k (optionally renormalised)",
    ),
    MoEFamily(
        model_type="mixtral",
        display_name="Mixtral",
        num_experts_field="num_local_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="gate",
        routing="softmax over all experts, top-k, renormalised",
    ),
    MoEFamily(
        model_type="deepseek_v2",
        display_name="DeepSeek-V2",
        num_experts_field="n_routed_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="gate",
        shared_expert_attrs=("shared_experts",),
        routing="softmax, greedy or group-limited top-k, scaled; shared experts",
        sparse_layers=deepseek_sparse_layers,
        group_routing=True,
    ),
    MoEFamily(
        model_type="deepseek_v3",
        display_name="DeepSeek-V3",
        num_experts_field="n_routed_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="gate",
        shared_expert_attrs=("shared_experts",),
        router_expert_tensors=("weight", "e_score_correction_bias"),
        routing="sigmoid scores + correction bias, group-limited top-k, renormalised, scaled; shared experts",
        sparse_layers=deepseek_sparse_layers,
        group_routing=True,
        group_scored_by=2,
    ),
    MoEFamily(
        model_type="gpt_oss",
        display_name="GPT-OSS",
        num_experts_field="num_local_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="router",
        router_expert_tensors=("weight", "bias"),
        router_bias="bias",
        expert_tensors=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        layout=ExpertLayout.FUSED_TRANSPOSED_INTERLEAVED,
        routing="top-k of biased logits, softmax over the k",
    ),
    MoEFamily(
        model_type="granitemoe",
        display_name="Granite-MoE",
        num_experts_field="num_local_experts",
        top_k_field="num_experts_per_tok",
        block_attr="block_sparse_moe",
        router_attr="router",
        routing="top-k of logits, softmax over the k",
    ),
    MoEFamily(
        model_type="phimoe",
        display_name="PhiMoE",
        num_experts_field="num_local_experts",
        top_k_field="num_experts_per_tok",
        block_attr="mlp",
        router_attr="router",
        routing="SparseMixer top-2 (masked softmax per pick)",
    ),
    SwitchFamily(
        model_type="switch_transformers",
        display_name="Switch Transformers",
        num_experts_field="num_experts",
        top_k_field=None,
        block_attr="mlp",
        router_attr="router",
        router_expert_tensors=("classifier.weight", "classifier.bias"),
        router_bias="classifier.bias",
        expert_tensors=(),
        layout=ExpertLayout.MODULE_PER_EXPERT,
        routing="top-1 softmax with per-sequence expert capacity",
        sparse_layers=switch_sparse_layers,
        expert_capacity="expert_capacity",
    ),
)

ESTABLISHED_BY_TYPE: dict[str, MoEFamily] = {family.model_type: family for family in ESTABLISHED}
"""The established descriptors by ``model_type``: newer families built on one of these block designs
are written as that descriptor with what differs replaced."""
