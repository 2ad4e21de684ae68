import json
import logging

import pytest
import torch

from fedexperts.errors import SurgeryError, UnsupportedModelError
from fedexperts.models import TINY_FAMILIES, tiny_model
from fedexperts.moe import (
    ExpertMap,
    expert_map,
    gather_expert_rows,
    load_pruned,
    moe_layers,
    save_pruned,
    scatter_expert_rows,
    select_experts,
)
from fedexperts.moe.surgery import EXPERT_MAP_FILE, stock_config

from .helpers import masked_router_logits

KEEP = [6, 1, 3, 4]
DROPPED = [0, 2, 5, 7]
# DeepSeek-V3's tiny config routes group-limited (2 groups of 4): keep two experts of each group.
KEEP_GROUPED = [0, 1, 4, 6]
DROPPED_GROUPED = [2, 3, 5, 7]


def grouped(model):
    """Whether the tiny model routes group-limited (2 groups of 4): subsets must keep two experts of each group."""
    layer = moe_layers(model)[0]
    return layer.family.group_routing and int(layer.router.num_group) > 1


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def real(batch, values):
    mask = batch.get("decoder_attention_mask", batch["attention_mask"]).bool()
    return values[mask]


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_pruned_equals_original_with_dropped_logits_masked(model_type, batch_factory):
    model = tiny_model(model_type)
    batch = batch_factory(model)
    keep, dropped = (KEEP_GROUPED, DROPPED_GROUPED) if grouped(model) else (KEEP, DROPPED)
    names = [layer.name for layer in moe_layers(model)]
    with masked_router_logits(model, dict.fromkeys(names, dropped)):
        reference = logits(model, batch)
    plain = logits(model, batch)
    mapping = select_experts(model, dict.fromkeys(names, keep))
    pruned = logits(model, batch)
    assert not torch.allclose(real(batch, plain), real(batch, pruned), atol=1e-4), "pruning changed nothing"
    torch.testing.assert_close(real(batch, pruned), real(batch, reference), rtol=1e-4, atol=1e-5)
    assert mapping.flat_routing == ()
    for layer in moe_layers(model):
        assert layer.num_experts == 4
        assert mapping.local_to_global[layer.name] == tuple(keep)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_permuting_experts_leaves_outputs_unchanged(model_type, batch_factory):
    model = tiny_model(model_type)
    batch = batch_factory(model)
    before = logits(model, batch)
    permutation = [1, 0, 3, 2, 5, 4, 7, 6] if grouped(model) else [5, 2, 7, 0, 1, 6, 3, 4]
    select_experts(model, {layer.name: permutation for layer in moe_layers(model)})
    torch.testing.assert_close(real(batch, logits(model, batch)), real(batch, before), rtol=1e-4, atol=1e-5)


def test_deepseek_v3_subset_that_breaks_groups_routes_flat_and_says_so(batch_factory, caplog):
    """Group-limited routing cannot survive a subset of unequal groups: what holds is plain top-k."""
    model = tiny_model("deepseek_v3")
    batch = batch_factory(model)
    names = [layer.name for layer in moe_layers(model)]
    reference_model = tiny_model("deepseek_v3")
    for layer in moe_layers(reference_model):
        layer.router.num_group, layer.router.topk_group = 1, 1
    with masked_router_logits(reference_model, dict.fromkeys(names, DROPPED)):
        reference = logits(reference_model, batch)
    with caplog.at_level(logging.WARNING):
        mapping = select_experts(model, dict.fromkeys(names, KEEP))
    assert set(mapping.flat_routing) == set(names)
    assert "plain top-k" in caplog.text
    torch.testing.assert_close(real(batch, logits(model, batch)), real(batch, reference), rtol=1e-4, atol=1e-5)


def test_counts_may_differ_across_layers_and_every_cached_count_is_fixed(batch_factory):
    model = tiny_model("olmoe")
    first, second, third = (layer.name for layer in moe_layers(model))
    select_experts(model, {first: [0, 1, 2], second: [3, 4, 5, 6, 7]})
    layers = {layer.name: layer for layer in moe_layers(model)}
    assert [layers[n].num_experts for n in (first, second, third)] == [3, 5, 8]
    for name, expected in ((first, 3), (second, 5)):
        layer = layers[name]
        for module in (layer.block, layer.router, layer.experts):
            stale = {k: v for k, v in vars(module).items() if isinstance(v, int) and not isinstance(v, bool) and v == 8}
            assert not stale, f"{name}: stale expert count in {type(module).__name__}: {stale}"
        assert layer.experts.num_experts == layer.router.num_experts == expected
        assert layer.experts.gate_up_proj.shape[0] == layer.router.weight.shape[0] == expected
    assert model.num_experts is None and model.config.output_router_logits is False
    assert torch.isfinite(logits(model, batch_factory(model))).all()


def test_uniform_counts_update_the_model_level_count(batch_factory):
    model = tiny_model("mixtral")
    select_experts(model, {layer.name: [0, 2, 4] for layer in moe_layers(model)})
    assert model.num_experts == 3
    model.config.output_router_logits = True
    batch = batch_factory(model)
    output = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(output.aux_loss)


def test_phimoe_block_count_and_switch_modules_are_renumbered():
    phimoe = tiny_model("phimoe")
    layer = moe_layers(phimoe)[0]
    select_experts(phimoe, {layer.name: [7, 2, 5]})
    assert layer.block.num_experts == 3
    switch = tiny_model("switch_transformers")
    layer = moe_layers(switch)[0]
    original = layer.experts["expert_5"].wi.weight.clone()
    select_experts(switch, {layer.name: [7, 5]})
    assert sorted(layer.experts.keys()) == ["expert_0", "expert_1"]
    torch.testing.assert_close(layer.experts["expert_1"].wi.weight, original)
    assert layer.router.classifier.out_features == 2


def test_pruning_twice_composes_the_map_to_global_indices():
    model = tiny_model("qwen3_moe")
    name = moe_layers(model)[0].name
    select_experts(model, {name: [7, 6, 5, 4, 3]})
    mapping = select_experts(model, {name: [0, 2, 4]})
    assert mapping.local_to_global[name] == (7, 5, 3)
    assert mapping.num_global[name] == 8
    assert expert_map(model) == mapping


@pytest.mark.parametrize(
    ("keep", "error", "message"),
    [
        ([], SurgeryError, "empty expert list"),
        ([0, 8], SurgeryError, r"indices \[8\] out of range"),
        ([-1, 2], SurgeryError, "out of range"),
        ([1, 1, 2], SurgeryError, "duplicate"),
        ([3], SurgeryError, "top-2"),
    ],
)
def test_bad_subsets_are_refused_and_leave_the_model_unchanged(keep, error, message):
    model = tiny_model("olmoe")
    names = [layer.name for layer in moe_layers(model)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        select_experts(model, {names[0]: [0, 1], names[1]: keep})
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.num_experts == 8 for layer in moe_layers(model))


def test_unknown_layer_is_refused():
    model = tiny_model("olmoe")
    with pytest.raises(UnsupportedModelError, match="not MoE layers"):
        select_experts(model, {"model.layers.0.self_attn": [0, 1]})


def test_scatter_writes_back_only_held_rows():
    model = tiny_model("gpt_oss")
    layer = moe_layers(model)[1]
    full = layer.experts.gate_up_proj.detach().clone()
    held = [6, 2, 3]
    local = gather_expert_rows(full, held)
    torch.testing.assert_close(local[0], full[6])
    updated = scatter_expert_rows(full, local + 1.0, held)
    for index in range(8):
        expected = full[index] + 1.0 if index in held else full[index]
        torch.testing.assert_close(updated[index], expected)
    with pytest.raises(SurgeryError, match="cannot scatter"):
        scatter_expert_rows(full, local[:2], held)


def test_pruned_local_rows_scatter_back_to_their_global_rows():
    model = tiny_model("deepseek_v2")
    reference = tiny_model("deepseek_v2")
    layer = moe_layers(model)[0]
    mapping = select_experts(model, {layer.name: [5, 0, 3]})
    held = mapping.local_to_global[layer.name]
    global_layer = moe_layers(reference)[0]
    restored = scatter_expert_rows(torch.zeros_like(global_layer.experts.down_proj), layer.experts.down_proj, held)
    for index in held:
        torch.testing.assert_close(restored[index], global_layer.experts.down_proj[index])


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_every_per_expert_tensor_keeps_the_kept_experts_entries(model_type):
    """Router rows, correction biases (router, block, or ERNIE's (1, E) columns) and expert rows follow the subset."""
    model = tiny_model(model_type)
    layer = moe_layers(model)[0]
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    listed = [*layer.expert_row_names(), *(f"{layer.experts_name}.{t}" for t in layer.family.expert_tensors)]
    rows = [name for name in listed if name in tensors]
    columns = layer.expert_column_names()
    assert rows and all(name in tensors for name in columns)
    with torch.no_grad():
        for name in rows + columns:
            tensors[name].copy_(torch.randn_like(tensors[name]))
    before = {name: tensors[name].clone() for name in rows + columns}
    keep = KEEP_GROUPED if grouped(model) else KEEP
    select_experts(model, {layer.name: keep})
    after = dict([*model.named_parameters(), *model.named_buffers()])
    index = torch.tensor(keep)
    for name in rows:
        assert torch.equal(after[name], before[name].index_select(0, index)), name
    for name in columns:
        assert torch.equal(after[name], before[name].index_select(-1, index)), name


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3", "gpt_oss", "switch_transformers"])
def test_pruned_model_saves_and_loads(model_type, tmp_path, batch_factory):
    model = tiny_model(model_type)
    batch = batch_factory(model)
    names = [layer.name for layer in moe_layers(model)]
    keep = {names[0]: [0, 1, 4, 5, 6, 7], names[1]: [0, 1, 4, 5] if grouped(model) else [7, 2]}
    mapping = select_experts(model, keep)
    expected = logits(model, batch)
    loaded = load_pruned(save_pruned(model, tmp_path / "sub"))
    assert expert_map(loaded) == mapping
    assert [layer.num_experts for layer in moe_layers(loaded)][:2] == [6, len(keep[names[1]])]
    torch.testing.assert_close(logits(loaded, batch), expected)


def test_a_pruned_model_with_tied_embeddings_saves_and_loads(tmp_path, batch_factory):
    model = tiny_model("olmoe", tie_word_embeddings=True)
    select_experts(model, {moe_layers(model)[0].name: [1, 2, 5]})
    batch = batch_factory(model)
    loaded = load_pruned(save_pruned(model, tmp_path / "sub"))
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch))


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_a_model_pruned_alike_in_every_layer_is_a_stock_model_of_that_count(model_type, batch_factory):
    import transformers

    model = tiny_model(model_type)
    keep = KEEP_GROUPED if grouped(model) else KEEP
    select_experts(model, {layer.name: keep for layer in moe_layers(model)})
    config = stock_config(model)
    assert config is not None
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    stock = auto.from_config(config).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    batch = batch_factory(model)
    torch.testing.assert_close(logits(stock, batch), logits(model, batch))


def test_per_layer_counts_and_broken_groups_have_no_stock_config():
    model = tiny_model("olmoe")
    first, second, *_ = moe_layers(model)
    assert stock_config(model) is not None  # unpruned
    select_experts(model, {first.name: [0, 1, 2], second.name: [3, 4]})
    assert stock_config(model) is None
    grouped = tiny_model("deepseek_v3")
    select_experts(
        grouped, {layer.name: [0, 1, 2, 3] for layer in moe_layers(grouped)}
    )  # one group left: its groups change
    assert stock_config(grouped) is None


def test_saving_over_an_existing_folder_replaces_it_whole(tmp_path):
    model = tiny_model("olmoe")
    target = save_pruned(model, tmp_path / "sub")
    (target / "stale.txt").write_text("left over")
    select_experts(model, {moe_layers(model)[0].name: [1, 2]})
    save_pruned(model, target)
    assert not (target / "stale.txt").exists()
    assert expert_map(load_pruned(target)).local_to_global[moe_layers(model)[0].name] == (1, 2)


def test_loading_a_broken_folder_is_a_clear_error(tmp_path):
    model = tiny_model("olmoe")
    with pytest.raises(SurgeryError, match=r"missing config\.json"):
        load_pruned(tmp_path)
    target = save_pruned(model, tmp_path / "sub")
    (target / EXPERT_MAP_FILE).write_text(json.dumps({"local_to_global": {}}))
    with pytest.raises(SurgeryError, match="malformed expert map"):
        load_pruned(target)
    wrong = ExpertMap({moe_layers(model)[0].name: (0, 1, 2)}, {moe_layers(model)[0].name: 8})
    (target / EXPERT_MAP_FILE).write_text(json.dumps(wrong.to_json()))
    with pytest.raises(SurgeryError, match="does not match the saved structure"):
        load_pruned(target)


def test_deepseek_v2_group_limited_routing_keeps_whole_groups(batch_factory):
    overrides = {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}
    model = tiny_model("deepseek_v2", **overrides)
    batch = batch_factory(model)
    names = [layer.name for layer in moe_layers(model)]
    with masked_router_logits(model, dict.fromkeys(names, (3, 4))):
        reference = logits(model, batch)
    mapping = select_experts(model, dict.fromkeys(names, (0, 1, 2, 5, 6, 7)))
    assert mapping.groups == dict.fromkeys(names, (2, 1)) and mapping.flat_routing == ()
    torch.testing.assert_close(real(batch, logits(model, batch)), real(batch, reference), rtol=1e-4, atol=1e-5)
