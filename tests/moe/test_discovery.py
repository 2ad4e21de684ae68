"""The structural fallback: its decision on real transformers types with no descriptor, both ways."""

import logging
import types

import pytest
import torch
import transformers

from fedexperts.algorithms import FLEx
from fedexperts.algorithms.flex.config import FlexConfig
from fedexperts.errors import UnsupportedModelError
from fedexperts.models import load_model, tiny_model
from fedexperts.models.partial import meta_model
from fedexperts.moe import (
    DiscoveredFamily,
    ExpertLayout,
    discovery,
    family_for,
    model_note,
    moe_layers,
    select_experts,
)
from fedexperts.moe.discovery import discover_family
from tests.algorithms.helpers import client_round

from .helpers import masked_router_logits, recorded_and_top_k_counts
from .undescribed import EXPERTS, undescribed_config, undescribed_model

ACCEPTED = ["granitemoe_swa", "cohere2_moe"]
"""Fused-expert types with no descriptor whose blocks the fallback finds and confirms."""


@pytest.fixture(autouse=True)
def fresh_discoveries(monkeypatch):
    """Each test discovers anew: the process-wide cache would carry one test's model into the next."""
    monkeypatch.setattr(discovery, "_CONFIRMED", {})


def _field(config, name):
    """A config field by its stored name (transformers aliases some, e.g. num_experts -> num_local_experts)."""
    return config.attribute_map.get(name, name)


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe", "gpt_oss"])
def test_discovery_of_a_described_type_agrees_with_its_descriptor(model_type):
    model = tiny_model(model_type)
    described = family_for(model)
    found = discover_family(model)
    for attribute in (
        "block_attr",
        "router_attr",
        "experts_attr",
        "router_expert_tensors",
        "router_bias",
        "expert_tensors",
        "layout",
        "top_k_field",
    ):
        assert getattr(found, attribute) == getattr(described, attribute), attribute
    assert set(found.shared_expert_attrs) == set(described.shared_expert_attrs)
    assert _field(model.config, found.num_experts_field) == _field(model.config, described.num_experts_field)
    layers = [layer.layer_index for layer in moe_layers(model)]
    assert found.sparse_layers(model.config, "decoder", 0) == layers
    assert "own weights" in found.confirmed_on


def test_group_limited_routing_is_refused_at_the_pruning_check_and_needs_its_descriptor():
    """DeepSeek-V3's groups do not survive an arbitrary subset; the descriptor keeps them, discovery refuses."""
    with pytest.raises(UnsupportedModelError, match=r"'deepseek_v3'.*'\(c\) pruned == masked'.*fails"):
        discover_family(tiny_model("deepseek_v3"))


@pytest.fixture(scope="module", params=ACCEPTED)
def accepted(request):
    return request.param


def test_an_undescribed_type_is_discovered_once_and_logged(accepted, caplog):
    model = undescribed_model(accepted)
    with caplog.at_level(logging.WARNING, logger="fedexperts.moe.discovery"):
        family = family_for(model)
        assert family_for(model) is family and family_for(undescribed_model(accepted, seed=1)) is family
    assert isinstance(family, DiscoveredFamily) and family.layout is ExpertLayout.FUSED
    assert caplog.text.count("discovered structurally") == 1
    assert accepted in caplog.text and "not described" in caplog.text
    layers = moe_layers(model)
    assert [layer.layer_index for layer in layers] == [0, 1, 2]
    assert all(layer.num_experts == EXPERTS and layer.top_k == 2 for layer in layers)
    assert family.config_num_experts(model.config) == EXPERTS and family.config_top_k(model.config) == 2
    assert "no descriptor" in model_note(model)


def test_an_undescribed_type_passes_pruned_equals_masked_through_the_surgery(accepted, batch_factory):
    model = undescribed_model(accepted)
    batch = batch_factory(model)
    keep, dropped = [6, 1, 3, 4], [0, 2, 5, 7]
    names = [layer.name for layer in moe_layers(model)]
    with torch.no_grad(), masked_router_logits(model, dict.fromkeys(names, dropped)):
        reference = model(**batch).logits
    with torch.no_grad():
        plain = model(**batch).logits
        select_experts(model, dict.fromkeys(names, keep))
        pruned = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert not torch.allclose(plain[real], pruned[real], atol=1e-4), "pruning changed nothing"
    torch.testing.assert_close(pruned[real], reference[real], rtol=1e-4, atol=1e-5)


def test_an_undescribed_types_routing_counts_are_the_top_k_of_its_logits(accepted, batch_factory):
    """Both routers choose by the top-k of their logits: an independent recomputation to compare with."""
    model = undescribed_model(accepted)
    recorder, expected = recorded_and_top_k_counts(model, batch_factory(model))
    for layer in moe_layers(model):
        assert layer.num_experts == EXPERTS
        assert torch.equal(recorder.counts()[layer.name], expected[layer.name]), layer.name


def test_flex_grafts_trains_and_sends_attention_lora_on_a_discovered_family():
    model = undescribed_model("granitemoe_swa")
    algorithm = FLEx(FlexConfig())
    algorithm.prepare(model)
    start = algorithm.initial_global_state(model)
    update, personal = client_round(algorithm, model, start, "a", seed=1)
    assert start and set(update.payload.tensors) == set(start)
    assert all("self_attn" in name and "lora" in name for name in start)
    assert personal is not None and personal.metadata["grafted"].keys() == {layer.name for layer in moe_layers(model)}
    assert all(torch.isfinite(tensor).all() for tensor in personal.tensors.values())


def test_a_meta_model_is_confirmed_on_a_random_copy_of_one_block_without_touching_the_global_rng():
    config = undescribed_config("granitemoe_swa")
    state = torch.get_rng_state()
    family = family_for(meta_model(config, torch.bfloat16))
    assert torch.equal(torch.get_rng_state(), state)
    assert "random-weight copy" in family.confirmed_on
    real = family_for(undescribed_model("granitemoe_swa"))
    assert "own weights" in real.confirmed_on, "a real model is confirmed on its weights, not on the meta result"


def test_a_config_alone_is_refused_naming_what_discovery_needs():
    with pytest.raises(UnsupportedModelError, match=r"'granitemoe_swa' is not a supported MoE family.*built model"):
        family_for(undescribed_config("granitemoe_swa"))


def test_afmoe_is_refused_at_the_structure_check_for_its_block_level_expert_bias():
    """AFMoE keeps its routing bias on the block, outside router and experts: pruning would not slice it."""
    model = undescribed_model("afmoe")
    with pytest.raises(UnsupportedModelError, match=r"'afmoe' is not a supported.*'structure'.*\['expert_bias'\]"):
        moe_layers(model)
    with pytest.raises(UnsupportedModelError, match="'structure'"):
        family_for(meta_model(model.config, torch.float32))


def test_a_dense_model_is_refused_with_the_described_families_listed():
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    with pytest.raises(UnsupportedModelError, match=r"'llama' is not a supported.*'structure'.*described: .*olmoe"):
        family_for(transformers.LlamaForCausalLM(config))


def _scaled_weights(block, hidden_states):
    """The block forward with the router's weights post-processed before the experts use them."""
    batch, length, width = hidden_states.shape
    flat = hidden_states.reshape(-1, width)
    _, weights, index = block.router(flat)
    return block.experts(flat, index, weights * 2).view(batch, length, width)


def _logits_by_matmul(router, hidden_states):
    """A router whose logits come from a matmul, not a linear layer: nothing for the -inf mask to act on."""
    logits = (hidden_states @ router.weight.T).float()
    top, index = logits.topk(router.top_k, dim=-1)
    return logits, torch.softmax(top, dim=-1).type_as(hidden_states), index


def _routes_twice(router, hidden_states):
    logits, weights, index = type(router).forward(router, hidden_states)
    return logits, weights, index[:, :1].expand_as(index).contiguous()


@pytest.mark.parametrize(
    ("patch", "where", "check", "message"),
    [
        (_scaled_weights, "block", r"\(a\) router output", "not given the router's top-k weights"),
        (_routes_twice, "router", r"\(b\) routing counts", "same expert twice"),
        (_logits_by_matmul, "router", r"\(c\) pruned == masked", "no 8-wide linear output"),
    ],
    ids=["post-processed-weights", "duplicate-indices", "unmaskable-logits"],
)
def test_a_broken_tiny_model_is_refused_naming_the_check_that_failed(patch, where, check, message):
    model = undescribed_model("granitemoe_swa")
    for layer in model.model.layers:
        module = layer.block_sparse_moe if where == "block" else layer.block_sparse_moe.router
        module.forward = types.MethodType(patch, module)
    with pytest.raises(
        UnsupportedModelError, match=rf"'granitemoe_swa' is not a supported MoE family.*{check}.*{message}"
    ):
        family_for(model)


@pytest.fixture(scope="module")
def undescribed_checkpoint(tmp_path_factory):
    """A granitemoe_swa checkpoint (random weights) with the micro model's tokenizer (400 tokens)."""
    from fedexperts.data.expertbench import ExpertBench
    from fedexperts.models.builtin import RECIPES, build_tokenizer

    folder = tmp_path_factory.mktemp("granitemoe-swa")
    undescribed_model("granitemoe_swa", vocab_size=400).save_pretrained(folder)
    build_tokenizer(ExpertBench.from_seed(0), RECIPES["micro"]).save_pretrained(folder)
    return folder


def test_load_model_discovers_an_undescribed_checkpoint_and_confirms_it_on_its_weights(undescribed_checkpoint):
    loaded = load_model(undescribed_checkpoint)
    assert isinstance(loaded.family, DiscoveredFamily) and loaded.family.model_type == "granitemoe_swa"
    assert "own weights" in loaded.family.confirmed_on
    assert len(moe_layers(loaded.model)) == 3


def test_an_undescribed_checkpoint_that_fails_a_check_is_refused_before_its_weights_are_read(tmp_path):
    model = undescribed_model("afmoe", vocab_size=400)
    model.config.save_pretrained(tmp_path)  # a config and no weights: the refusal comes first
    with pytest.raises(UnsupportedModelError, match=r"'afmoe'.*'structure'"):
        load_model(tmp_path)


def test_a_fedavg_run_on_a_discovered_family_records_how_it_was_found(undescribed_checkpoint, tmp_path):
    from fedexperts.config import load_config
    from fedexperts.federation.inprocess import run_experiment
    from tests.conftest import MICRO_RUN

    config = load_config(
        None,
        [
            f'model.name="{undescribed_checkpoint}"',
            f'output_dir="{tmp_path}"',
            *MICRO_RUN,
            "federation.rounds=1",
            "federation.clients=2",
            "eval.probes=0",
            "eval.max_examples=1",
            "eval.union_examples=0",
            "data.items=60",
            'model.experts_implementation="eager"',
        ],
    )
    result = run_experiment(config)
    run, rounds = result.records[0], result.records[1:-1]
    assert "granitemoe_swa has no descriptor" in run["model_note"] and "own weights" in run["model_note"]
    assert rounds and all(entry["status"] == "ok" for entry in rounds[0]["clients"].values())


def test_plan_on_an_undescribed_config_discovers_its_family_on_the_meta_model(tmp_path):
    from fedexperts.planning import plan

    (tmp_path / "config.json").write_text(undescribed_config("granitemoe_swa").to_json_string())
    result = plan(tmp_path, FlexConfig())
    assert result.model_type == "granitemoe_swa" and result.moe_layers == 3 and result.num_experts == EXPERTS
    assert result.note is not None and "random-weight copy" in result.note
