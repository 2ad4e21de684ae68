"""The built-in Switch recipes: names and hashes, and the tiny one pretrained, carded and federated."""

import json

import transformers

from fedexperts.config import load_config
from fedexperts.federation.inprocess import run_experiment
from fedexperts.models.builtin import METRICS_FILE, RECIPES, default_model_path
from fedexperts.models.load import load_model
from fedexperts.moe import moe_layers
from tests.conftest import MICRO_RUN

SWITCH = RECIPES["switch-micro"]


def test_switch_recipes_have_their_own_folders_and_the_olmoe_hashes_are_unchanged():
    assert RECIPES["default"].digest() == "7ee084c5fdb6"  # the cached built-in model stays valid
    assert RECIPES["switch-8"].folder_name.startswith("expertbench-switch-switch-8-")
    assert RECIPES["switch-32"].num_experts == 32 and RECIPES["switch-32"].expert_capacity == 4


def test_the_tiny_switch_pretrains_and_every_client_of_a_fedmoe_run_is_ok(cache, tmp_path):
    folder = default_model_path("switch-micro", progress=False)
    assert folder == cache / "models" / SWITCH.folder_name
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert model.config.model_type == "switch_transformers" and model.config.num_experts == 4
    assert [layer.stack for layer in moe_layers(model)] == ["encoder", "decoder"]
    assert load_model(folder).family.model_type == "switch_transformers"
    metrics = json.loads((folder / METRICS_FILE).read_text())
    assert metrics["train"]["final_loss"] < metrics["train"]["first_loss"]
    assert metrics["routing_layers"] == [layer.name for layer in moe_layers(model)]
    card = (folder / "README.md").read_text()
    assert "Switch Transformer" in card and "AutoModelForSeq2SeqLM" in card

    config = load_config(
        None,
        [
            *MICRO_RUN,
            f'output_dir="{tmp_path / "runs"}"',
            "algorithm.name=fedmoe",
            'model.name="builtin:switch-micro"',
            "algorithm.fedmoe.warmup_rounds=0",
            "algorithm.fedmoe.budget_fraction=0.95",
            "federation.clients=2",
            "eval.union_examples=0",
            "eval.probes=2",
            "eval.max_examples=1",
        ],
    )
    result = run_experiment(config)
    for record in result.records[1:-1]:
        assert all(entry["status"] == "ok" for entry in record["clients"].values()), record["clients"]
