"""Loading only a sub-MoE from a checkpoint: equal to pruning the full model, holding only what it keeps."""

import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file, save_model

from fedexperts.algorithms.fedmoe.views import expert_and_dense_bytes
from fedexperts.errors import FedExpertsError
from fedexperts.federation.accounting import held_bytes
from fedexperts.models.partial import load_sub_moe
from fedexperts.models.tiny import TINY_FAMILIES, tiny_model
from fedexperts.moe import expert_map, moe_layers, select_experts

FUSED_FAMILIES = [family for family in TINY_FAMILIES if family != "switch_transformers"]


def keep_of(model):
    """An unsorted, layer-dependent subset of four experts per MoE layer."""
    layers = moe_layers(model)
    return {layer.name: ([6, 1, 3, 0] if index % 2 else [0, 2, 4, 6]) for index, layer in enumerate(layers)}


def assert_same_model(loaded, expected, batch):
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert loaded.state_dict()[name].dtype == tensor.dtype, name
        assert torch.equal(loaded.state_dict()[name], tensor), name
    for name, buffer in expected.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[name], buffer), name
    assert expert_map(loaded) == expert_map(expected)
    assert loaded.config._attn_implementation == expected.config._attn_implementation
    assert not loaded.training
    with torch.no_grad():  # same weights bit for bit; a tensor's strides may pick another kernel (summation order)
        torch.testing.assert_close(loaded(**batch).logits, expected(**batch).logits, rtol=0, atol=1e-6)


def analytic_bytes(full, keep):
    """The sub-MoE's bytes as FedMoE's budget search counts them: the dense part plus each kept expert."""
    dense, per_expert = expert_and_dense_bytes(full)
    layers = [layer.name for layer in moe_layers(full)]
    return dense + sum(per_expert[layers.index(name)] * len(kept) for name, kept in keep.items())


@pytest.fixture(scope="module", params=FUSED_FAMILIES)
def hub_checkpoint(request, tmp_path_factory):
    """A tiny model of each fused family saved with ``save_pretrained`` (one tensor per expert, hub names)."""
    folder = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param, seed=1).save_pretrained(folder)
    return folder


def test_sub_moe_of_a_hub_checkpoint_equals_pruning_the_full_model(hub_checkpoint, batch_factory):
    full = transformers.AutoModelForCausalLM.from_pretrained(hub_checkpoint).eval()
    keep = keep_of(full)
    expected = copy.deepcopy(full)
    select_experts(expected, keep)
    loaded = load_sub_moe(hub_checkpoint, keep)
    assert_same_model(loaded, expected, batch_factory(full))


def test_storage_identity_the_sub_moe_holds_its_analytic_size(hub_checkpoint):
    full = transformers.AutoModelForCausalLM.from_pretrained(hub_checkpoint)
    keep = keep_of(full)
    loaded = load_sub_moe(hub_checkpoint, keep)
    assert held_bytes(loaded) == pytest.approx(analytic_bytes(full, keep), rel=0.02)
    assert held_bytes(loaded) < 0.8 * held_bytes(full)


def test_without_keep_it_loads_what_from_pretrained_loads(hub_checkpoint, batch_factory):
    full = transformers.AutoModelForCausalLM.from_pretrained(hub_checkpoint).eval()
    loaded = load_sub_moe(hub_checkpoint)
    assert_same_model(loaded, full, batch_factory(full))
    assert held_bytes(loaded) == held_bytes(full)


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_fused_tensors_under_the_models_own_names_are_read_by_row(model_type, tmp_path, batch_factory):
    model = tiny_model(model_type, seed=2)
    model.config.save_pretrained(tmp_path)
    save_model(model, str(tmp_path / "model.safetensors"))
    keep = keep_of(model)
    expected = copy.deepcopy(model)
    select_experts(expected, keep)
    assert_same_model(load_sub_moe(tmp_path, keep), expected, batch_factory(model))


def per_expert_state(model, names):
    """``model``'s state with each fused expert tensor split into hub tensors, ``names`` = (block, gate, up, down)."""
    block, gate, up, down = names
    state = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        name = name.replace(".mlp.", f".{block}.")
        if leaf == "gate_up_proj":
            half = tensor.shape[1] // 2
            for expert in range(tensor.shape[0]):
                state[f"{name.rpartition('.')[0]}.{expert}.{gate}.weight"] = tensor[expert, :half].clone()
                state[f"{name.rpartition('.')[0]}.{expert}.{up}.weight"] = tensor[expert, half:].clone()
        elif leaf == "down_proj" and prefix.endswith("experts"):
            for expert in range(tensor.shape[0]):
                state[f"{name.rpartition('.')[0]}.{expert}.{down}.weight"] = tensor[expert].clone()
        else:
            state[name] = tensor.clone()
    return state


@pytest.mark.parametrize(
    ("model_type", "names"),
    [
        ("olmoe", ("mlp", "gate_proj", "up_proj", "down_proj")),
        ("mixtral", ("block_sparse_moe", "w1", "w3", "w2")),
    ],
)
def test_sharded_per_expert_files_written_by_hand_are_fused_for_the_kept_experts(
    model_type, names, tmp_path, batch_factory
):
    model = tiny_model(model_type, seed=3)
    model.config.save_pretrained(tmp_path)
    state = per_expert_state(model, names)
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
    for file, members in shards.items():
        save_file({key: state[key] for key in members}, str(tmp_path / file))
    weight_map = {key: file for file, members in shards.items() for key in members}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    keep = keep_of(model)
    expected = copy.deepcopy(model)
    select_experts(expected, keep)
    assert_same_model(load_sub_moe(tmp_path, keep), expected, batch_factory(model))


def test_tied_embeddings_stay_one_tensor(tmp_path, batch_factory):
    model = tiny_model("olmoe", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = load_sub_moe(tmp_path, keep_of(model))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_dtype_device_and_experts_implementation_are_applied(tmp_path):
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = load_sub_moe(tmp_path, keep_of(model), dtype="auto", experts_implementation="eager")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32  # computed, as from_pretrained keeps it
    assert loaded.config._experts_implementation == "eager"
    as_float = load_sub_moe(tmp_path, keep_of(model), dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    with pytest.raises(FedExpertsError, match="unknown dtype 'float8'"):
        load_sub_moe(tmp_path, dtype="float8")


@pytest.fixture
def olmoe_folder(tmp_path):
    folder = tmp_path / "olmoe"
    tiny_model("olmoe").save_pretrained(folder)
    return folder


def test_a_missing_tensor_is_named(olmoe_folder):
    from safetensors.torch import load_file

    state = load_file(olmoe_folder / "model.safetensors")
    del state["model.layers.1.mlp.experts.4.up_proj.weight"]
    save_file(state, str(olmoe_folder / "model.safetensors"))
    load_sub_moe(olmoe_folder, {"model.layers.1.mlp": [0, 1, 2]})  # expert 4 is not held: not read
    with pytest.raises(FedExpertsError, match=r"no tensor model\.layers\.1\.mlp\.experts\.4\.up_proj\.weight$"):
        load_sub_moe(olmoe_folder, {"model.layers.1.mlp": [0, 4]})


def test_a_truncated_file_is_one_line_naming_it(olmoe_folder):
    weights = olmoe_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(FedExpertsError, match=r"model\.safetensors: cannot read the weights") as caught:
        load_sub_moe(olmoe_folder)
    assert "\n" not in str(caught.value)


def test_a_config_the_weights_do_not_fit_is_refused(olmoe_folder):
    config = json.loads((olmoe_folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (olmoe_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FedExpertsError, match=r"has shape .* in the checkpoint, the config gives"):
        load_sub_moe(olmoe_folder, {"model.layers.0.mlp": [0, 1]})


def test_bad_folders_subsets_and_families_are_refused(tmp_path, olmoe_folder):
    with pytest.raises(FedExpertsError, match="router picks top-2"):
        load_sub_moe(olmoe_folder, {"model.layers.0.mlp": [3]})
    with pytest.raises(FedExpertsError, match=r"no config\.json"):
        load_sub_moe(tmp_path / "nothing")
    (olmoe_folder / "model.safetensors").unlink()
    with pytest.raises(FedExpertsError, match=r"no \*\.safetensors weights"):
        load_sub_moe(olmoe_folder)


def test_qwen3_5s_text_model_is_read_from_under_the_composite_models_language_model(tmp_path, batch_factory):
    """A Qwen3.5 checkpoint is the vision-language model's: its text model sits under ``model.language_model``."""
    if "qwen3_5_moe_text" not in TINY_FAMILIES:
        pytest.skip("this transformers has no qwen3_5_moe_text")
    model = tiny_model("qwen3_5_moe_text", seed=2)
    model.config.save_pretrained(tmp_path)
    state = per_expert_state(model, ("mlp", "gate_proj", "up_proj", "down_proj"))
    state = {key.replace("model.", "model.language_model.", 1): tensor for key, tensor in state.items()}
    state["model.visual.patch_embed.proj.weight"] = torch.zeros(2)  # the vision tower's, not read
    save_file(state, str(tmp_path / "model.safetensors"))
    keep = keep_of(model)
    expected = copy.deepcopy(model)
    select_experts(expected, keep)
    assert_same_model(load_sub_moe(tmp_path, keep), expected, batch_factory(model))


@pytest.fixture(scope="module")
def switch_checkpoint(tmp_path_factory):
    """A tiny Switch Transformers checkpoint: one module per expert, saved with ``save_pretrained``."""
    folder = tmp_path_factory.mktemp("switch")
    tiny_model("switch_transformers", seed=1, expert_capacity=4).save_pretrained(folder)
    return folder


def test_a_switch_sub_moe_equals_the_surgery_view_with_global_indices_and_scaled_capacity(
    switch_checkpoint, batch_factory
):
    full = transformers.AutoModelForSeq2SeqLM.from_pretrained(switch_checkpoint).eval()
    keep = {layer.name: ([6, 1, 3, 0] if index % 2 else [0, 2, 4, 6]) for index, layer in enumerate(moe_layers(full))}
    expected = copy.deepcopy(full)
    select_experts(expected, keep)
    loaded = load_sub_moe(switch_checkpoint, keep)
    batch = batch_factory(full, length=12)  # 12 tokens a sequence over 4 experts: capacity 4 would be tight
    assert_same_model(loaded, expected, batch)
    for layer in moe_layers(loaded):
        assert layer.router.expert_capacity == 8  # ceil(4 * 8 / 4)
        experts = full.get_submodule(layer.experts_name)
        for local, held in enumerate(keep[layer.name]):
            assert torch.equal(layer.experts[f"expert_{local}"].wi.weight, experts[f"expert_{held}"].wi.weight)


def test_a_switch_sub_moe_holds_and_reads_only_the_kept_experts(switch_checkpoint, tmp_path):
    from safetensors.torch import load_file

    full = transformers.AutoModelForSeq2SeqLM.from_pretrained(switch_checkpoint)
    keep = {layer.name: [5, 2] for layer in moe_layers(full)}
    loaded = load_sub_moe(switch_checkpoint, keep)
    assert held_bytes(loaded) == pytest.approx(analytic_bytes(full, keep), rel=0.02)
    assert held_bytes(loaded) < 0.8 * held_bytes(full)
    state = load_file(switch_checkpoint / "model.safetensors")
    held = {f".expert_{index}." for index in (2, 5)}
    kept = {name: tensor for name, tensor in state.items() if ".expert_" not in name or any(h in name for h in held)}
    assert len(kept) < len(state)
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((switch_checkpoint / name).read_bytes())
    save_file(kept, str(tmp_path / "model.safetensors"))  # the other experts' modules are not in the file at all
    for name, tensor in load_sub_moe(tmp_path, keep).state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    unheld = r"no tensor encoder\.block\.1\.layer\.1\.mlp\.experts\.expert_0\.wi\.weight$"
    with pytest.raises(FedExpertsError, match=unheld):
        load_sub_moe(tmp_path, {**keep, "encoder.block.1.layer.1.mlp": [0]})
