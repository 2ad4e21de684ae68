"""Wrapper (multimodal) configs are fine-tuned through their text model, the vision tower frozen."""

import json

import pytest
import torch

from fedexperts.algorithms.fedavg.config import FedAvgConfig
from fedexperts.algorithms.flex.config import FlexConfig
from fedexperts.algorithms.registry import build_algorithm
from fedexperts.errors import UnsupportedModelError
from fedexperts.moe import ParamKind, Role, family_for, model_note, moe_layers, parameter_kinds, select_experts
from fedexperts.moe.checkpoints import checkpoint_naming
from fedexperts.moe.wrappers import non_text_modules, text_model_path
from fedexperts.planning import plan

from .helpers import masked_router_logits
from .undescribed import wrapper_config, wrapper_model

TEXT_TYPES = {"qwen3_vl_moe": "qwen3_vl_moe_text", "kimi_k25": "deepseek_v3"}
FROZEN = {"qwen3_vl_moe": ["model.visual"], "kimi_k25": ["model.vision_tower", "model.mm_projector"]}


@pytest.fixture(params=sorted(TEXT_TYPES))
def wrapper(request):
    return request.param


def test_the_sparse_blocks_are_found_in_the_text_model(wrapper):
    model = wrapper_model(wrapper)
    assert family_for(model).model_type == TEXT_TYPES[wrapper]
    assert family_for(model.config) is family_for(model)
    assert text_model_path(model) == "model.language_model"
    assert [layer.name for layer in moe_layers(model)] == [f"model.language_model.layers.{i}.mlp" for i in (1, 2)]
    assert [name for name, _ in non_text_modules(model)] == FROZEN[wrapper]
    note = model_note(model)
    assert note.startswith(f"{wrapper} wraps a {TEXT_TYPES[wrapper]} text model")
    assert all(name in note for name in FROZEN[wrapper]) and "never trained" in note


def test_pruned_equals_masked_through_the_wrapper_model(wrapper):
    model = wrapper_model(wrapper)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    keep, dropped = ([0, 1, 4, 6], [2, 3, 5, 7]) if wrapper == "kimi_k25" else ([6, 1, 3, 4], [0, 2, 5, 7])
    names = [layer.name for layer in moe_layers(model)]
    with torch.no_grad(), masked_router_logits(model, dict.fromkeys(names, dropped)):
        reference = model(input_ids=ids).logits
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        mapping = select_experts(model, dict.fromkeys(names, keep))
        pruned = model(input_ids=ids).logits
    assert mapping.flat_routing == ()
    assert not torch.allclose(plain, pruned, atol=1e-4), "pruning changed nothing"
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "settings", [FedAvgConfig(scope="everything"), FlexConfig()], ids=["fedavg-everything", "flex"]
)
def test_the_vision_tower_is_never_trained(wrapper, settings):
    model = wrapper_model(wrapper)
    algorithm = build_algorithm(settings)
    algorithm.prepare(model)
    kinds = parameter_kinds(model)
    vision = [name for name, info in kinds.items() if info.kind is ParamKind.NON_TEXT]
    assert vision and all(name.startswith(tuple(FROZEN[wrapper])) for name in vision)
    assert all(algorithm.roles[name] is Role.FROZEN for name in vision)
    parameters = dict(model.named_parameters())
    assert not any(parameters[name].requires_grad for name in vision)
    trained = [name for name, parameter in parameters.items() if parameter.requires_grad]
    assert trained and all(
        name.startswith(("model.language_model.", "lm_head.")) or "personal" in name for name in trained
    )


def test_a_sub_moe_straight_from_a_wrapper_checkpoint_is_refused_clearly():
    with pytest.raises(UnsupportedModelError, match=r"kimi_k25 is a wrapper config.*load the model whole"):
        checkpoint_naming(wrapper_config("kimi_k25"))


def test_plan_on_a_wrapper_config_plans_its_text_model(wrapper, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(wrapper_config(wrapper).to_dict()))
    result = plan(tmp_path, FlexConfig())
    assert result.model_type == TEXT_TYPES[wrapper] and result.moe_layers == 2 and result.num_experts == 8
    assert result.note is not None and result.note.startswith(f"{wrapper} wraps")
    frozen = [row for row in result.by_kind if row.kind == ParamKind.NON_TEXT.value]
    assert frozen and all(set(row.by_role) and row.by_role[Role.FROZEN] == row.params for row in frozen)


def test_the_cli_plans_a_wrapper_config_folder_and_says_what_is_trained(tmp_path):
    from typer.testing import CliRunner

    from fedexperts.cli import app

    (tmp_path / "config.json").write_text(json.dumps(wrapper_config("qwen3_vl_moe").to_dict()))
    result = CliRunner().invoke(app, ["plan", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "qwen3_vl_moe wraps a qwen3_vl_moe_text text model" in result.output and "non_text" in result.output
