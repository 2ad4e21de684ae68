import pytest
import torch

from fedexperts.errors import SurgeryError
from fedexperts.models import TINY_FAMILIES, tiny_model
from fedexperts.moe import (
    ParamKind,
    add_personal_lora,
    graft_personal_experts,
    grafts,
    load_personal,
    moe_layers,
    one_expert_output,
    parameter_kinds,
    personal_state_dict,
    regraft,
    remove_personal_experts,
    run_experts,
    save_personal,
)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def choices(model, experts=3):
    return {layer.name: experts for layer in moe_layers(model)}


def shut_gates(model):
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.block.personal_gate.bias.fill_(-1e4)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_graft_with_gate_shut_equals_original_and_open_changes_it(model_type, batch_factory):
    model = tiny_model(model_type)
    batch = batch_factory(model)
    original = logits(model, batch)
    names_before = [name for name, _ in model.named_parameters()]
    graft_personal_experts(model, choices(model))
    grafted = logits(model, batch)
    assert not torch.allclose(grafted, original, atol=1e-4)
    shut_gates(model)
    torch.testing.assert_close(logits(model, batch), original, rtol=0, atol=0)
    names_after = [name for name, _ in model.named_parameters()]
    assert names_before == [name for name in names_after if name in set(names_before)]
    assert all(".personal_" in name for name in set(names_after) - set(names_before))


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_personal_expert_is_a_copy_and_gate_starts_from_the_router_row(model_type):
    model = tiny_model(model_type)
    graft_personal_experts(model, choices(model, experts=5))
    hidden = torch.randn(7, moe_layers(model)[0].family.router_weight(moe_layers(model)[0].router).shape[1])
    for layer in moe_layers(model):
        router_row = layer.family.router_weight(layer.router)[5]
        torch.testing.assert_close(layer.block.personal_gate.weight[0], router_row)
        router_bias = layer.family.router_bias_of(layer.router)
        expected_bias = router_bias[5] if router_bias is not None else torch.tensor(0.0)
        torch.testing.assert_close(layer.block.personal_gate.bias[0], expected_bias)
        with torch.no_grad():
            copy = run_experts(layer, layer.block.personal_experts, hidden, torch.ones(7, 1))
            torch.testing.assert_close(copy, one_expert_output(layer, 5, hidden))
        personal_params = {id(p) for p in layer.block.personal_experts.parameters()}
        assert not personal_params & {id(p) for p in layer.experts.parameters()}


def test_top_n_graft_has_one_gate_row_per_expert(batch_factory):
    model = tiny_model("qwen2_moe")
    batch = batch_factory(model)
    original = logits(model, batch)
    graft_personal_experts(model, {layer.name: [6, 1] for layer in moe_layers(model)})
    layer = moe_layers(model)[0]
    assert layer.block.personal_gate.weight.shape == (2, model.config.hidden_size)
    torch.testing.assert_close(layer.block.personal_gate.weight[1], layer.router.weight[1])
    shut_gates(model)
    torch.testing.assert_close(logits(model, batch), original, rtol=0, atol=0)


def test_gate_without_bias():
    model = tiny_model("olmoe")
    graft_personal_experts(model, choices(model), gate_bias=False)
    assert all(layer.block.personal_gate.bias is None for layer in moe_layers(model))


def test_remove_restores_the_original_model(batch_factory):
    model = tiny_model("gpt_oss")
    batch = batch_factory(model)
    original = logits(model, batch)
    keys = set(model.state_dict())
    graft_personal_experts(model, choices(model))
    remove_personal_experts(model)
    assert set(model.state_dict()) == keys and grafts(model) == {}
    torch.testing.assert_close(logits(model, batch), original, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["olmoe", "gpt_oss", "deepseek_v3", "switch_transformers"])
def test_personal_parts_round_trip_exactly(model_type, tmp_path, batch_factory):
    model = tiny_model(model_type)
    batch = batch_factory(model)
    graft_personal_experts(model, {layer.name: [index + 1, 0] for index, layer in enumerate(moe_layers(model))})
    with torch.no_grad():
        for tensor in personal_state_dict(model).values():
            tensor.add_(torch.randn_like(tensor) * 0.1)  # as if trained
    expected = logits(model, batch)
    path = save_personal(model, tmp_path / "client0.safetensors")
    fresh = tiny_model(model_type)
    attached = load_personal(fresh, path)
    assert attached == {layer.name: (index + 1, 0) for index, layer in enumerate(moe_layers(fresh))}
    saved, loaded = personal_state_dict(model), personal_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    torch.testing.assert_close(logits(fresh, batch), expected, rtol=0, atol=0)


def test_loading_into_a_mismatched_model_errors_and_attaches_nothing(tmp_path):
    model = tiny_model("olmoe")
    graft_personal_experts(model, choices(model))
    path = save_personal(model, tmp_path / "p.safetensors")
    other = tiny_model("olmoe", hidden_size=64, num_attention_heads=4)
    with pytest.raises(SurgeryError, match="has shape"):
        load_personal(other, path)
    assert grafts(other) == {}
    fewer_layers = tiny_model("olmoe", num_hidden_layers=2)
    with pytest.raises(Exception, match="not MoE layers"):
        load_personal(fewer_layers, path)
    assert grafts(fewer_layers) == {}


def test_bad_graft_requests_are_refused(tmp_path):
    model = tiny_model("mixtral")
    name = moe_layers(model)[0].name
    with pytest.raises(SurgeryError, match="out of range"):
        graft_personal_experts(model, {name: 8})
    with pytest.raises(SurgeryError, match="empty expert list"):
        graft_personal_experts(model, {name: []})
    graft_personal_experts(model, {name: 1})
    with pytest.raises(SurgeryError, match="already has personal experts"):
        graft_personal_experts(model, {name: 2})
    with pytest.raises(SurgeryError, match="no such personal-state file"):
        load_personal(tiny_model("mixtral"), tmp_path / "missing.safetensors")
    remove_personal_experts(model)
    with pytest.raises(SurgeryError, match="no personal experts to save"):
        save_personal(model, tmp_path / "p.safetensors")


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = tiny_model("olmoe")
    graft_personal_experts(model, choices(model))
    path = save_personal(model, tmp_path / "p.safetensors")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fedexperts.atomic.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_personal(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_personal_lora_starts_as_the_plain_graft_trains_only_adapters_and_resets_on_regraft(model_type, batch_factory):
    model = tiny_model(model_type)
    batch = batch_factory(model)
    graft_personal_experts(model, choices(model))
    plain = logits(model, batch)
    add_personal_lora(model, rank=2, alpha=4, dropout=0.0)
    torch.testing.assert_close(logits(model, batch), plain)  # B starts at zero: the delta is zero
    kinds = parameter_kinds(model)
    adapters = {name for name, info in kinds.items() if info.adapter}
    assert adapters and all(".personal_" in name and ".lora_" in name for name in adapters)
    assert {kinds[name].kind for name in adapters} == {ParamKind.PERSONAL_EXPERT, ParamKind.PERSONAL_GATE}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in adapters and "lora_B" in name:
                parameter.normal_()
    assert not torch.allclose(logits(model, batch), plain, atol=1e-4)
    regraft(model, choices(model))
    torch.testing.assert_close(logits(model, batch), plain)
    with pytest.raises(SurgeryError, match="already have LoRA"):
        add_personal_lora(model, rank=2, alpha=4, dropout=0.0)
