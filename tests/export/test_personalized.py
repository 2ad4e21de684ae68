"""Personalized folders: rebuilt by fedexperts' surgery with their grafts and per-layer expert counts."""

import json

import pytest

from fedexperts.errors import FedExpertsError
from fedexperts.export import export_client, load_personalized
from fedexperts.export.assemble import assemble_client
from fedexperts.export.manifest import MANIFEST_FILE
from fedexperts.export.source import open_run
from fedexperts.moe import moe_layers
from fedexperts.moe.personal import grafts
from fedexperts.moe.surgery import expert_map


def test_a_sub_moe_with_per_layer_counts_comes_back_with_its_global_experts(federation, tmp_path):
    run_dir = federation("fedmoe-measured").run_dir
    kept = expert_map(assemble_client(open_run(run_dir), "client-1").model).local_to_global
    assert len({len(experts) for experts in kept.values()}) > 1
    export_client(run_dir, "client-1", tmp_path / "sub-moe")
    model = load_personalized(tmp_path / "sub-moe")
    assert expert_map(model).local_to_global == kept
    assert [layer.num_experts for layer in moe_layers(model)] == [len(experts) for experts in kept.values()]


def test_grafts_come_back_with_the_experts_they_copied(federation, tmp_path):
    run_dir = federation("flex-lora").run_dir
    chosen = {
        name: graft.experts for name, graft in grafts(assemble_client(open_run(run_dir), "client-0").model).items()
    }
    export_client(run_dir, "client-0", tmp_path / "flex")
    model = load_personalized(tmp_path / "flex")
    assert {name: graft.experts for name, graft in grafts(model).items()} == chosen
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged into plain weights


def test_a_stock_folder_is_not_loaded_as_a_personalized_one(federation, tmp_path):
    export_client(federation("fedavg").run_dir, "client-0", tmp_path / "stock")
    with pytest.raises(
        FedExpertsError, match=r"holds a stock Hugging Face model.*AutoModelForCausalLM.from_pretrained"
    ):
        load_personalized(tmp_path / "stock")


def test_a_damaged_manifest_is_named(federation, tmp_path):
    export_client(federation("flex").run_dir, "client-0", tmp_path / "flex")
    manifest = tmp_path / "flex" / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "grafts": {"model.layers.0.mlp": {"experts": [0]}}}))
    with pytest.raises(FedExpertsError, match="malformed 'grafts' entry"):
        load_personalized(tmp_path / "flex")
    manifest.write_text(json.dumps({**data, "format": 9}))
    with pytest.raises(FedExpertsError, match="export manifest of format 9, expected 1"):
        load_personalized(tmp_path / "flex")
