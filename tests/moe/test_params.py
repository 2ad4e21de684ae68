import peft
import pytest
import torch

from fedexperts.models import TINY_FAMILIES, tiny_model
from fedexperts.moe import (
    FLEX_ROLES,
    ParamKind,
    Role,
    RoleRules,
    apply_roles,
    graft_personal_experts,
    moe_layers,
    parameter_kinds,
    parameter_roles,
    state_by_role,
)


def kinds_of(model):
    return {name: info.kind for name, info in parameter_kinds(model).items()}


def test_qwen2_moe_parameters_get_structural_kinds():
    kinds = kinds_of(tiny_model("qwen2_moe"))
    assert kinds["model.embed_tokens.weight"] is ParamKind.EMBEDDING
    assert kinds["lm_head.weight"] is ParamKind.LM_HEAD
    assert kinds["model.layers.0.self_attn.q_proj.weight"] is ParamKind.ATTENTION
    assert kinds["model.layers.0.mlp.gate.weight"] is ParamKind.ROUTER
    assert kinds["model.layers.0.mlp.experts.gate_up_proj"] is ParamKind.ROUTED_EXPERT
    assert kinds["model.layers.0.mlp.shared_expert.up_proj.weight"] is ParamKind.SHARED_EXPERT
    # the shared expert's sigmoid gate is part of the shared expert, not a router ("gate" in its name)
    assert kinds["model.layers.0.mlp.shared_expert_gate.weight"] is ParamKind.SHARED_EXPERT
    assert kinds["model.layers.1.mlp.gate_proj.weight"] is ParamKind.DENSE_MLP  # mlp_only_layers=[1]
    assert kinds["model.layers.0.input_layernorm.weight"] is ParamKind.OTHER
    assert kinds["model.norm.weight"] is ParamKind.OTHER


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_every_family_has_attention_routers_and_experts(model_type):
    kinds = kinds_of(tiny_model(model_type))
    present = set(kinds.values())
    assert {ParamKind.ATTENTION, ParamKind.ROUTER, ParamKind.ROUTED_EXPERT, ParamKind.EMBEDDING} <= present
    routed = [name for name, kind in kinds.items() if kind is ParamKind.ROUTED_EXPERT]
    assert all(".experts." in name for name in routed)


def test_switch_cross_attention_and_dense_blocks():
    kinds = kinds_of(tiny_model("switch_transformers"))
    assert kinds["decoder.block.0.layer.1.EncDecAttention.q.weight"] is ParamKind.ATTENTION
    assert kinds["encoder.block.0.layer.1.mlp.wi.weight"] is ParamKind.DENSE_MLP
    assert kinds["encoder.block.1.layer.1.mlp.router.classifier.weight"] is ParamKind.ROUTER
    assert kinds["encoder.block.1.layer.1.mlp.experts.expert_3.wo.weight"] is ParamKind.ROUTED_EXPERT


def test_flex_roles_on_a_lora_model_with_personal_experts():
    model = tiny_model("olmoe")
    graft_personal_experts(model, {layer.name: 0 for layer in moe_layers(model)})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    infos = parameter_kinds(lora)
    adapter_names = [name for name, info in infos.items() if info.adapter]
    assert adapter_names and all(".lora_" in name for name in adapter_names)
    assert all(infos[name].kind is ParamKind.ATTENTION for name in adapter_names)
    base_q = "model.layers.0.self_attn.q_proj.base_layer.weight"
    assert infos[base_q] == infos[base_q].__class__(ParamKind.ATTENTION, False)

    roles = parameter_roles(lora, FLEX_ROLES)
    shared = {name for name, role in roles.items() if role is Role.SHARED}
    personal = {name for name, role in roles.items() if role is Role.PERSONAL}
    assert shared == set(adapter_names)
    assert personal == {
        name for name, info in infos.items() if info.kind in (ParamKind.PERSONAL_EXPERT, ParamKind.PERSONAL_GATE)
    }
    assert len(personal) == 3 * 4  # per layer: gate_up_proj, down_proj, gate weight and bias
    assert roles[base_q] is Role.FROZEN
    assert roles["model.layers.0.mlp.experts.gate_up_proj"] is Role.FROZEN

    apply_roles(lora, roles)
    trainable = {name for name, p in lora.get_base_model().named_parameters() if p.requires_grad}
    assert trainable == shared | personal
    views = state_by_role(lora, roles, Role.SHARED)
    assert views.keys() == shared
    name = next(iter(shared))
    assert views[name].data_ptr() == lora.get_base_model().get_parameter(name).data_ptr()


def test_unlisted_kinds_are_frozen():
    model = tiny_model("mixtral")
    rules = RoleRules(base={ParamKind.ROUTER: Role.SHARED})
    roles = parameter_roles(model, rules)
    assert {name for name, role in roles.items() if role is not Role.FROZEN} == {
        f"model.layers.{i}.mlp.gate.weight" for i in range(3)
    }
    assert torch.is_tensor(next(iter(state_by_role(model, roles, Role.SHARED).values())))
